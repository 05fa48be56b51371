"""The public shapes of sandboxd (what a client sends and gets back) and the service interface.

These pydantic models are the contract of ../shared/spec/api.md in code. They are not the
database rows (daemon/store/database.py holds those): the service converts rows to these before they
leave the daemon. api/ imports this module and `SandboxService`, nothing deeper.
"""

from __future__ import annotations

import base64
import builtins
import os
import re
import signal as signal_module
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict, JsonValue

from daemon.lifecycle.events import Event, Subscription
from daemon.lifecycle.states import ExecState, ExitReason, SandboxState

MAX_SECONDS = 10 * 365 * 86400  # durations past ten years are surely mistakes
MIN_SECONDS = 0.001  # shorter durations round to nothing in the daemon's clocks
_HOSTNAME_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_ENV_KEY = re.compile(r"^[^=\x00]+$")
ID_PATTERN = re.compile(r"^sb_[0-9a-f]{16}$")

# The patterns below are what openapi.json says, and each validator checks its pattern as its
# last word, so the schema and the server agree on every string. They are written to mean the
# same in ECMA-262 (the schema's dialect) and in Python's re (which tools such as schemathesis
# and jsonschema use): no `.`, no `\d`/`\w`, and each ends with END, not `$`, which in Python
# also matches before a last newline.
END = r"(?![\s\S])"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
HOSTNAME_PATTERN = rf"^{_LABEL}(?:\.{_LABEL})*{END}"  # with maxLength 63
SANDBOX_NAME_PATTERN = rf"^(?!sb_[0-9a-f]{{16}}{END})[A-Za-z0-9][A-Za-z0-9_.-]{{0,62}}{END}"
NO_NUL_PATTERN = r"^[^\x00]*$"
ENV_NAME_PATTERN = r"^[^=\x00]+$"
# An absolute path: no control characters, no '..' component.
_SEGMENT = r"[^/\x00-\x1f]"
_NO_DOTDOT = r"(?![^\x00-\x1f]*/\.\.(?:/|$))"
PATH_PATTERN = rf"^{_NO_DOTDOT}/[^\x00-\x1f]*{END}"
# A mount target: a path as above whose first component (past empty and '.' ones) exists and
# is not proc, sys or dev.
TARGET_PATTERN = (
    rf"^{_NO_DOTDOT}(?:/\.?(?=/|$))*"  # empty and '.' components
    rf"/(?!(?:proc|sys|dev|\.)(?:/|$)){_SEGMENT}+(?:/{_SEGMENT}*)*{END}"  # the first real one on
)
# An image reference: [registry/]repository[:tag][@digest], an image id or a manifest digest.
IMAGE_REF_PATTERN = rf"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{{0,511}}{END}"
PLATFORM_PATTERN = rf"^[a-z0-9_]+/[a-z0-9_]+(?:/[a-z0-9_]+)?{END}"
KERNEL_TREES = ("proc", "sys", "dev")  # built by the sandbox's setup: nothing goes in or over them
_CONTROL = re.compile(r"[\x00-\x1f]")
_UINT32 = (
    r"(?:[0-9]{1,9}|[0-3][0-9]{9}|4[01][0-9]{8}|42[0-8][0-9]{7}|429[0-3][0-9]{6}|4294[0-8][0-9]{5}"
    r"|42949[0-5][0-9]{4}|429496[0-6][0-9]{3}|4294967[01][0-9]{2}|42949672[0-8][0-9]|429496729[0-4])"
)
USER_PATTERN = rf"^{_UINT32}(?::{_UINT32})?{END}"  # uid[:gid], each at most 4294967294

Namespace = Literal["pid", "mnt", "ipc", "uts", "net", "user"]
# How bytes of a process travel in JSON: text (invalid bytes replaced) or base64 of them exactly.
Encoding = Literal["utf-8", "base64"]
ALL_NAMESPACES: list[Namespace] = ["pid", "mnt", "ipc", "uts", "net", "user"]


