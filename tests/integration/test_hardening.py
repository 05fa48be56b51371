"""What root inside must not do (daemon/sandbox/hardening.py), checked from inside a real sandbox
and,
where it shows, from the host: capabilities, no_new_privs, the seccomp filter, masked and
read-only kernel files, file descriptors, the supervisor out of reach, cwd kept inside."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon, wait_for

PROBE = (Path(__file__).resolve().parent.parent / "syscall_probe.py").read_text()
DOCKER_CAPABILITIES = "00000000a80425fb"
CAP_SYS_ADMIN = 21
CLOCK_NANOSLEEP = 230  # x86_64


@pytest.fixture(scope="module")
def box(daemon: Daemon) -> dict[str, Any]:
    return daemon.create(name="hardening")


def out(daemon: Daemon, box: dict[str, Any], script: str, **body: Any) -> str:
    result = daemon.sh(box["id"], script, **body)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def fails(daemon: Daemon, box: dict[str, Any], script: str, **body: Any) -> str:
    """Run a script that must fail; its stderr."""
    result = daemon.sh(box["id"], script, **body)
    assert result["exit_code"] != 0, result
    return str(result["stderr"])


def status_fields(text: str) -> dict[str, str]:
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def host_children(supervisor: int) -> dict[str, int]:
    """comm → host pid of the supervisor's children."""
    children = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            name, fields = Path(f"/proc/{pid}/stat").read_text().split("(", 1)[1].rsplit(")", 1)
        except OSError:
            continue
        if int(fields.split()[1]) == supervisor:
            children[name] = int(pid)
    return children


def sleeping_child(supervisor: int) -> int:
    """Host pid of the supervisor's `sleep` child once it sleeps. Its name changes at execve,
    before the dynamic loader opens the libraries (as fd 3, for a moment): wait for its
    clock_nanosleep."""

    def sleeping() -> int | None:
        pid = host_children(supervisor).get("sleep")
        syscall = Path(f"/proc/{pid}/syscall").read_text().split()[0] if pid else None
        return pid if syscall == str(CLOCK_NANOSLEEP) else None

    pid = wait_for(sleeping)
    assert pid, "no sleeping child"
    return int(pid)


def test_root_has_dockers_capabilities_no_new_privs_and_seccomp(
    daemon: Daemon, box: dict[str, Any]
) -> None:
    fields = status_fields(
        out(daemon, box, "grep -E '^(Cap|NoNewPrivs|Seccomp:)' /proc/self/status")
    )
    assert fields == {
        "CapInh": "0000000000000000",
        "CapPrm": DOCKER_CAPABILITIES,
        "CapEff": DOCKER_CAPABILITIES,
        "CapBnd": DOCKER_CAPABILITIES,
        "CapAmb": "0000000000000000",
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }
    assert not int(fields["CapBnd"], 16) & (1 << CAP_SYS_ADMIN)


def test_another_user_has_no_capabilities(daemon: Daemon, box: dict[str, Any]) -> None:
    script = "grep -E '^(CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp:)' /proc/self/status"
    fields = status_fields(out(daemon, box, script, user="1000"))
    assert fields == {
        "CapPrm": "0000000000000000",
        "CapEff": "0000000000000000",
        "CapBnd": DOCKER_CAPABILITIES,
        "NoNewPrivs": "1",
        "Seccomp": "2",
    }


def test_the_main_command_is_hardened_too(daemon: Daemon) -> None:
    box = daemon.create(cmd=["sleep", "60"])
    try:
        host_pid = sleeping_child(box["pid"])
        fields = status_fields(Path(f"/proc/{host_pid}/status").read_text())
        assert (fields["NoNewPrivs"], fields["Seccomp"]) == ("1", "2")
        assert fields["CapBnd"] == DOCKER_CAPABILITIES
        assert sorted(os.listdir(f"/proc/{host_pid}/fd")) == ["0", "1", "2"]
    finally:
        daemon.client.delete(f"/sandboxes/{box['id']}")


