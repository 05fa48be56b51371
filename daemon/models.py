"""The public shapes of sandboxd (what a client sends and gets back) and the service interface.

These pydantic models are the contract of ../shared/spec/api.md in code. They are not the
database rows (daemon/store.py holds those): the service converts rows to these before they
leave the daemon. api/ imports this module and `SandboxService`, nothing deeper.
"""

from __future__ import annotations

import builtins
import os
import re
import signal as signal_module
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from daemon.lifecycle import ExecState, ExitReason, SandboxState

MAX_SECONDS = 10 * 365 * 86400  # durations past ten years are surely mistakes
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$"
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_KEY = re.compile(r"^[^=\x00]+$")
ID_PATTERN = re.compile(r"^sb_[0-9a-f]{16}$")

Namespace = Literal["pid", "mnt", "ipc", "uts", "net", "user"]
ALL_NAMESPACES: list[Namespace] = ["pid", "mnt", "ipc", "uts", "net", "user"]


class _Input(BaseModel):
    """Request bodies: unknown fields are errors, so a misspelt option is never ignored."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _no_nul(value: str, what: str) -> str:
    _utf8(value, what)
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL bytes")
    return value


def _utf8(value: str, what: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no UTF-8 byte string can hold."""
    try:
        value.encode()
    except UnicodeEncodeError:
        raise ValueError(f"{what} must be valid Unicode (no lone surrogates)") from None
    return value


def _absolute(path: str, what: str) -> str:
    _no_nul(path, what)
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path")
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f"{what} must not contain '..'")
    return path


def _check_env(env: dict[str, str]) -> dict[str, str]:
    for key, value in env.items():
        _utf8(key, "a name")
        if not _ENV_KEY.match(key):
            raise ValueError(f"environment name {key!r} must be non-empty, without '=' or NUL")
        _no_nul(value, f"environment value of {key}")
    return env


def _check_argv(cmd: list[str]) -> list[str]:
    for arg in cmd:
        _no_nul(arg, "cmd arguments")
    return cmd


class MountSpec(_Input):
    source: str = Field(description="An absolute host path, bound into the sandbox.")
    target: str = Field(description="An absolute path inside the sandbox.")
    read_only: bool = True

    @field_validator("source", "target")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        return _absolute(value, "a mount path")

    @field_validator("target")
    @classmethod
    def _not_root(cls, value: str) -> str:
        if value.rstrip("/") == "":
            raise ValueError("a mount target cannot be /")
        return value


class PortSpec(_Input):
    host_port: int = Field(
        ge=1, le=65535, description="Listened on at every host address, loopback included."
    )
    sandbox_port: int = Field(ge=1, le=65535, description="Where connections are relayed to.")
    protocol: Literal["tcp"] = "tcp"


class NetworkSpec(_Input):
    mode: Literal["none", "bridge", "host"] = "none"
    ports: list[PortSpec] = Field(
        default_factory=list,
        description="Published ports (bridge mode): a host port already in use answers 409.",
    )

    @field_validator("ports")
    @classmethod
    def _distinct_host_ports(cls, value: list[PortSpec]) -> list[PortSpec]:
        host_ports = [p.host_port for p in value]
        if len(set(host_ports)) != len(host_ports):
            raise ValueError("a host_port may be published only once")
        return value


# The supervisor (PID 1, a fork of the warm zygote) is charged about 3 MiB; a sandbox should
# have room for more than that (Docker's floor is 6 MiB).
MIN_MEMORY = 16 << 20
MAX_PIDS = 4194304  # the kernel's PID_MAX_LIMIT


class Limits(_Input):
    """Enforced with the host's cgroups (v1 or v2, see GET /info); null: no limit."""

    memory_bytes: Annotated[int, Field(ge=MIN_MEMORY, le=1 << 53)] | None = Field(
        default=None,
        description="Memory (and swap) of all its processes together, page cache and kernel "
        "memory included; past it the OOM killer kills one of them (never PID 1). "
        "At least 16 MiB.",
    )
    pids: Annotated[int, Field(ge=2, le=MAX_PIDS)] | None = Field(
        default=None,
        description="Processes and threads at once, its PID 1 (the supervisor) included; past "
        "it fork fails with EAGAIN. At least 2.",
    )
    cpus: Annotated[float, Field(ge=0.01)] | None = Field(
        default=None,
        description="CPU time as a number of CPUs (0.25: a quarter of one), at most the "
        "host's CPUs.",
    )


