"""Turning a fork of the supervisor into the process an exec asked for.

Runs in: a child of the supervisor, in every namespace of the sandbox except (until step 3)
its user namespace, still host root. It never returns: it execs, or exits 126/127 with the
reason on stderr, as a shell would (and as tini reports). What it execs keeps Docker's default
capabilities at most, with no_new_privs and the seccomp filter (daemon/sandbox/hardening.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import signal
import stat
import termios

from daemon.linux import cgroups
from daemon.linux import syscalls as sc
from daemon.protocol import ExecRequest
from daemon.sandbox import hardening

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
_PASSWD_LIMIT = 1 << 20
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 is no id


def become(
    req: ExecRequest,
    stdio: tuple[int, int, int],
    sandbox_cgroups: cgroups.SandboxCgroups,
    userns_fd: int | None,
    joined: bool = True,
    id_range: int = 65536,
) -> None:
    """Child, in the sandbox, host root: set up the process and exec it. Never returns."""
    code = EXIT_NOT_EXECUTABLE
    try:
        # 0. Into the exec's own cgroups first, so that its deadline reaches all it will start
        #    and an OOM kill among them is counted as its own; and back to an OOM score of 0
        #    (the supervisor's keeps the OOM killer off it). As host root: a process inside
        #    cannot lower it again.
        if not joined:  # born in it (clone3), unless the kernel could not
            sandbox_cgroups.join_leaf(req.id)
        score = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
        os.write(score, b"0")
        os.close(score)
        # 1. Python ignores SIGPIPE and SIGXFSZ and we block nothing: hand over clean defaults.
        signal.set_wakeup_fd(-1)
        for sig in signal.valid_signals():
            # getsignal is Python's own table, no syscall: only what was changed is set back.
            if sig not in (signal.SIGKILL, signal.SIGSTOP) and signal.getsignal(sig) not in (
                signal.SIG_DFL,
                None,
            ):
                with contextlib.suppress(OSError, ValueError):
                    signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        # 2. A session of its own, its own process group; a terminal if it asked for one.
        os.setsid()
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        if req.tty:
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)
        # 3. Into the sandbox's user namespace, first as root inside, to read its passwd.
        if userns_fd is not None:
            sc.setns(userns_fd, sc.CLONE_NEWUSER)
            os.setgroups([])
            os.setresgid(0, 0, 0)
            os.setresuid(0, 0, 0)
        # Docker's default capabilities only; now, while root: another uid could not drop them.
        hardening.drop_capabilities()
        gid, home = _passwd_entry(req.uid)
        gid = req.gid if req.gid is not None else gid
        # Ids the user namespace maps only: a gid of 4294967295 in /etc/passwd is (gid_t)-1,
        # "no change" to setresgid, which would leave the exec in group 0.
        max_id = id_range - 1 if userns_fd is not None else _MAX_ID
        if not (0 <= req.uid <= max_id and 0 <= gid <= max_id):
            raise ValueError(f"credentials: uid {req.uid} or gid {gid} is out of 0..{max_id}")
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(req.uid, req.uid, req.uid)
        # 4. Nothing of the supervisor's may reach the process: only 0, 1 and 2 stay open.
        sc.close_range(3)
        env = {"PATH": DEFAULT_PATH, "HOME": home, **req.env}
        try:
            os.chdir(req.cwd)
        except OSError as exc:
            _fail(f"cannot change to directory {req.cwd}: {exc.strerror}")
        # 5. Last: no_new_privs and the seccomp filter.
        hardening.restrict_syscalls()
        code = EXIT_NOT_FOUND
        _execute(req.cmd, env)
    except BaseException as exc:
        _fail(f"cannot start {req.cmd[0] if req.cmd else ''}: {exc}", code)
    finally:
        os._exit(code)


def _execute(argv: list[str], env: dict[str, str]) -> None:
    """execvpe, telling 'not found' (127) from 'found but not executable' (126)."""
    name = argv[0]
    if "/" in name:
        candidates = [name]
    else:
        candidates = [
            os.path.join(d or ".", name) for d in env.get("PATH", DEFAULT_PATH).split(":")
        ]
    denied: OSError | None = None
    for path in candidates:
        try:
            os.execve(path, argv, env)
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.ENOTDIR, errno.ENAMETOOLONG):
                denied = denied or exc
    if denied is not None:
        _fail(f"{name}: {denied.strerror}", EXIT_NOT_EXECUTABLE)
    _fail(f"{name}: command not found", EXIT_NOT_FOUND)


def _passwd_entry(uid: int) -> tuple[int, str]:
    """The uid's primary gid and home from the sandbox's /etc/passwd; else (uid, "/")."""
    default = (uid, "/root" if uid == 0 else "/")
    try:
        # Non-blocking and regular files only: root inside could have made it a FIFO.
        fd = os.open("/etc/passwd", os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return default
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return default
        data = os.read(fd, _PASSWD_LIMIT).decode(errors="replace")
    finally:
        os.close(fd)
    for line in data.splitlines():
        fields = line.split(":")
        if len(fields) >= 7 and fields[2] == str(uid) and fields[3].isdigit():
            return int(fields[3]), fields[5] or "/"
    return default


def _fail(message: str, code: int = EXIT_NOT_EXECUTABLE) -> None:
    try:
        os.write(2, f"sandboxd: {message}\n".encode(errors="replace"))
    finally:
        os._exit(code)