class _Input(BaseModel):
    """Request bodies: unknown fields are errors, so a misspelt option is never ignored; and
    strict, so a value is taken only in the JSON type the schema names (no "5" for 5)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


STORED = {"stored": True}  # the validation context of a spec read back from the store


def _stored(info: ValidationInfo) -> bool:
    """A spec read back from the store passed the rules of the version that stored it: this
    version's stricter string rules must not make it unreadable (a failed record of a mount
    target written '/./proc' by an older version, say)."""
    return isinstance(info.context, dict) and bool(info.context.get("stored"))


def stored_spec(spec: dict[str, Any]) -> SandboxCreate:
    """A stored SandboxCreate, read back; its ttl (which views never need) is left out, since
    an older version took shorter ones."""
    kept = {key: value for key, value in spec.items() if key != "ttl_seconds"}
    return SandboxCreate.model_validate(kept, context=STORED)


def _checked(
    pattern: str,
    what: str,
    explain: Callable[[str], object],
    normalise: Callable[[str], str] | None = None,
) -> AfterValidator:
    """The validator of a string whose schema carries `pattern`: `explain` says in words what
    is wrong with a value, then the pattern itself decides (so nothing the schema refuses gets
    through), then `normalise` may rewrite the value."""
    compiled = re.compile(pattern)

    def check(value: str, info: ValidationInfo) -> str:
        if _stored(info):
            return value
        explain(value)
        if not compiled.fullmatch(value):
            raise ValueError(f"{what} must match {pattern}")
        return value if normalise is None else normalise(value)

    return AfterValidator(check)


def _schema_pattern(pattern: str) -> Any:
    return Field(json_schema_extra={"pattern": pattern})


ImageRef = Annotated[
    str,
    Field(max_length=512, examples=["docker.io/library/busybox:1"]),
    _checked(IMAGE_REF_PATTERN, "an image reference", lambda v: None),
    _schema_pattern(IMAGE_REF_PATTERN),
]
Platform = Annotated[
    str,
    Field(max_length=64),
    _checked(PLATFORM_PATTERN, "a platform (os/arch[/variant])", lambda v: None),
    _schema_pattern(PLATFORM_PATTERN),
]


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
    _utf8(path, what)
    if not path.startswith("/"):
        raise ValueError(f"{what} must be an absolute path")
    if _CONTROL.search(path):
        raise ValueError(f"{what} must not contain control characters (NUL to U+001F)")
    if any(part == ".." for part in path.split("/")):
        raise ValueError(f"{what} must not contain '..' components")
    return path


def normal_path(path: str) -> str:
    """An absolute path without empty or '.' components and without a trailing '/'.

    '..' is refused before this, not resolved: lexically, '/a/..' is '/', but inside a sandbox
    /a may be a symlink, so no spelling of a path with '..' can be trusted to mean one place.
    """
    return "/" + "/".join(part for part in path.split("/") if part not in ("", "."))


def _mount_target(path: str) -> str:
    _absolute(path, "a mount target")
    normal = normal_path(path)
    if normal == "/":
        raise ValueError("a mount target cannot be /")
    top = normal.split("/")[1]
    if top in KERNEL_TREES:
        raise ValueError(f"a mount target cannot be in or over /{top} (the sandbox's own)")
    return path


HostPath = Annotated[
    str,
    _checked(PATH_PATTERN, "a host path", lambda v: _absolute(v, "a host path"), normal_path),
    _schema_pattern(PATH_PATTERN),
]
SandboxPath = Annotated[
    str,
    _checked(PATH_PATTERN, "a path", lambda v: _absolute(v, "a path"), normal_path),
    _schema_pattern(PATH_PATTERN),
]
MountTarget = Annotated[
    str,
    _checked(TARGET_PATTERN, "a mount target", _mount_target, normal_path),
    _schema_pattern(TARGET_PATTERN),
]
Seconds = Annotated[float, Field(ge=MIN_SECONDS, le=MAX_SECONDS)]


def _whole(value: object) -> object:
    """JSON Schema counts 5.0 as an integer, so the server does too (and nothing else: the
    bodies are strict, so "5" and true are not integers)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# After the bounds in an Annotated (Annotated[int, Field(ge=1), WHOLE]), or the schema loses them.
