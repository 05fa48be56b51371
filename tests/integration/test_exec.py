"""POST /sandboxes/{ref}/exec and the exec records: exit relay, errors as a shell reports them."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conftest import Daemon, wait_for


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="exec-box", env={"GREETING": "hello", "LANG": "C.UTF-8"})


def test_exit_code_is_relayed(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.sh(box["id"], "echo out; echo err >&2; exit 42")
    assert result["state"] == "exited"
    assert (result["exit_code"], result["signal"]) == (42, None)
    assert (result["stdout"], result["stderr"]) == ("out\n", "err\n")
    assert result["pid"] > 1 and result["finished_at"] is not None
    assert result["stdout_truncated"] is False and result["timed_out"] is False


def test_death_by_signal_is_the_signal(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.sh(box["id"], "kill -KILL $$")
    assert (result["exit_code"], result["signal"]) == (None, "SIGKILL")
    result = daemon.sh(box["id"], "kill -TERM $$")
    assert (result["exit_code"], result["signal"]) == (None, "SIGTERM")


def test_missing_binary_is_127_with_a_message(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.exec(box["id"], ["no-such-binary", "x"])
    assert result["exit_code"] == 127
    assert "no-such-binary" in result["stderr"]
    assert daemon.exec(box["id"], ["/no/such/path"])["exit_code"] == 127


def test_not_executable_is_126(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.exec(box["id"], ["/etc/passwd"])
    assert result["exit_code"] == 126
    assert "Permission denied" in result["stderr"]
    assert daemon.exec(box["id"], ["/etc"])["exit_code"] == 126


def test_env_is_merged_over_the_sandboxs(daemon: Daemon, box: dict[str, Any]) -> None:
    result = daemon.sh(box["id"], 'echo "$GREETING $WHO $PATH"', env={"WHO": "world"})
    assert result["stdout"].startswith("hello world /usr/local/sbin:")
    result = daemon.sh(box["id"], 'echo "$GREETING"', env={"GREETING": "hi"})
    assert result["stdout"] == "hi\n"


def test_many_quick_execs_leave_the_supervisor_running(daemon: Daemon, box: dict[str, Any]) -> None:
    # A quick exec's exit and its pipes' end often reach the supervisor in one select() batch.
    for _ in range(150):
        assert daemon.exec(box["id"], ["true"])["exit_code"] == 0
    assert daemon.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"


def test_cwd_user_and_stdin(daemon: Daemon, box: dict[str, Any]) -> None:
    assert daemon.exec(box["id"], ["pwd"], cwd="/usr/bin")["stdout"] == "/usr/bin\n"
    assert daemon.exec(box["id"], ["pwd"], cwd="/nope")["exit_code"] == 126
    assert daemon.sh(box["id"], "id -u; id -g", user="1000")["stdout"].split() == ["1000", "1000"]
    assert daemon.sh(box["id"], "id -u; id -g", user="33")["stdout"].split() == ["33", "33"]
    assert daemon.sh(box["id"], "id -u; id -g", user="7:9")["stdout"].split() == ["7", "9"]
    assert daemon.exec(box["id"], ["cat"], stdin="piped\n")["stdout"] == "piped\n"
    assert daemon.exec(box["id"], ["cat"])["stdout"] == ""


def test_ids_the_sandbox_does_not_map_fail_the_exec(daemon: Daemon, box: dict[str, Any]) -> None:
    # gid 4294967295 is (gid_t)-1: to setresgid "no change", which would leave the exec in
    # group 0; an id past the sandbox's 65536 is none of its own either
    lines = "minus:x:4321:4294967295::/:/bin/sh\nwide:x:4322:65536::/:/bin/sh\n"
    script = f"cp /etc/passwd /etc/passwd.orig && printf '{lines}' >> /etc/passwd"
    assert daemon.sh(box["id"], script, user="0")["exit_code"] == 0
    try:
        for user in ("4321", "4322", "65536", "0:65536"):
            result = daemon.sh(box["id"], "echo ran; id -g", user=user)
            assert result["exit_code"] == 126, (user, result)
            assert result["stdout"] == "" and "sandboxd: cannot start" in result["stderr"]
        assert daemon.sh(box["id"], "id -g", user="65535")["stdout"] == "65535\n"
    finally:
        daemon.sh(box["id"], "mv /etc/passwd.orig /etc/passwd", user="0")


def test_output_of_any_bytes_is_decoded_with_replacement(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    result = daemon.sh(box["id"], r"printf 'a\377b\n'")
    assert result["stdout"] == "a\ufffdb\n"


def test_background_exec_and_the_records(daemon: Daemon, box: dict[str, Any]) -> None:
    response = daemon.client.post(
        f"/sandboxes/{box['id']}/exec",
        json={"cmd": ["sh", "-c", "sleep 0.3; echo late"], "wait": False},
    )
    assert response.status_code == 202
    started = response.json()
    assert started["state"] == "running" and started["pid"] > 1
    url = f"/sandboxes/{box['id']}/execs/{started['id']}"

    record = daemon.await_state(url, "exited")
    assert record and record["stdout"] == "late\n" and record["exit_code"] == 0
    items = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
    assert started["id"] in [e["id"] for e in items]
    assert [e["started_at"] for e in items] == sorted(e["started_at"] for e in items)
    by_name = daemon.client.get(f"/sandboxes/exec-box/execs/{started['id']}")
    assert by_name.status_code == 200


def test_signal_a_running_exec(daemon: Daemon, box: dict[str, Any]) -> None:
    started = daemon.exec(box["id"], ["sleep", "60"], wait=False)
    url = f"/sandboxes/{box['id']}/execs/{started['id']}"
    assert daemon.client.post(f"{url}/signal", json={"signal": "SIGTERM"}).status_code == 202
    record = daemon.await_state(url, "exited")
    assert record["signal"] == "SIGTERM" and record["exit_code"] is None
    assert daemon.client.post(f"{url}/signal", json={"signal": "TERM"}).status_code == 409
    assert daemon.client.post(f"{url}/signal", json={"signal": "SIGNOPE"}).status_code == 422


def test_unknown_exec_and_sandbox_are_404(daemon: Daemon, box: dict[str, Any]) -> None:
    assert daemon.client.get(f"/sandboxes/{box['id']}/execs/ex_nope").status_code == 404
    assert daemon.client.get("/sandboxes/nope/execs").status_code == 404
    response = daemon.client.post("/sandboxes/nope/exec", json={"cmd": ["true"]})
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/problem+json")


def test_bad_exec_bodies_are_422_and_store_nothing(daemon: Daemon, box: dict[str, Any]) -> None:
    before = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
    for body in (
        {"cmd": []},
        {"cmd": ["true"], "cwd": "relative"},
        {"cmd": ["true"], "user": "root"},
        {"cmd": ["true"], "timeout_seconds": -1},
        {"cmd": ["true"], "bogus": 1},
        {"cmd": ["a\u0000b"]},
    ):
        response = daemon.client.post(f"/sandboxes/{box['id']}/exec", json=body)
        assert response.status_code == 422, (body, response.text)
    after = daemon.client.get(f"/sandboxes/{box['id']}/execs").json()["items"]
    assert after == before


def test_exec_into_a_sandbox_that_is_not_running_is_409(daemon: Daemon) -> None:
    done = daemon.create(cmd=["true"])
    assert wait_for(
        lambda: daemon.client.get(f"/sandboxes/{done['id']}").json()["state"] == "exited"
    )
    response = daemon.client.post(f"/sandboxes/{done['id']}/exec", json={"cmd": ["true"]})
    assert response.status_code == 409
    assert daemon.client.get(f"/sandboxes/{done['id']}/execs").json()["items"] == []