class SandboxCreate(_Input):
    """The body of POST /sandboxes; every field is optional."""

    name: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    hostname: str | None = Field(default=None, description="Default: the name, else the id.")
    namespaces: list[Namespace] = Field(default_factory=lambda: list(ALL_NAMESPACES))
    rootfs: str | None = Field(
        default=None,
        description="null: the host's /usr and a copy of the world-readable part of its /etc; "
        "else an absolute path of a directory tree used read-only under a writable layer.",
    )
    mounts: list[MountSpec] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)
    cmd: Annotated[list[str], Field(min_length=1)] | None = None
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    limits: Limits = Field(default_factory=Limits)
    ttl_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = None
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _not_an_id(cls, value: str | None) -> str | None:
        if value is not None and ID_PATTERN.match(value):
            raise ValueError("a name must not look like a sandbox id (sb_ and 16 hex digits)")
        return value

    @field_validator("hostname")
    @classmethod
    def _valid_hostname(cls, value: str | None) -> str | None:
        if value is not None and not valid_hostname(value):
            raise ValueError("hostname must be a valid host name of at most 63 characters")
        return value

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[Namespace]) -> list[Namespace]:
        if "pid" not in value or "mnt" not in value:
            raise ValueError("namespaces must contain 'pid' and 'mnt'")
        if len(set(value)) != len(value):
            raise ValueError("namespaces must not repeat")
        return value

    @field_validator("rootfs")
    @classmethod
    def _rootfs(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value, "rootfs")

    @field_validator("env", "labels")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value)

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else _check_argv(value)

    @model_validator(mode="after")
    def _network_matches_namespaces(self) -> SandboxCreate:
        has_net = "net" in self.namespaces
        if self.network.mode == "host" and has_net:
            raise ValueError("network mode 'host' needs 'net' left out of namespaces")
        if self.network.mode != "host" and not has_net:
            raise ValueError(f"network mode '{self.network.mode}' needs 'net' in namespaces")
        if self.network.ports and self.network.mode != "bridge":
            raise ValueError("ports can only be published in network mode 'bridge'")
        targets = [m.target.rstrip("/") for m in self.mounts]
        if len(set(targets)) != len(targets):
            raise ValueError("two mounts have the same target")
        return self


def valid_hostname(value: str) -> bool:
    return 0 < len(value) <= 63 and all(_HOSTNAME_LABEL.match(p) for p in value.split("."))


def hostname_from_name(name: str) -> str:
    """A name made a host name: characters not valid in one become '-'."""
    cleaned = re.sub(r"[^A-Za-z0-9.-]", "-", name).strip("-.")[:63].strip("-.")
    return (
        cleaned if valid_hostname(cleaned) else re.sub(r"[^A-Za-z0-9]", "-", cleaned) or "sandbox"
    )


class ExitInfo(BaseModel):
    exit_code: int | None
    signal: str | None
    reason: ExitReason
    message: str | None = None


class NetworkView(BaseModel):
    mode: Literal["none", "bridge", "host"]
    ip: str | None = None
    ports: list[PortSpec] = Field(default_factory=list)


class Sandbox(BaseModel):
    """A sandbox as clients see it."""

    id: str
    name: str | None
    state: SandboxState
    hostname: str
    namespaces: list[Namespace]
    rootfs: str | None
    mounts: list[MountSpec]
    cmd: list[str] | None
    env: dict[str, str]
    network: NetworkView
    limits: Limits
    labels: dict[str, str]
    pid: int | None = Field(description="Host pid of the supervisor (the sandbox's PID 1).")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None
    exit: ExitInfo | None


class TtySize(_Input):
    rows: int = Field(ge=1, le=65535)
    cols: int = Field(ge=1, le=65535)


class ExecCreate(_Input):
    """The body of POST /sandboxes/{ref}/exec."""

    cmd: Annotated[list[str], Field(min_length=1)]
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = "/"
    user: Annotated[str, Field(pattern=r"^[0-9]{1,10}(:[0-9]{1,10})?$")] = "0"
    stdin: str | None = None
    timeout_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = None
    wait: bool = True
    tty: bool = Field(
        default=False,
        description="A pseudo-terminal as stdin, stdout and stderr (stderr stays empty); "
        "input, and window resizes, through GET …/execs/{id}/attach. Implies `interactive`.",
    )
    interactive: bool = Field(
        default=False,
        description="Keep stdin open after `stdin` for input through GET …/execs/{id}/attach "
        "(as `docker exec -i`); it closes when the attached client sends end of file.",
    )
    tty_size: TtySize | None = Field(default=None, description="The terminal's first size.")

    @model_validator(mode="after")
    def _tty_size_needs_tty(self) -> ExecCreate:
        if self.tty_size is not None and not self.tty:
            raise ValueError("tty_size needs tty: true")
        return self

    @field_validator("cmd")
    @classmethod
    def _cmd(cls, value: list[str]) -> list[str]:
        return _check_argv(value)

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return _check_env(value)

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, value: str | None) -> str | None:
        return None if value is None else _utf8(value, "stdin")

    @field_validator("cwd")
    @classmethod
    def _cwd(cls, value: str | None) -> str | None:
        return None if value is None else _absolute(value, "cwd")

    @field_validator("user")
    @classmethod
    def _user(cls, value: str) -> str:
        if any(int(part) > 0xFFFFFFFE for part in value.split(":")):
            raise ValueError("uid and gid must be below 4294967295")
        return value


