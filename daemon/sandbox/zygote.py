"""The zygote: a warm, thread-free Python process that forks one supervisor per sandbox.

Runs in: a child of the daemon, started once as a fresh interpreter (`python -m
daemon.sandbox.zygote FD RUN_DIR`), host root in every host namespace, with no threads, so that
fork is safe
and a new supervisor costs a fork, not an interpreter start. It reads SPAWN messages on the
socket FD and answers each with SPAWNED or SETUP_ERROR (daemon/protocol.py draws the exchange).
It exits when the daemon closes the socket, or dies.
"""

from __future__ import annotations

import contextlib
import encodings
import errno
import gc
import importlib.machinery
import linecache
import os
import resource
import signal
import socket
import sys

from daemon.linux import cgroups, syscalls
from daemon.protocol import (
    NATIVE,
    NET,
    SETUP_REPORT_WAIT,
    SUPERVISOR_ERROR_FILE,
    Message,
    SetupError,
    Spawned,
    SpawnRequest,
    decode,
    encode,
)
from daemon.sandbox import build, hardening, native
from daemon.sandbox.supervisor import Supervisor, install_signal_handlers

OOM_SCORE_SUPERVISOR = -1000  # never chosen by the OOM killer

# A sandbox's two user namespaces, made once per uid range and kept: the one its processes
# live in (0..65535 inside = its range) and the one its base layers are idmapped through (0
# inside = its uid base alone). A create whose range was used before forks no throwaway
# child to make them. Sharing one with the range's earlier sandboxes is safe because a user
# namespace keeps nothing of a process once the process is gone, and a sandbox can give it
# nothing that lasts: every other namespace of a sandbox is made new and owned by the host's,
# and the keyring calls, the one way to leave state in a user namespace, are denied by the
# seccomp filter (daemon/sandbox/hardening.py). A sandbox without an IPC namespace of its own
# gets new ones, used once: its SysV objects and message queues outlive it in the host's,
# charged in its user namespace. A range is handed out again only once its last sandbox's
# cgroup is empty (the teardown's release step). Bounded, the least recently used let go
# first: each is an fd (a quarter of the fds the zygote may open at most), and B closes all
# but its own.
_FDS = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
_USERNS_MAX = 512 if _FDS == resource.RLIM_INFINITY else max(2, min(512, _FDS // 4))
_usernses: dict[tuple[int, int], int] = {}  # (uid base, count) -> fd


def main() -> None:
    syscalls.prctl(syscalls.PR_SET_PDEATHSIG, signal.SIGKILL)
    syscalls.set_name("sandboxd-zygote")
    signal.signal(signal.SIGCHLD, _reap)
    conn = socket.socket(fileno=int(sys.argv[1]))
    # The seccomp filter is compiled here, once: a sandboxed process only loads it.
    hardening.prepare()
    if sys.argv[3:] == [NET]:  # this one builds bridged sandboxes: netlink, warm
        import pyroute2  # noqa: F401
    # Everything a supervisor needs is imported; freezing keeps forks from touching (and so
    # copying) the pages of these objects when the collector runs in a child.
    gc.freeze()
    with conn.makefile("rb") as requests:
        for line in requests:
            reply: Spawned | SetupError
            try:
                request = decode(line)
                if not isinstance(request, SpawnRequest):
                    raise TypeError(f"a zygote takes SPAWN, not {request.TYPE}")
                reply = spawn(request, conn.fileno())
            except Exception as exc:
                reply = SetupError.of("zygote", exc)
            conn.sendall(encode(reply))
            if isinstance(request, SpawnRequest):
                _prepare_next(request)


def _reap(_signum: int = 0, _frame: object = None) -> None:
    """SIGCHLD: collect every child that has exited. The zygote never waits for one (A once
    it has answered, a user namespace's throwaway holder once its maps are written): a
    Python child's exit, its address space torn down, takes a millisecond or more."""
    for _child in syscalls.exited_children():
        pass


def _prepare_next(req: SpawnRequest) -> None:
    """With the answer sent, make the user namespaces of the range the next sandbox will
    most likely get, so that its create does not wait for their two throwaway forks. A
    range nobody holds yet: made as its first holder's would be, used by nobody before."""
    if req.next_uid_base is None or "ipc" not in req.namespaces:
        return
    with contextlib.suppress(OSError):
        for count in (req.id_range, 1):
            if (req.next_uid_base, count) not in _usernses:
                _userns(req.next_uid_base, count)


def spawn(req: SpawnRequest, zygote_fd: int) -> Spawned | SetupError:
    """Fork A, which forks B (the supervisor): B's host pid and start time, or why not."""
    fresh: list[int] = []  # made for this sandbox alone, closed here once A has them
    try:
        return _spawn(req, zygote_fd, fresh)
    finally:
        for fd in fresh:
            os.close(fd)


def _spawn(req: SpawnRequest, zygote_fd: int, fresh: list[int]) -> Spawned | SetupError:
    usernses: tuple[int | None, int | None] = (None, None)
    if req.uid_base is not None:
        try:
            if "ipc" in req.namespaces:
                usernses = (_userns(req.uid_base, req.id_range), _userns(req.uid_base, 1))
            else:
                # In the host's IPC namespace what it leaves (SysV objects, message queues)
                # outlives it, charged in its user namespace: never one its successor gets.
                fresh.append(build.create_user_namespace(req.uid_base, req.id_range))
                fresh.append(build.create_user_namespace(req.uid_base, 1))
                usernses = (fresh[0], fresh[1])
        except OSError as exc:
            return SetupError.of("user namespace", exc)
    setup_r, setup_w = os.pipe2(os.O_CLOEXEC)
    # A is born in the sandbox's init leaf: from its first instruction, it and all it forks
    # are the sandbox's (and, on cgroup v2, under its limits).
    pid, joined = cgroups.fork_into(f"{req.cgroup}/{cgroups.INIT_LEAF}")
    if pid == 0:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # B is A's to know of, not _reap's
        os.close(setup_r)
        os.close(zygote_fd)
        _intermediate(req, setup_w, joined, usernses)
    os.close(setup_w)
    try:
        # A's one line, not its exit: SIGCHLD collects A (_reap) once it is gone.
        answer = _read_line(setup_r)
    finally:
        os.close(setup_r)
    if not answer:
        return SetupError("fork", None, "the sandbox's first process died without a word")
    reply = decode(answer)
    if not isinstance(reply, Spawned | SetupError):
        raise TypeError(f"A answered {reply.TYPE}")
    return reply


def _read_line(fd: int) -> bytes:
    """One message from a pipe: up to its newline, or whatever came before EOF."""
    chunks = []
    while True:
        chunk = os.read(fd, 65536)
        chunks.append(chunk)
        if not chunk or chunk.endswith(b"\n"):
            return b"".join(chunks)


def _userns(uid_base: int, count: int) -> int:
    """The fd of the user namespace mapping 0..count-1 to uid_base.., made on first use."""
    fd = _usernses.pop((uid_base, count), None)
    if fd is None:
        while _usernses and len(_usernses) >= _USERNS_MAX:  # the least recently used first
            os.close(_usernses.pop(next(iter(_usernses))))
        fd = build.create_user_namespace(uid_base, count)
    _usernses[uid_base, count] = fd  # the most recently used, last
    return fd


def _send(fd: int, message: Message) -> None:
    os.write(fd, encode(message))  # one write under PIPE_BUF: whole, never interleaved


def _intermediate(
    req: SpawnRequest, setup_w: int, joined: bool, usernses: tuple[int | None, int | None]
) -> None:
    """A, a fork of the zygote, host root in host namespaces: steps 1-5 of daemon.sandbox.build."""
    step = "cgroups"
    try:
        # Before anything else, into the rest of the sandbox's cgroups (a v1 host's
        # hierarchies: their limits bound it from here on).
        if not joined:
            cgroups.write_file(f"{req.cgroup}/{cgroups.INIT_LEAF}/cgroup.procs", b"0")
        for path in req.join:
            # Its one thread through `tasks`, not cgroup.procs: moving the current thread alone
            # skips the kernel's global threadgroup lock, whose first taker after a quiet
            # moment waits out an RCU grace period (7 ms a create here, 0.4 ms this way). A is
            # a fork of the thread-free zygote: its one thread is all of it.
            cgroups.write_file(f"{path}/tasks", b"0")
        cgroup_fds = cgroups.SandboxCgroups.open(req.cgroup, req.memory_cgroup, req.memory_per_exec)
        step = "supervisor socket"
        listener = build.listen_supervisor_socket(req.run_dir)
        run_fd = os.open(req.run_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        # The main command's log, in the state directory: held open, as B cannot reach it later.
        log_fd = None
        if req.log_dir is not None:
            log_fd = os.open(req.log_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        host_netlink = build.open_host_netlink(req)  # before the unshare: stays on the host
        step = "namespaces"
        build.unshare_namespaces(req)
        step = "network"
        if host_netlink is not None:
            with host_netlink:
                build.plug_network(req, host_netlink)
        # B's pivot_root moves our root too (we share its mount namespace): keep the host's /proc.
        proc_fd = os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        step = "fork"
        pid = os.fork()
        if pid == 0:
            os.close(setup_w)  # B reports to the daemon itself (see _supervisor)
            _supervisor(req, listener, run_fd, cgroup_fds, usernses, log_fd)
        # B is our child: until we exit, its pid cannot name another process.
        start = syscalls.process_start_time(pid, proc_fd)
        if start is None:
            raise OSError(errno.ECHILD, "the supervisor died at once")
        _send(setup_w, Spawned(pid, start))
        os._exit(0)
    except BaseException as exc:
        _send(setup_w, SetupError.of(step, exc))
        os._exit(1)


def _supervisor(
    req: SpawnRequest,
    listener: socket.socket,
    run_fd: int,
    cgroup_fds: cgroups.SandboxCgroups,
    usernses: tuple[int | None, int | None],
    log_fd: int | None = None,
) -> None:
    """B, PID 1 of the new PID namespace, host root: steps 6-11, then the supervisor's loop."""
    userns_fd, base_userns_fd = usernses
    step = "supervisor"
    try:
        keep = {listener.fileno(), run_fd, *cgroup_fds.fds()}
        keep.update(fd for fd in (*usernses, log_fd) if fd is not None)
        _detach_stdio()
        syscalls.close_all_but(keep)
        # Not dumpable: no process inside may ptrace it or open its /proc/1 files.
        syscalls.prctl(syscalls.PR_SET_DUMPABLE, 0)
        # Under a memory limit the OOM killer should pick the sandbox's processes, never its
        # PID 1 (each exec sets its own score back to 0). Lowering a score takes
        # CAP_SYS_RESOURCE, which some hosts withhold even from root: then it stays 0, and the
        # supervisor (a few MiB) is chosen only if it is the largest process left.
        with contextlib.suppress(PermissionError), open("/proc/self/oom_score_adj", "w") as f:
            f.write(str(OOM_SCORE_SUPERVISOR))
        syscalls.set_name("sandboxd-sup")
        # The native PID 1 lies on the host: opened now, as pivot_root hides it.
        binary_fd = native.open_binary() if req.supervisor == NATIVE else None
        step = "root"
        ptmx_fd = build.build_root(req, userns_fd, base_userns_fd)
        if base_userns_fd is not None:
            os.close(base_userns_fd)
        _lock_imports()
        step = "loopback"
        if "net" in req.namespaces:
            build.configure_network()
        # After the sysctls: /proc/sys becomes read-only here.
        step = "kernel files"
        hardening.protect_kernel_files(req.uid_base or 0)
        step = "supervisor"
        if binary_fd is not None:
            _exec_native(req, binary_fd, listener, run_fd, cgroup_fds, userns_fd, ptmx_fd, log_fd)
        wakeup_r = install_signal_handlers()
        supervisor = Supervisor(
            req, listener, run_fd, cgroup_fds, userns_fd, ptmx_fd, wakeup_r, log_fd
        )
    except BaseException as exc:
        # No traceback: formatting one reads source files, and the root is the sandbox's now.
        invalid = isinstance(exc, build.InvalidMount)
        _report_setup_error(listener, SetupError.of(step, exc, invalid=invalid))
        os._exit(1)
    try:
        supervisor.run()
    except BaseException as exc:
        _report(run_fd, SUPERVISOR_ERROR_FILE, f"{type(exc).__name__}: {exc}")
    finally:
        os._exit(1)


def _exec_native(
    req: SpawnRequest,
    binary_fd: int,
    listener: socket.socket,
    run_fd: int,
    cgroup_fds: cgroups.SandboxCgroups,
    userns_fd: int | None,
    ptmx_fd: int,
    log_fd: int | None,
) -> None:
    """B becomes the native PID 1 (daemon/sandbox/native/sandboxd-init.c): the same fds
    and request, and the filter this zygote compiled. Returns only by raising OSError."""
    config = {
        "listener": listener.fileno(),
        "run": run_fd,
        "tree": cgroup_fds.tree,
        "memory": cgroup_fds.memory,
        "memory_per_exec": cgroup_fds.memory_per_exec,
        "userns": userns_fd,
        "ptmx": ptmx_fd,
        "log": log_fd,
        "uid_base": req.uid_base,
        "id_range": req.id_range,
        "output_limit": req.output_limit,
        "log_limit": req.log_limit,
        "keep_caps": hardening.KEPT_MASK,
        "cap_last": hardening.last_capability(),
        "cmd": req.cmd,
        "env": req.env,
    }
    fds = [listener.fileno(), run_fd, *cgroup_fds.fds(), ptmx_fd]
    fds += [fd for fd in (userns_fd, log_fd) if fd is not None]
    native.become(binary_fd, config, hardening.program_bytes(), fds)


def _lock_imports() -> None:
    """After pivot_root every path Python would import from lies in the sandbox's writable
    root: a lazy import, a codec lookup or a traceback's source line would run or read what
    root inside planted, as host root. Leave Python only its built-in and frozen modules.
    """
    sys.path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.meta_path[:] = [
        finder
        for finder in sys.meta_path
        if finder in (importlib.machinery.BuiltinImporter, importlib.machinery.FrozenImporter)
    ]
    encodings.__path__ = []
    linecache.clearcache()
    linecache.getline = lambda *args, **kwargs: ""


def _report_setup_error(listener: socket.socket, error: SetupError) -> None:
    """B's setup failed: tell the daemon in place of HELLO, on its connection (it connects
    once the zygote has answered), or nobody if it does not come in time."""
    with contextlib.suppress(OSError):
        listener.settimeout(SETUP_REPORT_WAIT)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(SETUP_REPORT_WAIT)
            conn.sendall(encode(error))


def _report(run_fd: int, name: str, message: str) -> None:
    """Leave a message in the mailbox: the supervisor has no stderr worth the name."""
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=run_fd)
    try:
        os.write(fd, message.encode(errors="replace"))
    finally:
        os.close(fd)


def _detach_stdio() -> None:
    """The daemon's stdout may be a terminal or a test's pipe: a supervisor outlives both."""
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


if __name__ == "__main__":
    main()