WHOLE = BeforeValidator(_whole)


def _env_name(name: str) -> str:
    _utf8(name, "a name")
    if not _ENV_KEY.match(name):
        raise ValueError(f"the name {name!r} must be non-empty, without '=' or NUL")
    return name


Arg = Annotated[
    str,
    _checked(NO_NUL_PATTERN, "an argument", lambda v: _no_nul(v, "an argument")),
    _schema_pattern(NO_NUL_PATTERN),
]
EnvName = Annotated[
    str, _checked(ENV_NAME_PATTERN, "a name", _env_name), _schema_pattern(ENV_NAME_PATTERN)
]
EnvValue = Annotated[
    str,
    _checked(NO_NUL_PATTERN, "a value", lambda v: _no_nul(v, "a value")),
    _schema_pattern(NO_NUL_PATTERN),
]
# Written out: pydantic would say `patternProperties`, which leaves other names unchecked.
_ENV_SCHEMA: JsonDict = {
    "type": "object",
    "propertyNames": {"pattern": ENV_NAME_PATTERN},
    "additionalProperties": {"type": "string", "pattern": NO_NUL_PATTERN},
}
Env = Annotated[dict[EnvName, EnvValue], WithJsonSchema(_ENV_SCHEMA)]


# The program is named by the first argument, so that one cannot be empty.
def _program(argv: list[str], info: ValidationInfo) -> list[str]:
    if not _stored(info) and argv and not argv[0]:  # (an empty list is refused by min_length)
        raise ValueError("the first argument (the program) must not be empty")
    return argv


# In JSON Schema 2020-12 `items` skips what `prefixItems` covers: the first is described whole.
_PROGRAM: JsonDict = {"type": "string", "minLength": 1, "pattern": NO_NUL_PATTERN}
Argv = Annotated[
    list[Arg],
    AfterValidator(_program),
    Field(min_length=1, json_schema_extra={"prefixItems": [_PROGRAM]}),
]


class MountSpec(_Input):
    source: HostPath = Field(
        description="An absolute host path, bound into the sandbox; stored normalised."
    )
    target: MountTarget = Field(
        description="An absolute path inside the sandbox, stored normalised (no '.' or empty "
        "components, no trailing '/'); not /, and not in or over /proc, /sys or /dev."
    )
    read_only: bool = True


class PortSpec(_Input):
    host_port: Annotated[int, Field(ge=1, le=65535), WHOLE] = Field(
        description="Listened on at every host address, loopback included."
    )
    sandbox_port: Annotated[int, Field(ge=1, le=65535), WHOLE] = Field(
        description="Where connections are relayed to."
    )
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
# A disk (a tmpfs) needs room for the identity files and the overlay's work directory; past
# 16 TiB a filesystem in memory is surely a mistake (daemon/config.py bounds its defaults alike).
MIN_DISK = 1 << 20
MAX_DISK = 1 << 44