class Exec(BaseModel):
    """An exec as clients see it."""

    id: str
    sandbox_id: str
    cmd: list[str]
    state: ExecState
    pid: int | None = Field(description="The process's pid inside the sandbox.")
    exit_code: int | None
    signal: str | None
    timed_out: bool
    stdout: str
    stderr: str
    stdout_truncated: bool
    stderr_truncated: bool
    oom_killed: bool = Field(
        description="The process died of SIGKILL and the OOM killer had killed a process of "
        "this exec (most likely it): it went past the sandbox's limits.memory_bytes."
    )
    started_at: datetime
    finished_at: datetime | None


class ExecOutput(BaseModel):
    """A line of an exec's output stream (NDJSON, or a WebSocket message): output as it came."""

    stream: Literal["stdout", "stderr"]
    data: str


class ExecExit(BaseModel):
    """The last line of an exec's output stream: the Exec as it ended."""

    exit: Exec


class AttachMessage(_Input):
    """A text message a client sends on an attach WebSocket (bytes go to stdin as they are)."""

    stdin: str | None = None
    eof: bool = False
    resize: TtySize | None = None

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, value: str | None) -> str | None:
        return None if value is None else _utf8(value, "stdin")


class SignalRequest(_Input):
    signal: str | int = Field(description="A name such as 'SIGTERM' or 'TERM', or a number.")

    def number(self) -> int:
        """The signal's number; raises ValueError for a signal that does not exist."""
        return signal_number(self.signal)


def signal_number(sig: str | int) -> int:
    valid = {int(s) for s in signal_module.valid_signals()}
    if isinstance(sig, int) or (isinstance(sig, str) and sig.isdigit()):
        number = int(sig)
        if number in valid and number > 0:
            return number
        raise ValueError(f"no signal numbered {sig}")
    name = sig.upper()
    name = name if name.startswith("SIG") else "SIG" + name
    member = getattr(signal_module.Signals, name, None) if name.isidentifier() else None
    if member is None:
        raise ValueError(f"no signal named {sig}")
    return int(member)


class TtlUpdate(_Input):
    """The body of POST /sandboxes/{ref}/ttl."""

    ttl_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS)] | None = Field(
        description="The sandbox is destroyed this long from now (replacing its expiry, "
        "earlier or later); null: never."
    )


class SandboxStats(BaseModel):
    """A running sandbox's use of resources, read from its cgroups now; null where this host
    cannot tell."""

    memory_current_bytes: int | None = Field(
        description="Memory charged to it now: its processes, page cache, kernel memory."
    )
    memory_peak_bytes: int | None = Field(
        description="The most ever charged to it (cgroup v2: Linux 5.19 or later)."
    )
    cpu_seconds: float | None = Field(description="CPU time used by all its processes so far.")
    pids_current: int | None = Field(description="Processes and threads now, PID 1 included.")
    pids_peak: int | None = Field(description="The most processes and threads at once.")
    oom_kills: int | None = Field(description="Processes the OOM killer has killed in it.")


class SandboxCounts(BaseModel):
    running: int
    total: int


class PoolCounts(BaseModel):
    size: int = Field(description="Pooled sandboxes the daemon keeps started (`pool_size`).")
    ready: int = Field(description="How many are ready now for a create to take.")


class Info(BaseModel):
    version: str
    kernel: str
    cgroup: Literal["v1", "v2"] | None
    sandboxes: SandboxCounts = Field(description="Those created through the API; not the pool.")
    pool: PoolCounts
    pid: int = Field(description="The daemon's own pid.")
    state_dir: str
    run_dir: str


class SandboxService(Protocol):
    """What api/ needs of the daemon. `daemon.service.SandboxManager` is the real one."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    async def info(self) -> Info: ...
    async def create(self, spec: SandboxCreate, idempotency_key: str | None = None) -> Sandbox: ...
    async def list(
        self, states: builtins.list[SandboxState], labels: dict[str, str]
    ) -> builtins.list[Sandbox]: ...
    async def get(self, ref: str) -> Sandbox: ...
    async def destroy(self, ref: str) -> None: ...
    async def stats(self, ref: str) -> SandboxStats: ...
    async def set_ttl(self, ref: str, ttl_seconds: float | None) -> Sandbox: ...
    async def exec(self, ref: str, spec: ExecCreate) -> Exec: ...
    async def list_execs(self, ref: str) -> builtins.list[Exec]: ...
    async def get_exec(self, ref: str, exec_id: str) -> Exec: ...
    async def signal_exec(self, ref: str, exec_id: str, signal: int) -> Exec: ...
    def follow(
        self, ref: str, exec_id: str, *, follow: bool
    ) -> AsyncIterator[ExecOutput | ExecExit]:
        """The exec's output from its start; with `follow`, live until it ends, then ExecExit.
        Without, what there is now (and ExecExit if it has ended)."""
        ...

    async def send_input(self, ref: str, exec_id: str, data: bytes, *, eof: bool) -> None: ...
    async def resize(self, ref: str, exec_id: str, rows: int, cols: int) -> None: ...


def kernel_release() -> str:
    return os.uname().release
