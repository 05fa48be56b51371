"""The protocol between the daemon and the processes that build and run a sandbox (the
zygote, A, and B = the supervisor): typed messages, their one encoding, and the files they share.

Every message is one dataclass below, sent as one JSON object a line with its `type`; encode and
decode here are the only ones, used by both sides. decode refuses what it does not know (a
type, a field too many or too few, a HELLO of another version) with ProtocolError.

Creating a sandbox. Over the zygote's socket (a socketpair the daemon made when it started the
zygote); over a setup pipe the zygote makes for each sandbox (A writes it, the zygote reads it to
its end); over supervisor.sock (listened on by A, accepted by B):

  daemon                 zygote                 A (host ns, root)      B (PID 1 of the sandbox)
    │ SPAWN {SpawnRequest}─►│                      │                      │
    │                       │── fork ─────────────►│ cgroups, user ns,    │
    │                       │                      │ listen, unshare, veth│
    │                       │                      │── fork ─────────────►│ mounts, pivot_root,
    │                       │◄─ SPAWNED {pid,start}│ exit                 │ lo up, hardening
    │◄─ SPAWNED {pid,start} ─│      (setup pipe)                          │
    │ connect(supervisor.sock) ──────────────────────────────────────────►│ accept
    │◄──────────────────────────────── HELLO {version, running, finished} ─│

  or, a step failed (the rest of the exchange does not happen):

    │◄─ SETUP_ERROR ─────────│◄─ SETUP_ERROR ───────│  the zygote or A failed
    │ connect(supervisor.sock) ──────────────────────────────────────────►│ accept
    │◄──────────────────────────────────────────────────── SETUP_ERROR ───│ B failed; exit

Errors: one shape, SETUP_ERROR {step, errno, message, invalid}, in place of the answer the
daemon waits for. A failure in the zygote or in A ends its exchange with SETUP_ERROR instead of
SPAWNED (A writes it to the setup pipe, the zygote relays it); a failure in B's setup with
SETUP_ERROR instead of HELLO (B accepts the daemon's connection only to say it, waiting at most
SETUP_REPORT_WAIT, then exits). The zygote does not wait for B's setup: one slow mount does not
hold up every other create. `step` names the step that failed (daemon/sandbox/build.py), `errno`
the OSError's number if it was one, `message` the exception as "Type: text"; `invalid` says
the request's own rootfs or mounts caused it. The daemon turns it into the API's errors: invalid,
a 422 and nothing stored; else the record ends failed (setup_failed, with the message) and the
client gets SetupFailed, a 500 ("sandbox ID could not be set up: MESSAGE").

Running (over supervisor.sock, either way):

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
      │◄────────────────────── EXITED {id, status} ─│ after status.json is on disk
      │◄──────────────────────── ERROR {id, message}│ a request it could not act on

The version. HELLO carries PROTOCOL_VERSION; it is the one message that needs it, since a
supervisor outlives the daemon that made it, while the zygote is always the daemon's own code.
A daemon adopts a running supervisor (at its start, say after an upgrade) only if its HELLO
has this version: one of another version (those before version 1 sent none) is refused with
ProtocolError. The daemon logs the refusal, kills the sandbox and retires it as it would a
lost supervisor (failed, supervisor_lost), storing what its mailbox already holds. Change the
number with any change to a message the supervisor sends or reads.

The supervisor's runtime directory is the durable mailbox: every exec's stdout, stderr and
status.json (written last, atomically) stay there until the daemon has stored them and removed
the exec's directory, so nothing is lost while the daemon is down. Its layout is not covered by
the version: it must stay readable across versions. A new connection replaces the old one and
gets a fresh HELLO listing what is still running and what finished meanwhile. When the main cmd
ends, its status lands in execs/main/status.json, the supervisor kills every other process and
exits; the daemon reads that file once the supervisor is gone (and supervisor_error, the text
of a supervisor that crashed after its setup, when there is no one to tell).
"""

from __future__ import annotations

import enum
import functools
import json
import os
import signal
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar, TypeVar

