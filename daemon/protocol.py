"""The protocol between the daemon and a sandbox's supervisor, and the files they share.

Creating a sandbox (the zygote is a warm, thread-free child of the daemon; A and B forks):

  daemon                 zygote              A (host ns, root)     B (PID 1 of the sandbox)
    │ SpawnRequest ──────►│                     │                      │
    │                     │── fork ────────────►│ userns; listen on    │
    │                     │                     │ the socket; unshare; │
    │                     │                     │ fork ───────────────►│ mounts, pivot_root,
    │                     │◄─ B's host pid ─────│ exit                 │ lo up, main cmd
    │◄─ {pid} ────────────│                                            │
    │ connect(supervisor.sock) ───────────────────────────────────────►│ accept
    │◄──────────────────────────────────────────── HELLO {execs} ──────│ (or it exits, leaving
    │                                                                  │  setup_error behind)

Running (one JSON object a line, either way, over supervisor.sock):

    daemon                                      supervisor
      │ EXEC {id, cmd, env, cwd, uid, gid, ...} ───►│ fork, join its cgroups, exec
      │◄──────────────────────── STARTED {id, pid} ─│ (exec failed: EXITED 126/127 next;
      │                                             │  fork failed: pid null, EXITED 126)
      │ SIGNAL {id, signal} ───────────────────────►│ kill(pid)
      │ SUBSCRIBE {id} ────────────────────────────►│ live output from now on:
      │◄──────────────── SUBSCRIBED {id, offsets} ──│ bytes before these are in the files
      │◄──────── OUTPUT {id, stream, offset, data} ─│ (base64; dropped when the daemon lags)
      │ UNSUBSCRIBE {id} ──────────────────────────►│
      │ INPUT {id, data, eof} ─────────────────────►│ to its stdin (pipe or terminal)
      │ RESIZE {id, rows, cols} ───────────────────►│ the terminal's window size
      │ CONFIGURE {hostname, env} ─────────────────►│ a pooled sandbox taken: its host name,
      │                                             │ and the env of every later exec
      │◄─────────────── EXITED {id, status fields} ─│ after status.json is on disk
      │◄──────────────────────── ERROR {id, message}│ a request it could not act on

The supervisor's runtime directory is the durable mailbox: every exec's stdout, stderr and
status.json (written last, atomically) stay there until the daemon has stored them and removed
the exec's directory, so nothing is lost while the daemon is down. A new connection replaces
the old one and gets a fresh HELLO listing what is still running and what finished meanwhile.
When the main cmd ends, its status lands in execs/main/status.json, the supervisor kills every
other process and exits; the daemon reads that file once the supervisor is gone.
"""

from __future__ import annotations

import enum
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from typing import Any

MAIN_EXEC = "main"
SOCKET_NAME = "supervisor.sock"
EXECS_DIR = "execs"
STATUS_FILE = "status.json"
SETUP_ERROR_FILE = "setup_error"
SUPERVISOR_ERROR_FILE = "supervisor_error"
INVALID_PREFIX = "invalid: "  # a setup error that the request's own rootfs or mounts caused
ROOT_DIR = "root"
STAGING_DIR = "staging"
NET = "net"  # the zygote argument that makes it the one for bridged sandboxes


class MessageType(enum.StrEnum):
    HELLO = "hello"
    EXEC = "exec"
    STARTED = "started"
    SIGNAL = "signal"
    EXITED = "exited"
    ERROR = "error"
    SUBSCRIBE = "subscribe"
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBE = "unsubscribe"
    OUTPUT = "output"
    INPUT = "input"
    RESIZE = "resize"
    CONFIGURE = "configure"