@pytest.mark.parametrize("user", ["0", "1000"])
def test_denied_syscalls_fail_with_eperm(daemon: Daemon, box: dict[str, Any], user: str) -> None:
    # tests/daemon/test_hardening.py shows that each of these gets another answer unfiltered.
    result = daemon.exec(box["id"], ["python3", "-"], stdin=PROBE, user=user)
    assert result["exit_code"] == 0, result
    results = json.loads(result["stdout"])
    results.pop("status")
    assert results == {name: errno.ENOSYS if name == "clone3" else errno.EPERM for name in results}


def test_what_root_inside_does_every_day_still_works(daemon: Daemon, box: dict[str, Any]) -> None:
    # Threads: glibc tries clone3 first and falls back to clone on its ENOSYS.
    threads = "import threading as t; w = t.Thread(target=print, args=('ok',)); w.start(); w.join()"
    assert out(daemon, box, f'python3 -c "{threads}"') == "ok\n"
    script = "touch /tmp/own && chown 1000:1000 /tmp/own && stat -c %u:%g /tmp/own && mkfifo /tmp/q"
    assert out(daemon, box, script) == "1000:1000\n"
    assert out(daemon, box, "sleep 5 & kill $!; wait $!; echo $?") == "143\n"  # SIGTERM'd


def test_mount_unshare_and_keyctl_fail(daemon: Daemon, box: dict[str, Any]) -> None:
    assert "permission denied" in fails(daemon, box, "mount -t tmpfs none /mnt")
    assert " /mnt " not in Path(f"/proc/{box['pid']}/mountinfo").read_text()
    assert "Operation not permitted" in fails(daemon, box, "unshare -U true")
    fails(daemon, box, "umount /tmp")
    if daemon.sh(box["id"], "command -v keyctl")["exit_code"] == 0:
        fails(daemon, box, "keyctl show @s")


def test_masked_kernel_files_show_nothing(daemon: Daemon, box: dict[str, Any]) -> None:
    checked = []
    for path in ("/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/interrupts"):
        if os.path.exists(path):
            assert out(daemon, box, f"wc -c < {path}").strip() == "0", path
            checked.append(path)
        else:  # the same kernel: no such file inside either
            fails(daemon, box, f"test -e {path}")
    assert Path("/proc/timer_list").read_text() and "/proc/timer_list" in checked
    assert os.listdir("/sys/firmware")
    assert out(daemon, box, "ls -A /sys/firmware") == ""
    fails(daemon, box, "touch /sys/firmware/x")


def test_proc_sys_and_its_kin_are_read_only(daemon: Daemon, box: dict[str, Any]) -> None:
    error = fails(daemon, box, "echo 1 > /proc/sys/kernel/ns_last_pid")
    assert "Read-only file system" in error
    mountinfo = out(daemon, box, "cat /proc/self/mountinfo").splitlines()
    for path in ("/proc/sys", "/proc/irq", "/proc/bus", "/proc/fs", "/proc/sysrq-trigger"):
        if os.path.exists(path):
            (line,) = [m for m in mountinfo if m.split()[4] == path]
            assert line.split()[5].startswith("ro,"), line
    fails(daemon, box, "umount /proc/sys")
    # The sysctls the supervisor sets come first: root inside can still bind port 80.
    assert out(daemon, box, "cat /proc/sys/net/ipv4/ip_unprivileged_port_start") == "0\n"


def test_only_stdio_reaches_a_process(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "ls /proc/self/fd").split() == ["0", "1", "2", "3"]  # 3: ls's own
    started = daemon.exec(box["id"], ["sleep", "30"], wait=False)
    try:
        host_pid = sleeping_child(box["pid"])
        fds = {
            fd: os.readlink(f"/proc/{host_pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{host_pid}/fd")
        }
        assert sorted(fds) == ["0", "1", "2"], fds
    finally:
        daemon.client.post(
            f"/sandboxes/{box['id']}/execs/{started['id']}/signal", json={"signal": "SIGKILL"}
        )


