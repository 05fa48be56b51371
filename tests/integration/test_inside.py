"""What a sandbox made with the defaults looks like from inside, checked from the host too."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SLOTS_PER_DAEMON, Daemon, Daemons, wait_for

HOST_NAMESPACES = ("pid", "mnt", "ipc", "uts", "net", "user")


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="inside_1")


def out(daemon: Daemon, box: dict[str, Any], script: str) -> str:
    result = daemon.sh(box["id"], script)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def host_pid_of(sandbox: dict[str, Any], comm: str) -> int:
    """The host pid of a process named `comm` among the supervisor's children."""
    found = wait_for(lambda: _child_named(sandbox, comm))
    assert found, f"no {comm} under the supervisor {sandbox['pid']}"
    return int(found)


def _child_named(sandbox: dict[str, Any], comm: str) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        name, fields = stat.split("(", 1)[1].rsplit(")", 1)
        if name == comm and int(fields.split()[1]) == sandbox["pid"]:
            return int(pid)
    return None


def sleeping(sandbox: dict[str, Any]) -> int | None:
    try:
        return host_pid_of(sandbox, "sleep")
    except AssertionError:
        return None


def test_every_namespace_is_the_sandboxs_own(box: dict[str, Any]) -> None:
    assert sorted(box["namespaces"]) == sorted(HOST_NAMESPACES)
    for ns in ("pid_for_children", "mnt", "ipc", "uts", "net"):
        host = os.readlink(f"/proc/self/ns/{ns}")
        theirs = os.readlink(f"/proc/{box['pid']}/ns/{ns}")
        assert host != theirs, ns