class Limits(_Input):
    """Memory, pids and cpus are enforced with the host's cgroups (v1 or v2, see GET /info),
    null: no limit; disk_bytes by the size of the sandbox's filesystems, null: the default."""

    memory_bytes: Annotated[int, Field(ge=MIN_MEMORY, le=1 << 53), WHOLE] | None = Field(
        default=None,
        description="Memory (and swap) of all its processes together, page cache and kernel "
        "memory included; past it the OOM killer kills one of them (never PID 1). "
        "At least 16 MiB.",
    )
    pids: Annotated[int, Field(ge=2, le=MAX_PIDS), WHOLE] | None = Field(
        default=None,
        description="Processes and threads at once, its PID 1 (the supervisor) included; past "
        "it fork fails with EAGAIN. At least 2.",
    )
    cpus: Annotated[float, Field(ge=0.01)] | None = Field(
        default=None,
        description="CPU time as a number of CPUs (0.25: a quarter of one), at most the "
        "host's CPUs.",
    )
    disk_bytes: Annotated[int, Field(ge=MIN_DISK, le=MAX_DISK), WHOLE] | None = Field(
        default=None,
        description="What it may write to its own files (everything outside its bind mounts): "
        "its writable layer is a filesystem in memory of this size, and its /tmp and /dev/shm "
        "hold at most this much each too (and at most the daemon's caps, 256 and 64 MiB by "
        "default). Past it a write fails with ENOSPC; what it holds counts towards "
        "memory_bytes. null: the daemon's default (--default-disk-bytes, 1 GiB unless set), "
        "which the sandbox then reports here, or half of memory_bytes if that is less. "
        "At least 1 MiB, at most memory_bytes.",
    )

    @model_validator(mode="after")
    def _files_fit_in_memory(self) -> Limits:
        # Its files are pages charged to its memory cgroup: a disk larger than its memory
        # would meet the OOM killer before ENOSPC.
        if self.memory_bytes and self.disk_bytes and self.disk_bytes > self.memory_bytes:
            raise ValueError("disk_bytes must not exceed memory_bytes: its files are in memory")
        return self


def _sandbox_name(value: str) -> str:
    if ID_PATTERN.fullmatch(value):
        raise ValueError("a name must not look like a sandbox id (sb_ and 16 hex digits)")
    return value


def _hostname(value: str) -> str:
    if not valid_hostname(value):
        raise ValueError("hostname must be a valid host name of at most 63 characters")
    return value


SandboxName = Annotated[
    str,
    _checked(SANDBOX_NAME_PATTERN, "a name", _sandbox_name),
    _schema_pattern(SANDBOX_NAME_PATTERN),
]
Hostname = Annotated[
    str,
    _checked(HOSTNAME_PATTERN, "hostname", _hostname),
    Field(max_length=63, json_schema_extra={"pattern": HOSTNAME_PATTERN}),
]
_NAMESPACES_SCHEMA: JsonDict = {
    "uniqueItems": True,
    "allOf": [{"contains": {"const": "pid"}}, {"contains": {"const": "mnt"}}],
}
# The network mode and the namespaces go together (the model validator below says so in words).
_NO_PORTS: JsonDict = {"type": "array", "maxItems": 0}
_WITH_NET: JsonDict = {"contains": {"const": "net"}}
_HOST_MODE: JsonDict = {
    "required": ["network"],
    "properties": {"network": {"required": ["mode"], "properties": {"mode": {"const": "host"}}}},
}
_NETWORK_RULES: JsonDict = {
    "if": _HOST_MODE,
    # host: the host's network namespace, so no 'net' and no ports
    "then": {
        "required": ["namespaces"],
        "properties": {
            "namespaces": {"not": _WITH_NET},
            "network": {"properties": {"ports": _NO_PORTS}},
        },
    },
    # bridge, or none (the default): a namespace of its own; ports only in bridge mode
    "else": {
        "properties": {
            "namespaces": _WITH_NET,
            "network": {
                "anyOf": [
                    {"required": ["mode"], "properties": {"mode": {"const": "bridge"}}},
                    {"properties": {"ports": _NO_PORTS}},
                ]
            },
        }
    },
}


