"""The routes' status codes and shapes against a fake service, and the stable operation ids."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from api.app import create_app
from daemon.shapes import ALL_NAMESPACES
from tests.api.conftest import TOKEN
from tests.api.fakes import FakeService


def create(client: TestClient, **spec: object) -> dict[str, object]:
    response = client.post("/sandboxes", json=spec)
    assert response.status_code == 201, response.text
    body: dict[str, object] = response.json()
    return body


def test_healthz_answers_ok(client: TestClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_info_reports_versions_and_counts(client: TestClient) -> None:
    create(client)
    info = client.get("/info").json()
    assert info["sandboxes"] == {"running": 1, "total": 1, "removing": 0}
    assert {"version", "kernel", "cgroup"} <= info.keys()


def test_create_answers_201_with_the_sandbox_and_its_location(client: TestClient) -> None:
    response = client.post("/sandboxes", json={"name": "web-1", "labels": {"team": "ci"}})
    assert response.status_code == 201
    sandbox = response.json()
    assert sandbox["name"] == "web-1"
    assert sandbox["state"] == "running"
    assert sandbox["labels"] == {"team": "ci"}
    assert response.headers["location"] == f"/sandboxes/{sandbox['id']}"


def test_create_takes_no_body_at_all_as_all_defaults(client: TestClient) -> None:
    response = client.post("/sandboxes")
    assert response.status_code == 201
    assert response.json()["namespaces"] == ALL_NAMESPACES


def test_create_reads_a_body_without_content_type_as_json(client: TestClient) -> None:
    response = client.post("/sandboxes", content=b'{"name": "plain"}')
    assert response.status_code == 201
    assert response.json()["name"] == "plain"


def test_list_is_oldest_first_and_filters(client: TestClient, service: FakeService) -> None:
    create(client, name="a", labels={"team": "ci", "tier": "1"})
    create(client, name="b", labels={"team": "ci"})
    create(client, name="c")
    service.stop_sandbox("c")

    def names(query: str) -> list[str]:
        response = client.get("/sandboxes" + query)
        assert response.status_code == 200
        return [item["name"] for item in response.json()["items"]]

    assert names("") == ["a", "b", "c"]
    assert names("?state=running") == ["a", "b"]
    assert names("?state=exited&state=running") == ["a", "b", "c"]
    assert names("?label=team=ci") == ["a", "b"]
    assert names("?label=team=ci&label=tier=1") == ["a"]
    assert names("?label=team=ci&label=team=other") == []


def test_get_finds_a_sandbox_by_id_and_by_name(client: TestClient) -> None:
    sandbox = create(client, name="named")
    assert client.get(f"/sandboxes/{sandbox['id']}").json() == sandbox
    assert client.get("/sandboxes/named").json() == sandbox


def test_delete_answers_204_without_body_then_404(client: TestClient) -> None:
    sandbox = create(client, name="doomed")
    response = client.delete("/sandboxes/doomed")
    assert response.status_code == 204
    assert response.content == b""
    assert client.get(f"/sandboxes/{sandbox['id']}").status_code == 404
    assert client.delete("/sandboxes/doomed").status_code == 404


def test_exec_waiting_answers_200_with_the_finished_exec(client: TestClient) -> None:
    create(client, name="box")
    response = client.post("/sandboxes/box/exec", json={"cmd": ["echo", "hi"]})
    assert response.status_code == 200
    execution = response.json()
    assert execution["state"] == "exited"
    assert execution["exit_code"] == 0
    assert execution["stdout"] == "hi\n"


def test_exec_not_waiting_answers_202_with_the_running_exec(client: TestClient) -> None:
    create(client, name="box")
    body = {"cmd": ["sleep", "60"], "wait": False}
    response = client.post("/sandboxes/box/exec", json=body)
    assert response.status_code == 202
    assert response.json()["state"] == "running"
    assert response.json()["pid"] is not None
    # Asking for a stream changes nothing when not waiting.
    ndjson = {"Accept": "application/x-ndjson"}
    response = client.post("/sandboxes/box/exec", json=body, headers=ndjson)
    assert response.status_code == 202
    assert response.headers["content-type"] == "application/json"


def test_exec_streams_ndjson_when_asked(client: TestClient) -> None:
    create(client, name="box")
    response = client.post(
        "/sandboxes/box/exec",
        json={"cmd": ["echo", "hi"]},
        headers={"Accept": "application/json;q=0.5, application/x-ndjson"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/x-ndjson"
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[0] == {"stream": "stdout", "data": "hi\n"}
    assert lines[-1]["exit"]["exit_code"] == 0
    assert len(lines) == 2


def test_execs_are_listed_oldest_first_and_got_by_id(client: TestClient) -> None:
    create(client, name="box")
    ids = [client.post("/sandboxes/box/exec", json={"cmd": ["true"]}).json()["id"] for _ in "ab"]
    response = client.get("/sandboxes/box/execs")
    assert response.status_code == 200
    assert [e["id"] for e in response.json()["items"]] == ids
    assert client.get(f"/sandboxes/box/execs/{ids[1]}").json()["id"] == ids[1]


def test_signal_answers_202_with_the_exec(client: TestClient) -> None:
    create(client, name="box")
    running = client.post("/sandboxes/box/exec", json={"cmd": ["sleep", "60"], "wait": False})
    exec_id = running.json()["id"]
    response = client.post(f"/sandboxes/box/execs/{exec_id}/signal", json={"signal": 9})
    assert response.status_code == 202
    assert response.json()["signal"] == "SIGKILL"


def test_signal_takes_names_with_or_without_sig(client: TestClient, service: FakeService) -> None:
    create(client, name="box")
    for name, expected in (("SIGTERM", "SIGTERM"), ("hup", "SIGHUP"), ("15", "SIGTERM")):
        running = client.post("/sandboxes/box/exec", json={"cmd": ["sleep", "1"], "wait": False})
        url = f"/sandboxes/box/execs/{running.json()['id']}/signal"
        response = client.post(url, json={"signal": name})
        assert response.status_code == 202
        assert response.json()["signal"] == expected


def test_stats_answers_200_with_the_usage(client: TestClient) -> None:
    create(client, name="box")
    response = client.get("/sandboxes/box/stats")
    assert response.status_code == 200
    assert response.json() == {
        "memory_current_bytes": 1 << 20,
        "memory_peak_bytes": 2 << 20,
        "cpu_seconds": 0.5,
        "pids_current": 1,
        "pids_peak": 3,
        "oom_kills": 0,
    }


def test_ttl_answers_200_with_the_new_expiry(client: TestClient, service: FakeService) -> None:
    create(client, name="box")
    response = client.post("/sandboxes/box/ttl", json={"ttl_seconds": 60})
    assert response.status_code == 200
    assert response.json()["expires_at"] is not None
    cleared = client.post("/sandboxes/box/ttl", json={"ttl_seconds": None})
    assert cleared.json()["expires_at"] is None
    assert service.mutations == ["create", "set_ttl", "set_ttl"]


def test_an_exec_reports_oom_killed(client: TestClient) -> None:
    create(client, name="box")
    execution = client.post("/sandboxes/box/exec", json={"cmd": ["true"]}).json()
    assert execution["oom_killed"] is False


def test_the_lifespan_starts_and_stops_the_service() -> None:
    service = FakeService()
    with TestClient(create_app(service, token=TOKEN, max_body=1024)):
        assert service.started
        assert not service.stopped
    assert service.stopped


def test_operation_ids_are_stable_client_names() -> None:
    document = create_app(FakeService(), token=None, max_body=1024).openapi()
    ids = {
        (method.upper(), path): operation["operationId"]
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }
    assert ids == {
        ("GET", "/healthz"): "system_healthz",
        ("GET", "/info"): "system_info",
        ("POST", "/sandboxes"): "sandboxes_create",
        ("GET", "/sandboxes"): "sandboxes_list",
        ("GET", "/sandboxes/{ref}"): "sandboxes_get",
        ("DELETE", "/sandboxes/{ref}"): "sandboxes_delete",
        ("POST", "/sandboxes/{ref}/exec"): "execs_create",
        ("GET", "/sandboxes/{ref}/execs"): "execs_list",
        ("GET", "/sandboxes/{ref}/execs/{exec_id}"): "execs_get",
        ("POST", "/sandboxes/{ref}/execs/{exec_id}/signal"): "execs_signal",
        ("GET", "/sandboxes/{ref}/execs/{exec_id}/output"): "execs_output",
        ("GET", "/sandboxes/{ref}/execs/{exec_id}/stdout"): "execs_stdout",
        ("GET", "/sandboxes/{ref}/execs/{exec_id}/stderr"): "execs_stderr",
        ("GET", "/sandboxes/{ref}/logs"): "sandboxes_logs",
        ("GET", "/sandboxes/{ref}/stats"): "sandboxes_stats",
        ("POST", "/sandboxes/{ref}/ttl"): "sandboxes_set_ttl",
        ("GET", "/events"): "events_stream",
        ("GET", "/metrics"): "system_metrics",
        ("GET", "/sandboxes/{ref}/files"): "files_read",
        ("PUT", "/sandboxes/{ref}/files"): "files_write",
        ("DELETE", "/sandboxes/{ref}/files"): "files_delete",
        ("GET", "/sandboxes/{ref}/files/stat"): "files_stat",
        ("GET", "/sandboxes/{ref}/files/list"): "files_list",
        ("POST", "/sandboxes/{ref}/files/mkdir"): "files_mkdir",
        ("POST", "/sandboxes/{ref}/files/move"): "files_move",
        ("GET", "/sandboxes/{ref}/archive"): "files_archive_read",
        ("PUT", "/sandboxes/{ref}/archive"): "files_archive_write",
        ("POST", "/images/pull"): "images_pull",
        ("POST", "/images/import"): "images_import",
        ("GET", "/images"): "images_list",
        ("GET", "/images/{ref}"): "images_get",
        ("DELETE", "/images/{ref}"): "images_delete",
    }