PROTOCOL_VERSION = 1
MAIN_EXEC = "main"
SOCKET_NAME = "supervisor.sock"
EXECS_DIR = "execs"
STATUS_FILE = "status.json"
SUPERVISOR_ERROR_FILE = "supervisor_error"
STAGING_DIR = "staging"
NATIVE = "native"  # SpawnRequest.supervisor: B execs daemon/sandbox/native/sandboxd-init
NET = "net"  # the zygote argument that makes it the one for bridged sandboxes
# How long B, its setup failed, waits for the daemon's connection to say so (the daemon
# connects as soon as the zygote has answered, and waits for an answer as long).
SETUP_REPORT_WAIT = 30.0
# One SETUP_ERROR fits in one atomic pipe write (PIPE_BUF, 4096 bytes) with room to spare.
_ERROR_TEXT_LIMIT = 2048


class ProtocolError(ValueError):
    """A line that is not a message of this protocol's version."""


class MessageType(enum.StrEnum):
    SPAWN = "spawn"
    SPAWNED = "spawned"
    SETUP_ERROR = "setup_error"
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

    TYPE: ClassVar[MessageType] = MessageType.SPAWN
    NESTED: ClassVar[dict[str, type]] = {
        "layers": Layer,
        "mounts": BindMount,
        "network": NetworkPlan,
    }

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
    # The main cmd's log (daemon/sandbox/logfile.py): a directory of the daemon's state, and
    # the bytes of each stream kept there. None: no cmd, no log.
    log_dir: str | None = None
    log_limit: int = 1 << 20
    # Which PID 1 runs the sandbox: "python" (daemon/sandbox/supervisor.py, a fork of the
    # zygote) or NATIVE (the same protocol in C, exec'd by B once its root is built).
    supervisor: str = "python"
    # The uid base the next sandbox will most likely get (the slot above this one's), or
    # None: the zygote makes that range's user namespaces once it has answered, off the next
    # create's path (daemon/sandbox/zygote.py).
    next_uid_base: int | None = None


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
    oom_kills: int = 0  # OOM kills its memory cgroup counted while it ran (its tree's)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self)).encode()

    @classmethod
    def from_json(cls, data: bytes) -> ExitStatus:
        return cls(**json.loads(data))


# -- creating a sandbox -------------------------------------------------------------------------


@dataclass
class Spawned:
    """The zygote's answer: B's host pid and its start time (which tells it from a reuse)."""

    TYPE: ClassVar[MessageType] = MessageType.SPAWNED
    pid: int
    start: int


@dataclass
class SetupError:
    """The one shape of a failure to build a sandbox, from the zygote, A or B."""

    TYPE: ClassVar[MessageType] = MessageType.SETUP_ERROR
    step: str
    errno: int | None
    message: str
    invalid: bool = False  # the request's own rootfs or mounts caused it: a 422

    @classmethod
    def of(cls, step: str, exc: BaseException, *, invalid: bool = False) -> SetupError:
        number = exc.errno if isinstance(exc, OSError) else None
        text = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_LIMIT]
        return cls(step, number, text, invalid)


@dataclass
class Hello:
    """The supervisor's first message on every connection, once the sandbox is set up."""

    TYPE: ClassVar[MessageType] = MessageType.HELLO
    version: int
    running: dict[str, int]  # exec id: pid
    finished: list[str]  # exec ids whose status.json waits in the mailbox


# -- running ------------------------------------------------------------------------------------


@dataclass
class ExecRequest:
    TYPE: ClassVar[MessageType] = MessageType.EXEC
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


@dataclass
class Started:
    TYPE: ClassVar[MessageType] = MessageType.STARTED
    id: str
    pid: int | None  # None: no process could be forked (EXITED 126 follows)


@dataclass
class SendSignal:
    TYPE: ClassVar[MessageType] = MessageType.SIGNAL
    id: str
    signal: int


@dataclass
class Exited:
    TYPE: ClassVar[MessageType] = MessageType.EXITED
    NESTED: ClassVar[dict[str, type]] = {"status": ExitStatus}
    id: str
    status: ExitStatus


@dataclass
class ErrorReply:
    """A request the supervisor could not act on (id None: not about one exec)."""

    TYPE: ClassVar[MessageType] = MessageType.ERROR
    id: str | None
    message: str


