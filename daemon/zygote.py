"""The zygote: a warm, thread-free Python process that forks one supervisor per sandbox.

Runs in: a child of the daemon, started once as a fresh interpreter (`python -m
daemon.zygote FD RUN_DIR`), host root in every host namespace, with no threads, so that fork is safe
and a new supervisor costs a fork, not an interpreter start. It reads SpawnRequests on the
socket FD, one JSON line each, and answers each with {"pid": B} or {"error": text}. It exits
when the daemon closes the socket, or dies.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys
import traceback

from daemon import setup, syscalls
from daemon.protocol import SETUP_ERROR_FILE, SpawnRequest
from daemon.supervisor import Supervisor, install_signal_handlers


def main() -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    syscalls.set_name("sandboxd-zygote")
    conn = socket.socket(fileno=int(sys.argv[1]))
    # Everything a supervisor needs is imported; freezing keeps forks from touching (and so
    # copying) the pages of these objects when the collector runs in a child.
    gc.freeze()
    with conn.makefile("rb") as requests:
        for line in requests:
            reply: dict[str, int | str]
            try:
                reply = {"pid": spawn(SpawnRequest.from_json(line), conn.fileno())}
            except Exception as exc:
                reply = {"error": f"{type(exc).__name__}: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")


def spawn(req: SpawnRequest, zygote_fd: int) -> int:
    """Fork A, which forks B (the supervisor); return B's host pid."""
    report_r, report_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(report_r)
        os.close(zygote_fd)
        _intermediate(req, report_w)
    os.close(report_w)
    try:
        with os.fdopen(report_r, "rb") as report:
            answer = report.read().decode()
    finally:
        os.waitpid(pid, 0)
    if not answer.isdigit():
        raise OSError(answer or "the sandbox's first process died without a word")
    return int(answer)


def _intermediate(req: SpawnRequest, report_w: int) -> None:
    """A, a fork of the zygote, host root in host namespaces: steps 1-5 of daemon.setup."""
    try:
        userns_fd = None
        if req.uid_base is not None:
            userns_fd = setup.create_user_namespace(req.uid_base, req.id_range)
        listener = setup.listen_supervisor_socket(req.run_dir)
        run_fd = os.open(req.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        host_netlink = setup.open_host_netlink(req)  # before the unshare: stays on the host
        setup.unshare_namespaces(req)
        if host_netlink is not None:
            with host_netlink:
                setup.plug_network(req, host_netlink)
        pid = os.fork()
        if pid == 0:
            _supervisor(req, listener, run_fd, userns_fd)
        os.write(report_w, str(pid).encode())
        os._exit(0)
    except BaseException as exc:
        os.write(report_w, f"{type(exc).__name__}: {exc}".encode(errors="replace"))
        os._exit(1)


def _supervisor(
    req: SpawnRequest, listener: socket.socket, run_fd: int, userns_fd: int | None
) -> None:
    """B, PID 1 of the new PID namespace, host root: steps 6-10, then the supervisor's loop."""
    try:
        keep = {listener.fileno(), run_fd} | ({userns_fd} if userns_fd is not None else set())
        _detach_stdio()
        for fd in _open_fds():
            if fd > 2 and fd not in keep:
                with contextlib.suppress(OSError):
                    os.close(fd)
        # Not dumpable: no process inside may ptrace it or open its /proc/1 files.
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        syscalls.set_name("sandboxd-sup")
        setup.build_root(req, userns_fd)
        if "net" in req.namespaces:
            setup.configure_network()
        wakeup_r = install_signal_handlers()
        supervisor = Supervisor(req, listener, run_fd, userns_fd, wakeup_r)
    except BaseException as exc:
        message = f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        fd = os.open(SETUP_ERROR_FILE, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=run_fd)
        os.write(fd, message.encode(errors="replace"))
        os._exit(1)
    try:
        supervisor.run()
    finally:
        os._exit(1)


def _detach_stdio() -> None:
    """The daemon's stdout may be a terminal or a test's pipe: a supervisor outlives both."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _open_fds() -> list[int]:
    return [int(name) for name in os.listdir("/proc/self/fd")]


if __name__ == "__main__":
    main()