def test_the_supervisor_is_out_of_reach(daemon: Daemon, box: dict[str, Any]) -> None:
    for script in (
        "readlink /proc/1/exe",
        "cat /proc/1/exe > /dev/null",
        "ls /proc/1/fd",
        "ls /proc/1/root/",
        "ls /proc/1/cwd/",
        "cat /proc/1/environ",
        "kill -KILL 1",
    ):
        fails(daemon, box, script)
    attach = "import ctypes; print(ctypes.CDLL(None, use_errno=True).ptrace(16, 1, 0, 0))"
    assert out(daemon, box, f'python3 -c "{attach}"').strip() == "-1"  # PTRACE_ATTACH
    assert out(daemon, box, "cat /proc/1/comm") == "sandboxd-sup\n"


def test_cwd_is_resolved_inside_the_sandbox_root(daemon: Daemon, box: dict[str, Any]) -> None:
    out(daemon, box, "ln -sfn /proc/self/root/../../.. /tmp/up; ln -sfn ../../../../.. /tmp/up2")
    root = out(daemon, box, "stat -c %d:%i /")
    for cwd in ("/tmp/up", "/tmp/up2", "/tmp/up/tmp/up2/proc/self/root"):
        result = daemon.exec(box["id"], ["stat", "-c", "%d:%i", "."], cwd=cwd)
        assert result["stdout"] == root, (cwd, result)
    body = {"cmd": ["pwd"], "cwd": "/../.."}  # refused before it reaches the sandbox
    assert daemon.client.post(f"/sandboxes/{box['id']}/exec", json=body).status_code == 422
    # What could lead out (CVE-2024-21626): a leaked fd, the supervisor's root or cwd.
    for cwd in ("/proc/self/fd/3", "/proc/1/cwd", "/proc/1/root", str(daemon.state_dir)):
        result = daemon.exec(box["id"], ["pwd"], cwd=cwd)
        assert result["exit_code"] == 126, (cwd, result)


def test_a_setuid_file_gains_nothing(daemon: Daemon, box: dict[str, Any]) -> None:
    mode = out(
        daemon,
        box,
        "cp /usr/bin/cat /usr/bin/scat; chmod 4755 /usr/bin/scat; stat -c %A%u /usr/bin/scat",
    )
    assert mode == "-rwsr-xr-x0\n"
    usr = out(daemon, box, "grep ' /usr ' /proc/self/mountinfo")
    assert "nosuid" not in usr  # the bit would work here, but for no_new_privs
    script = "/usr/bin/scat /proc/self/status | grep ^Uid"
    assert out(daemon, box, script, user="1000").split() == ["Uid:", "1000", "1000", "1000", "1000"]


def test_setuid_programs_of_usr_gain_nothing(daemon: Daemon, box: dict[str, Any]) -> None:
    assert out(daemon, box, "stat -c %A%u /usr/bin/su") == "-rwsr-xr-x0\n"
    # su waits for a password on a FIFO while we read the uids it runs with.
    script = """
        mkfifo /tmp/password
        su root -c true < /tmp/password & exec 3> /tmp/password
        for i in $(seq 50); do grep -q '^Name:.su' /proc/$!/status && break; sleep 0.1; done
        grep ^Uid /proc/$!/status; kill $!
    """
    assert out(daemon, box, script, user="1000").split() == ["Uid:", "1000", "1000", "1000", "1000"]


def test_the_daemons_files_are_root_only(daemon: Daemon, box: dict[str, Any]) -> None:
    for path in (daemon.state_dir, daemon.run_dir, daemon.run_dir / "sandboxes"):
        st = path.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700), path
    st = daemon.socket.stat()
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o660)