@dataclass
class Subscribe:
    TYPE: ClassVar[MessageType] = MessageType.SUBSCRIBE
    id: str


@dataclass
class Subscribed:
    TYPE: ClassVar[MessageType] = MessageType.SUBSCRIBED
    id: str
    offsets: dict[str, int]  # stream: offset of the first byte OUTPUT will carry


@dataclass
class Unsubscribe:
    TYPE: ClassVar[MessageType] = MessageType.UNSUBSCRIBE
    id: str


@dataclass
class Output:
    TYPE: ClassVar[MessageType] = MessageType.OUTPUT
    id: str
    stream: str
    offset: int
    data: str  # base64


@dataclass
class Input:
    TYPE: ClassVar[MessageType] = MessageType.INPUT
    id: str
    data: str  # base64
    eof: bool = False


@dataclass
class Resize:
    TYPE: ClassVar[MessageType] = MessageType.RESIZE
    id: str
    rows: int
    cols: int


@dataclass
class Configure:
    TYPE: ClassVar[MessageType] = MessageType.CONFIGURE
    hostname: str
    env: dict[str, str]


Message = (
    SpawnRequest
    | Spawned
    | SetupError
    | Hello
    | ExecRequest
    | Started
    | SendSignal
    | Exited
    | ErrorReply
    | Subscribe
    | Subscribed
    | Unsubscribe
    | Output
    | Input
    | Resize
    | Configure
)
_BY_TYPE: dict[str, type[Message]] = {
    cls.TYPE.value: cls
    for cls in (
        SpawnRequest,
        Spawned,
        SetupError,
        Hello,
        ExecRequest,
        Started,
        SendSignal,
        Exited,
        ErrorReply,
        Subscribe,
        Subscribed,
        Unsubscribe,
        Output,
        Input,
        Resize,
        Configure,
    )
}
M = TypeVar("M")


def encode(message: Message) -> bytes:
    """One message as one line."""
    # A message with no nested dataclass is its own fields: asdict's deep copy of them (an
    # EXEC's env and cmd) cost more than the JSON, on every exec.
    body = asdict(message) if getattr(message, "NESTED", None) else vars(message)
    return json.dumps({"type": message.TYPE.value, **body}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    """One line as its message; ProtocolError for anything else."""
    try:
        raw = json.loads(line)
    except ValueError as exc:
        raise ProtocolError(f"not a JSON line: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = raw.pop("type", None)
    cls = _BY_TYPE.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {kind!r}")
    if cls is Hello and raw.get("version") != PROTOCOL_VERSION:
        # First: a supervisor of another version may send other fields as well.
        raise ProtocolError(
            f"the supervisor speaks protocol version {raw.get('version', 0)}, this daemon "
            f"version {PROTOCOL_VERSION}"
        )
    return _build(cls, raw)


def _build(cls: type[M], raw: dict[str, Any]) -> M:
    """A dataclass from a JSON object with exactly its fields (nested ones built too)."""
    name = getattr(cls, "TYPE", cls.__name__)
    known, required = _shape(cls)  # type: ignore[arg-type]
    unknown = sorted(raw.keys() - known)
    if unknown:
        raise ProtocolError(f"{name} has no field {', '.join(unknown)}")
    missing = sorted(required - raw.keys())
    if missing:
        raise ProtocolError(f"{name} lacks the field {', '.join(missing)}")
    nested: dict[str, type] = getattr(cls, "NESTED", {})
    for key, inner in nested.items():
        value = raw.get(key)
        if isinstance(value, list):
            raw[key] = [_build(inner, _object(name, key, v)) for v in value]
        elif value is not None:
            raw[key] = _build(inner, _object(name, key, value))
    return cls(**raw)


@functools.cache
def _shape(cls: type) -> tuple[frozenset[str], frozenset[str]]:
    """A message class's field names, and those without a default: read once per class."""
    known = fields(cls)
    required = (f.name for f in known if f.default is MISSING and f.default_factory is MISSING)
    return frozenset(f.name for f in known), frozenset(required)


def _object(name: object, key: str, value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{name}: {key} must hold JSON objects")
    return value


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