class SandboxCreate(_Input):
    """The body of POST /sandboxes; every field is optional."""

    model_config = ConfigDict(json_schema_extra=_NETWORK_RULES)

    name: SandboxName | None = None
    hostname: Hostname | None = Field(default=None, description="Default: the name, else the id.")
    namespaces: list[Namespace] = Field(
        default_factory=lambda: list(ALL_NAMESPACES),
        description="Distinct; 'pid' and 'mnt' always. 'net' unless network.mode is 'host'.",
        json_schema_extra=_NAMESPACES_SCHEMA,
    )
    rootfs: HostPath | None = Field(
        default=None,
        description="null: the host's /usr and a copy of the world-readable part of its /etc; "
        "else an absolute path of a directory tree used read-only under a writable layer.",
    )
    image: ImageRef | None = Field(
        default=None,
        description="An image in the store (name:tag, id or digest), not with `rootfs`: the "
        "sandbox's root is its layers; its env is the base of `env`, its working_dir and user "
        "the defaults of execs. Its entrypoint and cmd are not run: `cmd` is.",
    )
    mounts: list[MountSpec] = Field(
        default_factory=list, description="Their targets are distinct once normalised."
    )
    env: Env = Field(default_factory=dict)
    cmd: Argv | None = None
    network: NetworkSpec = Field(default_factory=NetworkSpec)
    limits: Limits = Field(default_factory=Limits)
    ttl_seconds: Seconds | None = None
    labels: Env = Field(default_factory=dict)

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, value: list[Namespace]) -> list[Namespace]:
        if "pid" not in value or "mnt" not in value:
            raise ValueError("namespaces must contain 'pid' and 'mnt'")
        if len(set(value)) != len(value):
            raise ValueError("namespaces must not repeat")
        return value

    @model_validator(mode="after")
    def _network_matches_namespaces(self) -> SandboxCreate:
        has_net = "net" in self.namespaces
        if self.network.mode == "host" and has_net:
            raise ValueError("network mode 'host' needs 'net' left out of namespaces")
        if self.network.mode != "host" and not has_net:
            raise ValueError(f"network mode '{self.network.mode}' needs 'net' in namespaces")
        if self.network.ports and self.network.mode != "bridge":
            raise ValueError("ports can only be published in network mode 'bridge'")
        if self.image is not None and self.rootfs is not None:
            raise ValueError("image and rootfs cannot both be given: the image is the root")
        targets = [m.target for m in self.mounts]  # normalised already
        if len(set(targets)) != len(targets):
            raise ValueError("two mounts have the same target")
        return self


def valid_hostname(value: str) -> bool:
    return 0 < len(value) <= 63 and all(_HOSTNAME_LABEL.fullmatch(p) for p in value.split("."))


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


class SandboxImage(BaseModel):
    id: str = Field(description="The image's id (its config's digest).")
    reference: str = Field(description="The reference the create named it by.")


class Sandbox(BaseModel):
    """A sandbox as clients see it."""

    id: str
    name: str | None
    state: SandboxState
    hostname: str
    namespaces: list[Namespace]
    rootfs: str | None
    image: SandboxImage | None = Field(
        default=None, description="The image it was made from, as asked and as resolved."
    )
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


class ImageConfig(BaseModel):
    """What the image's config says a container of it should run with."""

    env: dict[str, str] = Field(default_factory=dict)
    cmd: list[str] | None = None
    entrypoint: list[str] | None = None
    working_dir: str = ""
    user: str = ""


class Image(BaseModel):
    """An image in the daemon's store."""

    id: str = Field(description="The digest of its config: `sha256:…`.")
    digest: str = Field(description="The digest of its manifest: `sha256:…`.")
    names: list[str] = Field(description="Its name:tag references (a tag is on one image).")
    size: int = Field(description="Bytes of its layers as stored (compressed, as pulled).")
    layers: int
    created_at: datetime = Field(description="When it came into this store.")
    config: ImageConfig


class ImagePull(_Input):
    """The body of POST /images/pull."""

    reference: ImageRef = Field(
        description="registry/repository[:tag] or …@sha256:…; without a registry, docker.io."
    )
    platform: Platform = Field(
        default="linux/amd64", description="The manifest picked from an index: os/arch[/variant]."
    )