def test_supervisor_is_pid_1_and_only_own_processes_are_visible(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    assert out(daemon, box, "cat /proc/1/comm").strip() == "sandboxd-sup"
    pids = out(daemon, box, "ls /proc | grep -E '^[0-9]+$'").split()
    assert "1" in pids and len(pids) <= 4, pids  # PID 1, sh, ls, grep
    ps = out(daemon, box, "ps -e -o pid=,comm=")
    assert ps.split()[:2] == ["1", "sandboxd-sup"], ps
    assert "pytest" not in ps and "sandboxd-zygote" not in ps


def test_host_name_is_its_own(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "hostname").strip() == "inside-1"
    assert box["hostname"] == "inside-1"
    assert os.uname().nodename != "inside-1"
    assert "inside-1" in out(daemon, box, "cat /etc/hostname /etc/hosts")


def test_ipc_is_its_own(daemon: Daemon, box: dict[str, Any]) -> None:
    before = Path("/proc/sysvipc/msg").read_text()
    queue_id = out(daemon, box, "ipcmk -Q").split()[-1]
    assert queue_id in out(daemon, box, "cut -c1-40 /proc/sysvipc/msg")
    assert Path("/proc/sysvipc/msg").read_text() == before
    # POSIX message queues live in the IPC namespace too: the kernel names it for us.
    assert os.readlink(f"/proc/{box['pid']}/ns/ipc") != os.readlink("/proc/self/ns/ipc")


def test_only_lo_and_it_is_up(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "ls /sys/class/net").split() == ["lo"]
    flags = int(out(daemon, box, "cat /sys/class/net/lo/flags"), 16)
    assert flags & 1, "lo is not up"
    script = "import socket; s = socket.socket(); s.bind(('127.0.0.1', 80)); print('ok')"
    assert out(daemon, box, f'python3 -c "{script}"').strip() == "ok"


def test_root_inside_is_an_unprivileged_host_uid(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "id -u; id -g").split() == ["0", "0"]
    started = daemon.exec(box["id"], ["sleep", "30"], wait=False)
    assert started["state"] == "running"
    host_pid = wait_for(lambda: sleeping(box))  # started is not yet exec'd
    status = Path(f"/proc/{host_pid}/status").read_text()
    uid = int(status.split("\nUid:")[1].split()[0])
    region = range(daemon.uid_base, daemon.uid_base + SLOTS_PER_DAEMON * 65536)
    assert uid in region and (uid - daemon.uid_base) % 65536 == 0
    uid_map = Path(f"/proc/{host_pid}/uid_map").read_text().split()
    assert uid_map == ["0", str(uid), "65536"]
    daemon.client.post(f"/sandboxes/{box['id']}/execs/{started['id']}/signal", json={"signal": 9})


def test_two_sandboxes_never_share_a_uid_range(daemon: Daemon, box: dict[str, Any]) -> None:
    other = daemon.create()
    try:
        ranges = {out(daemon, b, "cat /proc/self/uid_map").split()[1] for b in (box, other)}
        assert len(ranges) == 2, ranges
    finally:
        daemon.client.delete(f"/sandboxes/{other['id']}")


def test_base_is_owned_by_root_inside(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "stat -c %u:%g /etc/passwd /usr/bin/env /").split() == ["0:0"] * 3
    assert out(daemon, box, "python3 -c 'print(6*7)'").strip() == "42"


def _lean_zygote(daemon: Daemon) -> int:
    """The pid of the zygote of non-bridged sandboxes."""
    assert daemon.proc is not None
    children = Path(f"/proc/{daemon.proc.pid}/task/{daemon.proc.pid}/children").read_text()
    for pid in children.split():
        words = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if b"daemon.sandbox.zygote" in words and b"net" not in words:
            return int(pid)
    raise AssertionError(f"no zygote among {children}")


def _lean_zygote_usernses(daemon: Daemon) -> set[str]:
    """The user namespaces whose fds the zygote of non-bridged sandboxes holds."""
    fds = Path(f"/proc/{_lean_zygote(daemon)}/fd")
    links = {os.readlink(fd) for fd in fds.iterdir()}
    return {link for link in links if link.startswith("user:[")}


def _settled_usernses(daemon: Daemon) -> set[str]:
    """The zygote's user namespaces once it has stopped making them (the same twice, 0.2 s
    apart)."""
    last = _lean_zygote_usernses(daemon)
    for _ in range(50):
        time.sleep(0.2)
        now = _lean_zygote_usernses(daemon)
        if now == last:
            return now
        last = now
    raise AssertionError(f"the zygote's user namespaces did not settle: {last}")


def test_user_namespaces_are_made_once_per_uid_range(daemon: Daemon) -> None:
    """A sandbox's user namespace and the one its base is idmapped through are the zygote's,
    made for its uid range on first use; a later sandbox of that range (its slot freed and
    handed out again) lives in the same ones, and owns its base as before."""
    held = _lean_zygote_usernses(daemon)
    first = daemon.create()
    uid_map = out(daemon, first, "cat /proc/self/uid_map").split()
    lives_in = out(daemon, first, "readlink /proc/self/ns/user").strip()
    made = _lean_zygote_usernses(daemon)
    # Its two, and perhaps already the two of the range above, made ahead for the next create.
    assert lives_in in made and len(made - held) <= 4, (lives_in, held, made)
    made = _settled_usernses(daemon)
    daemon.client.delete(f"/sandboxes/{first['id']}")
    daemon.settled()  # its uid range let go: the lowest free again, so the next one's
    again = daemon.create()
    try:
        assert out(daemon, again, "cat /proc/self/uid_map").split() == uid_map
        assert _lean_zygote_usernses(daemon) == made
        assert out(daemon, again, "readlink /proc/self/ns/user").strip() == lives_in
        assert out(daemon, again, "stat -c %u:%g /etc/passwd /").split() == ["0:0"] * 2
    finally:
        daemon.client.delete(f"/sandboxes/{again['id']}")


def test_the_next_ranges_user_namespaces_are_made_ahead(daemons: Daemons) -> None:
    """Once it has answered a create, the zygote makes the user namespaces of the range
    above (the next create's, while this one lives): that create finds them made, and the
    zygote leaves no exited child behind (it collects them on SIGCHLD). A daemon of its own:
    its zygote has made no user namespace before."""
    daemon = daemons.new()
    assert _lean_zygote_usernses(daemon) == set()
    first = daemon.create()
    try:
        ahead = _settled_usernses(daemon)
        assert len(ahead) == 4, ahead  # its range's two, and the two of the range above
        second = daemon.create()
        try:
            lives_in = out(daemon, second, "readlink /proc/self/ns/user").strip()
            assert lives_in in ahead
            assert out(daemon, first, "readlink /proc/self/ns/user").strip() != lives_in
            assert out(daemon, second, "stat -c %u:%g /etc/passwd /").split() == ["0:0"] * 2
        finally:
            daemon.client.delete(f"/sandboxes/{second['id']}")
    finally:
        daemon.client.delete(f"/sandboxes/{first['id']}")
    zygote = _lean_zygote(daemon)

    def exited_children() -> list[str]:
        found = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == zygote:
                found.append(f"{stat.parent.name} {fields[0]}")
        return found

    assert wait_for(lambda: not exited_children()), exited_children()


def test_without_its_own_ipc_namespace_its_user_namespace_is_its_own(daemon: Daemon) -> None:
    """In the host's IPC namespace what a sandbox leaves outlives it, charged in its user
    namespace: such a sandbox gets new user namespaces, never ones kept for its range."""
    box = daemon.create(namespaces=["pid", "mnt", "uts", "net", "user"])
    try:
        lives_in = out(daemon, box, "readlink /proc/self/ns/user").strip()
        assert lives_in.startswith("user:[")
        assert lives_in not in _lean_zygote_usernses(daemon)
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


def test_host_is_seen_only_as_an_unprivileged_user_would(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    result = daemon.sh(box["id"], "cat /etc/shadow")
    assert result["exit_code"] != 0
    for path in ("/root", "/home", "/var", "/run", "/srv", "/mnt", "/opt", "/tmp"):
        assert out(daemon, box, f"ls -A {path} | wc -l").strip() == "0", path
    for path in (daemon.state_dir, daemon.run_dir, daemon.root, daemon.state_dir / "sandboxd.db"):
        assert daemon.sh(box["id"], f"ls {path}")["exit_code"] != 0, path
    for path in (daemon.state_dir / "sandboxd.db", daemon.run_dir / "sandboxd.sock"):
        assert daemon.sh(box["id"], f"test -e {path}")["exit_code"] == 1, path


def test_host_files_only_as_an_unprivileged_user_reads_them(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    """Root inside holds no power over host files of other owners (polkit's private rules,
    say): the base is idmapped with host root alone, so theirs show as nobody's."""
    secret = Path("/usr/share/sbx-test-secret")
    secret.mkdir(mode=0o700)
    try:
        os.chown(secret, 997, 997)
        (secret / "key").write_text("s3cret")
        other = daemon.create()
        try:
            listing = daemon.sh(other["id"], f"ls {secret}; cat {secret}/key")
            assert listing["exit_code"] != 0 and "s3cret" not in listing["stdout"]
            owner = daemon.sh(other["id"], f"stat -c %u {secret}")["stdout"].strip()
            assert owner == "65534"
        finally:
            daemon.client.delete(f"/sandboxes/{other['id']}")
    finally:
        (secret / "key").unlink()
        secret.rmdir()


def test_writes_land_in_its_private_layer(daemon: Daemon, box: dict[str, Any]) -> None:
    hosts_before = Path("/etc/hosts").read_bytes()
    out(daemon, box, "echo 10.1.2.3 evil >> /etc/hosts; echo hi > /usr/bin/sbx-newfile")
    assert "evil" in out(daemon, box, "cat /etc/hosts")
    assert Path("/etc/hosts").read_bytes() == hosts_before
    assert not Path("/usr/bin/sbx-newfile").exists()
    other = daemon.create()
    try:
        assert daemon.sh(other["id"], "cat /usr/bin/sbx-newfile")["exit_code"] != 0
        assert "evil" not in out(daemon, other, "cat /etc/hosts")
    finally:
        daemon.client.delete(f"/sandboxes/{other['id']}")


def test_proc_sys_dev_tmp(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "readlink /proc/self").strip().isdigit()
    sys_line = out(daemon, box, "grep ' /sys ' /proc/self/mountinfo")
    assert " ro," in sys_line or " ro " in sys_line
    assert daemon.sh(box["id"], "touch /sys/x")["exit_code"] != 0
    dev = sorted(out(daemon, box, "ls -A /dev").split())
    expected = ["fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin",
                "stdout", "tty", "urandom", "zero"]  # fmt: skip
    assert dev == expected
    assert out(daemon, box, "head -c 4 /dev/zero | od -An -tx1").split() == ["00"] * 4
    assert out(daemon, box, "echo x > /dev/null && echo ok").strip() == "ok"
    assert "tmpfs" in out(daemon, box, "grep ' /tmp ' /proc/self/mountinfo")


def test_host_mount_propagation_is_cut(daemon: Daemon, box: dict[str, Any]) -> None:
    mountinfo = out(daemon, box, "cat /proc/self/mountinfo")
    assert "shared:" not in mountinfo and "master:" not in mountinfo


def test_bind_mounts_read_only_by_default_and_idmapped(daemon: Daemon, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "hello.txt").write_text("from the host\n")
    box = daemon.create(
        mounts=[
            {"source": str(data), "target": "/data"},
            {"source": str(data), "target": "/rw", "read_only": False},
        ]
    )
    try:
        assert out(daemon, box, "cat /data/hello.txt") == "from the host\n"
        assert out(daemon, box, "stat -c %u /data/hello.txt").strip() == "0"
        assert daemon.sh(box["id"], "touch /data/new")["exit_code"] != 0
        out(daemon, box, "echo written > /rw/new")
        assert (data / "new").read_text() == "written\n"
        assert (data / "new").stat().st_uid == 0  # root inside wrote it as host root, idmapped
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


def test_without_user_namespace_root_is_host_root(daemon: Daemon) -> None:
    box = daemon.create(namespaces=["pid", "mnt", "ipc", "uts", "net"])
    try:
        assert out(daemon, box, "cat /proc/self/uid_map").split() == ["0", "0", "4294967295"]
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


def test_host_network_mode_sees_host_interfaces(daemon: Daemon) -> None:
    box = daemon.create(namespaces=["pid", "mnt", "ipc", "uts", "user"], network={"mode": "host"})
    try:
        inside = set(out(daemon, box, "ls /sys/class/net").split())
        assert inside == set(os.listdir("/sys/class/net"))
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


def test_orphans_are_reaped(daemon: Daemon, box: dict[str, Any]) -> None:
    script = "for i in $(seq 40); do (sleep 0.2 &) ; done; echo started"
    assert out(daemon, box, script).strip() == "started"

    def zombies() -> str:
        return out(daemon, box, "grep -l '^State:.*Z' /proc/[0-9]*/status 2>/dev/null; true")

    def settled() -> bool:
        return not zombies().strip() and "sleep" not in out(daemon, box, "ps -e -o comm=")

    assert wait_for(settled, timeout=3), zombies()