def encode(kind: MessageType, **fields: Any) -> bytes:
    return json.dumps({"type": kind.value, **fields}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> tuple[MessageType, dict[str, Any]]:
    """Parse one line; raises ValueError on anything that is not a known message."""
    message = json.loads(line)
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return MessageType(message.pop("type")), message


@dataclass
class Layer:
    """One overlay of the sandbox's root: `lower` (a host path) seen read-only at `target`."""

    lower: str
    target: str
    upper: str
    work: str
    requested: bool = False  # the request's own rootfs: a failure to use it is its fault
    # An image's root: its other layers' directories under `lower` (top first), and all of
    # them idmapped through the sandbox's whole range, so that the image's owners are kept.
    below: list[str] = field(default_factory=list)
    image: bool = False


@dataclass
class BindMount:
    source: str
    target: str
    read_only: bool


@dataclass
class NetworkPlan:
    """A bridged sandbox's link, decided by the daemon: process A makes it
    (daemon/sandbox/build.py)."""

    bridge: str  # the daemon's bridge, in the host's network namespace
    host_ifname: str  # the host end of the veth pair, enslaved to the bridge
    mac: str  # eth0's address, derived from `ip`, so a reused address keeps its MAC
    ip: str
    prefix: int
    gateway: str  # the bridge's own address


@dataclass
class SpawnRequest:
    """Everything the zygote needs to build one sandbox, decided by the daemon beforehand."""

    sandbox_id: str
    hostname: str
    namespaces: list[str]
    uid_base: int | None  # host uid of root inside; None without a user namespace
    run_dir: str  # the sandbox's runtime directory (the mailbox)
    layers: list[Layer]
    mounts: list[BindMount]
    env: dict[str, str]
    cmd: list[str] | None
    output_limit: int
    cgroup: str  # the sandbox's directory in the cgroup2 tree (daemon.linux.cgroups)
    id_range: int = 65536
    # Its cgroups beyond the cgroup2 tree (daemon.linux.limits.Placement): v1 hierarchies A joins
    # with the tree's init leaf; its memory cgroup, which counts OOM kills, and whether each
    # exec's leaf has a count of its own there.
    join: list[str] = field(default_factory=list)
    memory_cgroup: str | None = None
    memory_per_exec: bool = False
    network: NetworkPlan | None = None  # bridge mode; None: only lo (or the host's network)
    # Sizes of its /tmp and /dev/shm (tmpfs each, charged to its memory cgroup); its writable
    # layers lie on a tmpfs the daemon sized before the spawn (daemon/linux/disk.py).
    tmp_bytes: int = 256 << 20
    shm_bytes: int = 64 << 20

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> SpawnRequest:
        raw = json.loads(data)
        raw["layers"] = [Layer(**layer) for layer in raw["layers"]]
        raw["mounts"] = [BindMount(**mount) for mount in raw["mounts"]]
        if raw.get("network") is not None:
            raw["network"] = NetworkPlan(**raw["network"])
        return cls(**raw)


@dataclass
class ExitStatus:
    """How one exec ended, as the supervisor writes it to status.json."""

    exit_code: int | None
    signal: str | None
    timed_out: bool = False
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    finished_at: float = 0.0
    oom_killed: bool = False  # SIGKILL while the exec's memory cgroup counted an OOM kill

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExitStatus:
        return cls(**json.loads(data))


@dataclass
class ExecRequest:
    id: str
    cmd: list[str]
    env: dict[str, str]
    cwd: str
    uid: int
    gid: int | None  # None: the uid's primary group from the sandbox's /etc/passwd
    stdin: str | None = None
    timeout: float | None = None  # seconds; then the exec's whole cgroup gets SIGKILL
    interactive: bool = False  # stdin stays open for INPUT messages
    tty: bool = False  # a pseudo-terminal as stdin, stdout and stderr
    rows: int | None = None
    cols: int | None = None


def exec_dir(run_dir: str, exec_id: str) -> str:
    return os.path.join(run_dir, EXECS_DIR, exec_id)


def valid_exec_id(exec_id: str) -> bool:
    """Exec ids become directory names: allow only what the daemon generates, plus 'main'."""
    return 0 < len(exec_id) <= 64 and all(c.isalnum() or c in "_-" for c in exec_id)


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"SIG{number}"


def short_path(dir_fd: int, name: str) -> str:
    """A path to `name` in the directory `dir_fd` short enough for a unix socket (108 bytes),
    however deep the directory lies: through the fd's magic link in /proc."""
    return f"/proc/self/fd/{dir_fd}/{name}"