class TtySize(_Input):
    rows: Annotated[int, Field(ge=1, le=65535), WHOLE]
    cols: Annotated[int, Field(ge=1, le=65535), WHOLE]


def _user(value: str) -> str:
    parts = value.split(":")
    if len(parts) > 2 or not all(part.isascii() and part.isdigit() for part in parts):
        raise ValueError("user must be 'uid' or 'uid:gid', in decimal digits")
    if any(len(part) > 10 or int(part) > 0xFFFFFFFE for part in parts):
        raise ValueError("uid and gid must be below 4294967295, in at most 10 digits")
    return value


User = Annotated[str, _checked(USER_PATTERN, "user", _user), _schema_pattern(USER_PATTERN)]
# Canonical base64 (RFC 4648: padded, no stray bits), which is what stdin_bytes takes.
BASE64_PATTERN = (
    r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/][AQgw]==|[A-Za-z0-9+/]{2}[AEIMQUYcgkosw048]=)?" + END
)
_STDIN_IN_BASE64: JsonDict = {
    "if": {"required": ["encoding"], "properties": {"encoding": {"const": "base64"}}},
    "then": {"properties": {"stdin": {"anyOf": [{"type": "null"}, {"pattern": BASE64_PATTERN}]}}},
}
_TTY_SIZE_NEEDS_TTY: JsonDict = {
    "if": {"required": ["tty_size"], "properties": {"tty_size": {"type": "object"}}},
    "then": {"required": ["tty"], "properties": {"tty": {"const": True}}},
}


class ExecCreate(_Input):
    """The body of POST /sandboxes/{ref}/exec."""

    model_config = ConfigDict(
        json_schema_extra={**_TTY_SIZE_NEEDS_TTY, "allOf": [_STDIN_IN_BASE64]}
    )

    cmd: Argv
    env: Env = Field(default_factory=dict)
    cwd: SandboxPath | None = "/"
    user: User = "0"
    stdin: str | None = None
    timeout_seconds: Seconds | None = None
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
    tty_size: TtySize | None = Field(
        default=None, description="The terminal's first size; only with `tty` true."
    )
    encoding: Encoding = Field(
        default="utf-8",
        description="`base64`: `stdin` is read as base64, and stdout, stderr and the `data` of "
        "every stream message are base64 of the exact bytes. `utf-8`: text, invalid bytes "
        "replaced.",
    )

    @model_validator(mode="after")
    def _tty_size_needs_tty(self) -> ExecCreate:
        if self.tty_size is not None and not self.tty:
            raise ValueError("tty_size needs tty: true")
        return self

    @model_validator(mode="after")
    def _stdin_in_its_encoding(self) -> ExecCreate:
        if self.stdin is not None and self.encoding == "base64":
            self.stdin_bytes()  # a ValueError is a 422 at the body
        return self

    @field_validator("stdin")
    @classmethod
    def _stdin(cls, value: str | None) -> str | None:
        return None if value is None else _utf8(value, "stdin")

    def stdin_bytes(self) -> bytes | None:
        """The bytes `stdin` stands for in the exec's encoding."""
        if self.stdin is None or self.encoding == "utf-8":
            return None if self.stdin is None else self.stdin.encode()
        if not re.match(BASE64_PATTERN, self.stdin):
            raise ValueError("stdin must be base64, padded (encoding is base64)")
        data = base64.b64decode(self.stdin, validate=True)
        return data


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
    encoding: Encoding = Field(
        default="utf-8", description="How `stdout` and `stderr` carry the bytes kept."
    )
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


LogStream = Literal["stdout", "stderr"]


@dataclass(frozen=True)
class LogQuery:
    """Which lines of a main command's log to read (GET /sandboxes/{ref}/logs's query): the
    last `tail` of them at or after `since`, of one stream or both; with `follow`, then
    those that come, until the command ends."""

    follow: bool = False
    tail: int | None = None
    since: datetime | None = None
    stream: LogStream | None = None
    encoding: Encoding = "utf-8"


class LogLine(BaseModel):
    """A line of a sandbox's main-command log (NDJSON): a line, or the part of one that was
    read at once, with the time it was read."""

    stream: LogStream
    data: str = Field(description="UTF-8 with replacement, or base64 with `encoding=base64`.")
    time: datetime


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


def _any_case(word: str) -> str:
    return "".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in word)


SIGNAL_NUMBERS: list[int] = sorted(int(s) for s in signal_module.valid_signals() if int(s) > 0)
_SIGNAL_NAMES = sorted(name.removeprefix("SIG") for name in signal_module.Signals.__members__)
# A name in any case, with or without SIG; or a number as decimal digits (leading zeros allowed).
SIGNAL_PATTERN = (
    rf"^(?:(?:{_any_case('sig')})?(?:{'|'.join(_any_case(n) for n in _SIGNAL_NAMES)})"
    rf"|0*(?:[1-9]|[12][0-9]|3[01]|3[4-9]|[45][0-9]|6[0-4])){END}"
)
_SIGNAL_SCHEMA: JsonDict = {
    "anyOf": [
        {"type": "string", "pattern": SIGNAL_PATTERN},
        {"type": "integer", "enum": list[JsonValue](SIGNAL_NUMBERS)},
    ],
    "description": "A name such as 'SIGTERM' or 'term' (any case, SIG optional), or a number "
    "(a JSON integer or decimal digits).",
}


class SignalRequest(_Input):
    # Checked by number() (the route answers 422 at body.signal), so that the error names the
    # field itself, not one branch of the union.
    signal: Annotated[str | int, WHOLE, WithJsonSchema(_SIGNAL_SCHEMA)]

    def number(self) -> int:
        """The signal's number; raises ValueError for a signal that does not exist."""
        return signal_number(self.signal)


def signal_number(sig: str | int) -> int:
    if isinstance(sig, int):
        if sig in SIGNAL_NUMBERS:
            return sig
        raise ValueError(f"no signal numbered {sig}")
    if not re.fullmatch(SIGNAL_PATTERN, sig):
        raise ValueError(f"no signal named {sig!r}")
    if sig.isdigit():
        return int(sig)
    name = sig.upper()
    return int(signal_module.Signals[name if name.startswith("SIG") else "SIG" + name])


class TtlUpdate(_Input):
    """The body of POST /sandboxes/{ref}/ttl."""

    ttl_seconds: Seconds | None = Field(
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
    removing: int = Field(
        0,
        description="Deleted or ended sandboxes whose files, cgroups and leases this daemon "
        "is still removing in the background (a deleted one is not in `total`).",
    )


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
    # What this daemon uses on the host, given or claimed for its state directory: no other
    # daemon on the host uses the same.
    bridge_name: str = Field(description="The bridge of its bridged sandboxes.")
    bridge_subnet: str = Field(description="The bridge's IPv4 subnet, e.g. 10.42.8.0/22.")
    cgroup_name: str = Field(description="The cgroup under which each sandbox has its own.")
    uid_base: int = Field(description="The first host uid of its sandboxes' uid ranges.")
    uid_last: int = Field(description="The last host uid its sandboxes' ranges may reach.")


class ImageStoreService(Protocol):
    """What api/ needs of the image store. `daemon.images.service.ImageService` is the real one."""

    async def list(self) -> builtins.list[Image]: ...
    async def get(self, ref: str) -> Image: ...
    async def delete(self, ref: str) -> None: ...
    async def import_archive(
        self, body: AsyncIterator[bytes], reference: str | None, platform: str
    ) -> Image: ...
    async def pull(
        self,
        reference: str,
        platform: str,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> Image: ...


class SandboxService(Protocol):
    """What api/ needs of the daemon. `daemon.lifecycle.service.SandboxManager` is the real one."""

    @property
    def images(self) -> ImageStoreService: ...

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

    def exec_output(self, ref: str, exec_id: str, stream: str) -> Iterator[bytes]:
        """The exact bytes kept of an exec's `stream` (stdout or stderr), in pieces to be
        read off the event loop; raises NotFound at once."""
        ...

    def logs(self, ref: str, query: LogQuery) -> AsyncIterator[LogLine]:
        """The main command's log as lines (see daemon/lifecycle/cmd_logs.py); raises
        NotFound at once."""
        ...

    async def send_input(self, ref: str, exec_id: str, data: bytes, *, eof: bool) -> None: ...
    async def resize(self, ref: str, exec_id: str, rows: int, cols: int) -> None: ...
    async def events_after(self, since: int) -> builtins.list[Event]: ...
    def subscribe_events(self) -> Subscription: ...
    async def metrics_exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition, and its content type."""
        ...

    def files(self, ref: str) -> SandboxFiles: ...


def kernel_release() -> str:
    return os.uname().release


def package_version() -> str:
    """sandboxd's version as installed (the OpenAPI document's and GET /info's)."""
    try:
        return metadata.version("sandboxd")
    except metadata.PackageNotFoundError:
        return "0.1.0"


# -- files (daemon/lifecycle/files.py) ----------------------------------------------------------

FILE_MODE_PATTERN = r"^[0-7]{3,4}$"
FILE_PATH_PATTERN = r"^/[^\x00]*$"  # absolute, no NUL
MAX_ID_INSIDE = 65535  # a sandbox's user namespace maps 65536 ids
# Unlike SandboxPath, `..` is allowed: a files path is resolved in the sandbox's root, where
# it cannot climb out.
FilePath = Annotated[
    str, Field(pattern=FILE_PATH_PATTERN, description="Absolute, as a process inside sees it.")
]
IdInside = Annotated[int, Field(ge=0, le=MAX_ID_INSIDE), WHOLE]


class Entry(BaseModel):
    """A file, directory or link in a sandbox, as a process inside sees it."""

    path: str
    name: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: str = Field(description="Permission bits in octal, e.g. 0644 (with setuid, sticky...).")
    uid: int = Field(description="The owner as seen inside the sandbox.")
    gid: int = Field(description="The group as seen inside the sandbox.")
    mtime: datetime
    target: str | None = Field(None, description="Where a symlink points; symlinks only.")


class EntryList(BaseModel):
    items: list[Entry]


class MkdirRequest(_Input):
    path: FilePath
    parents: bool = Field(True, description="Make missing parents; an existing directory is 200.")
    mode: str = Field("0755", pattern=FILE_MODE_PATTERN)
    uid: IdInside | None = Field(None, description="Owner as seen inside (default root).")
    gid: IdInside | None = Field(None, description="Group as seen inside (default root's).")


class MoveRequest(_Input):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
    source: FilePath = Field(alias="from", description="Absolute path of what is moved.")
    to: FilePath = Field(description="The path it gets (what is there is replaced, as by mv).")


class SandboxFiles(Protocol):
    """A running sandbox's files (paths as inside, resolved in its root); close it after."""

    async def stat(self, path: str) -> Entry: ...
    async def list(self, path: str, depth: int) -> builtins.list[Entry]: ...
    async def mkdir(self, spec: MkdirRequest) -> tuple[Entry, bool]: ...
    async def move(self, source: str, to: str) -> Entry: ...
    async def delete(self, path: str, recursive: bool) -> None: ...
    async def read(self, path: str) -> tuple[int, AsyncIterator[bytes]]: ...
    async def write(
        self,
        path: str,
        chunks: AsyncIterator[bytes],
        mode: str,
        uid: int | None,
        gid: int | None,
    ) -> tuple[Entry, bool]: ...
    async def archive(self, path: str) -> AsyncIterator[bytes]: ...
    async def unpack(self, path: str, chunks: AsyncIterator[bytes]) -> None: ...
    def close(self) -> None: ...
