"""The daemon's settings, declared once: each is a field of `Config` with its default, its rule
and its help, and everything else is derived from that declaration (pydantic-settings).

    field `max_body`   →  flag --max-body, variable SANDBOXD_MAX_BODY, key `max_body` in the TOML
                          file, a line of deploy/config.example.toml and of docs/configuration.md

Precedence, as the contract fixes it: a flag overrides the environment, which overrides the
configuration file, which overrides the defaults. `load_config` reads the three layers with
pydantic-settings' sources, merges them and validates the result once; a bad value is a
`ConfigError` whose message names the setting as it was given (`--max-body`,
`SANDBOXD_MAX_BODY` or `max_body in FILE`).
"""

from __future__ import annotations

import argparse
import enum
import os
import re
import tomllib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from pydantic_settings.sources.utils import parse_env_vars

DEFAULT_SOCKET = "unix:///run/sandboxd/sandboxd.sock"
DEFAULT_CONFIG_FILE = Path("/etc/sandboxd/config.toml")
SOCKET_NAME = "sandboxd.sock"
ENV_PREFIX = "SANDBOXD_"

# Each live sandbox owns a range of this many host uids (see Config.uid_base).
UID_RANGE = 65536
_MAX_UID = 0xFFFFFFFE
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
# The smallest disk, /tmp or /dev/shm: room for the identity files and the overlay's work dir.
MIN_DISK_BYTES = 1 << 20
MAX_DISK_BYTES = 1 << 44  # 16 TiB: more is surely a mistake for a filesystem in memory
# IFNAMSIZ is 16, including the terminating NUL.
_MAX_IFNAME = 15
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
SUPERVISORS = ("python", "native")
CGROUP_PARENTS = ("root", "delegated")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which one and where it was set."""


# -- where a setting may come from, and how it is shown -------------------------------------


class Source(enum.Flag):
    FLAG = enum.auto()
    ENV = enum.auto()
    FILE = enum.auto()
    ALL = FLAG | ENV | FILE


@dataclass(frozen=True)
class Doc:
    """How a setting is given and explained: its help, the placeholder of its value, the
    layers it may come from, and its default as a person reads it (when not the value)."""

    help: str
    metavar: str = "VALUE"
    sources: Source = Source.ALL
    default_text: str | None = None
    # Values the example file shows, commented out, besides the default.
    examples: tuple[str, ...] = ()
    # The flag, where it is not the setting's name (one of a list given by a repeated flag).
    flag_name: str | None = None
    # The values it may take, where they are a few words.
    choices: tuple[str, ...] = ()

    def flag(self, name: str) -> str:
        return self.flag_name or "--" + name.replace("_", "-")

    def variable(self, name: str) -> str:
        return ENV_PREFIX + name.upper()


# -- the rules, as validators that speak the messages users see ------------------------------


def _whole(minimum: int) -> Callable[[object], int]:
    def check(value: object) -> int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise ValueError(f"expected a whole number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected a whole number, got {value!r}")
        if value < minimum:
            raise ValueError(f"must be at least {minimum}, got {value}")
        return value

    return check


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"expected true or false, got {value!r}")


def _directory(value: object) -> Path:
    if not isinstance(value, str | Path) or not str(value) or "\x00" in str(value):
        raise ValueError(f"expected a directory path, got {value!r}")
    return Path(value).absolute()


def _listen(value: object) -> list[str]:
    urls = [u.strip() for u in value.split(",") if u.strip()] if isinstance(value, str) else value
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError("expected one or more listen URLs")
    for url in urls:
        parse_listen(url)
    return list(urls)


def _origins(value: object) -> list[str]:
    """Origins as a browser sends them (lower case, no default port, no path), or `*`."""
    values = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of origins like https://host:port")
    return list(dict.fromkeys(parse_origin(v) for v in values))


def _registries(value: object) -> list[str]:
    """Registry hosts as references name them: host or host:port."""
    values = [v.strip() for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ValueError("expected a list of registries like registry.lan:5000")
    for item in values:
        if not re.fullmatch(r"[A-Za-z0-9.-]+(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?", item):
            raise ValueError(f"expected a registry as HOST[:PORT], got {item!r}")
    return list(dict.fromkeys(values))


def _optional_file(value: object) -> str | None:
    """An absolute file path, or None (also for ""): what the example file shows as unset."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | Path) or "\x00" in str(value):
        raise ValueError(f"expected a file path, got {value!r}")
    return str(Path(value).absolute())


def _choice(choices: tuple[str, ...]) -> Callable[[object], str]:
    def check(value: object) -> str:
        if not isinstance(value, str) or value.strip().lower() not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return value.strip().lower()

    return check


def _name(value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ValueError("expected a name of letters, digits, _ . -")
    return value


def _ifname(value: object) -> str:
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _MAX_IFNAME
        or value in (".", "..")
        or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)
    ):
        raise ValueError(
            f"expected an interface name of 1 to {_MAX_IFNAME} letters, digits, '_', '.' or "
            f"'-', got {value!r}"
        )
    return value


def _subnet(value: object) -> IPv4Network:
    """An IPv4 network with room for the bridge and at least one sandbox, that is not
    loopback, link-local, multicast or reserved."""
    if isinstance(value, IPv4Network):
        subnet = value
    else:
        try:
            if not isinstance(value, str):
                raise ValueError("not a string")
            subnet = IPv4Network(value)
        except ValueError as exc:
            raise ValueError(
                f"expected an IPv4 network like 10.88.0.0/16, got {value!r} ({exc})"
            ) from None
    if not 8 <= subnet.prefixlen <= 30:
        raise ValueError(f"expected a prefix from /8 to /30, got {subnet}")
    if subnet.is_loopback or subnet.is_link_local or subnet.is_multicast or subnet.is_reserved:
        raise ValueError(f"{subnet} is not usable for a bridge")
    return subnet


def _token(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("expected a string")
    token = value.strip()
    # A bearer token travels in an HTTP header: printable ASCII, no spaces.
    if not token or not all("!" <= c <= "~" for c in token):
        raise ValueError("a token must be non-empty printable ASCII, no spaces")
    return token


def _size(value: object) -> int:
    size = _whole(MIN_DISK_BYTES)(value)
    if size > MAX_DISK_BYTES:
        raise ValueError(f"must be at most {MAX_DISK_BYTES}, got {size}")
    return size


Whole = Annotated[int, BeforeValidator(_whole(1))]
Size = Annotated[int, BeforeValidator(_size)]
Count = Annotated[int, BeforeValidator(_whole(0))]
Flag = Annotated[bool, BeforeValidator(_boolean)]
Directory = Annotated[Path, BeforeValidator(_directory)]


# -- the declaration ---------------------------------------------------------------------------


class Config(BaseSettings):
    """Every setting of the daemon. Built by `load_config`; `Config()` is the defaults."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, frozen=True, extra="forbid", validate_default=True
    )

    config: Annotated[
        Path | None,
        Doc(
            "the TOML configuration file",
            "FILE",
            Source.FLAG | Source.ENV,
            "/etc/sandboxd/config.toml if it exists",
        ),
    ] = None
    listen: Annotated[
        list[str],
        NoDecode,
        BeforeValidator(_listen),
        Doc(
            "endpoints to serve on: unix:///path (socket mode 0660, owned by root) and/or "
            "tcp://HOST:PORT (an IPv6 host in brackets); a tcp:// endpoint needs a token, since "
            "exec is root-equivalent power; repeatable (comma-separated in the environment)",
            "URL",
            default_text="unix://RUN_DIR/sandboxd.sock",
            examples=('["unix:///run/sandboxd/sandboxd.sock", "tcp://127.0.0.1:7700"]',),
        ),
    ] = Field(default_factory=lambda: [DEFAULT_SOCKET])
    state_dir: Annotated[
        Directory, Doc("the SQLite database and the sandboxes' writable layers (mode 0700)", "DIR")
    ] = Path("/var/lib/sandboxd")
    run_dir: Annotated[
        Directory, Doc("sockets and the live sandboxes' runtime files (mode 0700)", "DIR")
    ] = Path("/run/sandboxd")
    token: Annotated[
        str | None,
        BeforeValidator(_token),
        Doc(
            "the bearer token every request but GET /healthz must carry (Authorization: Bearer "
            "TOKEN): printable ASCII without spaces; give token or token_file, not both",
            "TOKEN",
            default_text="none",
        ),
    ] = Field(None, repr=False)
    token_file: Annotated[
        Path | None,
        Doc(
            "read the bearer token from FILE (better than a token in the file or the "
            "environment: keep it mode 0600, or use systemd's LoadCredential=)",
            "FILE",
            default_text="none",
            examples=('"/etc/sandboxd/token"',),
        ),
    ] = None
    max_sandboxes: Annotated[
        Whole, Doc("how many sandboxes may exist at once; past it, create answers 503", "N")
    ] = 1000
    output_limit: Annotated[
        Whole,
        Doc(
            "bytes of stdout and of stderr kept per exec; past it the stream is truncated", "BYTES"
        ),
    ] = 1024 * 1024
    log_limit: Annotated[
        Whole,
        Doc(
            "bytes of a sandbox's main command's stdout and of its stderr kept in its log "
            "(the last ones)",
            "BYTES",
        ),
    ] = 1024 * 1024
    max_body: Annotated[Whole, Doc("request bodies larger than this answer 413", "BYTES")] = (
        1024 * 1024
    )
    exec_retention: Annotated[
        Whole, Doc("how long a finished exec's record (status, output) is kept", "SECONDS")
    ] = 86400
    pool_size: Annotated[
        Count,
        Doc(
            "sandboxes kept started on the default options, so that a create asking for no "
            "more than a name, host name, labels, env and ttl takes one at once",
            "N",
        ),
    ] = 0
    default_disk_bytes: Annotated[
        Size,
        Doc(
            "a sandbox's writable layer (a tmpfs charged to its memory) when its create gives no "
            "limits.disk_bytes: 1 GiB holds a language runtime and its packages, and idle "
            "sandboxes cost nothing until they write",
            "BYTES",
        ),
    ] = 1 << 30
    tmp_bytes: Annotated[
        Size, Doc("the size of every sandbox's /tmp, at most its disk_bytes", "BYTES")
    ] = 256 << 20
    shm_bytes: Annotated[
        Size, Doc("the size of every sandbox's /dev/shm, at most its disk_bytes", "BYTES")
    ] = 64 << 20
    supervisor_timeout: Annotated[
        Whole,
        Doc(
            "seconds the daemon waits for an answer a supervisor owes at once (an exec's "
            "STARTED, a SUBSCRIBED): past it the request answers 504 supervisor-unresponsive",
            "SECONDS",
        ),
    ] = 5
    net_zygote_idle: Annotated[
        Count,
        Doc(
            "seconds without a new bridged sandbox before the daemon stops the process that "
            "builds them (pyroute2 loaded, about 20 MiB); the next bridged create starts it "
            "again; 0 keeps it running once started",
            "SECONDS",
        ),
    ] = 60
    metrics_public: Annotated[
        Flag,
        Doc(
            "serve GET /metrics without the token (for a Prometheus that holds none); what it "
            "shows: counts, timings, and the ids, names and usage of running sandboxes",
            default_text="off",
        ),
    ] = False
    event_queue: Annotated[
        Whole,
        Doc(
            "events a client following GET /events may fall behind by; past it the daemon ends "
            "its stream (it resumes with Last-Event-ID) rather than hold more for it",
            "N",
        ),
    ] = 1024
    cors_origins: Annotated[
        list[str],
        NoDecode,
        BeforeValidator(_origins),
        Doc(
            "browser origins (http(s)://HOST[:PORT], or * for any) whose pages may call the "
            "API; repeatable (comma-separated in the environment); none: CORS is off",
            "ORIGIN",
            default_text="none",
            flag_name="--cors-origin",
            examples=('["https://dashboard.example:8443"]',),
        ),
    ] = Field(default_factory=list)
    insecure_registries: Annotated[
        list[str],
        NoDecode,
        BeforeValidator(_registries),
        Doc(
            "registries (HOST[:PORT]) pulled from over plain HTTP; loopback registries always "
            "are; repeatable (comma-separated in the environment)",
            "HOST",
            default_text="none",
            flag_name="--insecure-registry",
            examples=('["registry.lan:5000"]',),
        ),
    ] = Field(default_factory=list)
    registry_auth: Annotated[
        str | None,
        BeforeValidator(_optional_file),
        Doc(
            "a Docker config.json whose `auths` give the credentials for pulls (basic, also "
            "for a registry's token service)",
            "FILE",
            default_text="none",
        ),
    ] = None
    log_level: Annotated[
        str,
        BeforeValidator(_choice(LOG_LEVELS)),
        Doc("log lines at this level and above", "LEVEL", choices=LOG_LEVELS),
    ] = "info"
    log_format: Annotated[
        str,
        BeforeValidator(_choice(LOG_FORMATS)),
        Doc("text, or json: one object a line", "FORMAT", choices=LOG_FORMATS),
    ] = "text"
    supervisor: Annotated[
        str,
        BeforeValidator(_choice(SUPERVISORS)),
        Doc(
            "PID 1 of new sandboxes: python (a fork of the zygote) or native (a small static "
            "C program built with the package, exec'd once the sandbox is set up)",
            "KIND",
            choices=SUPERVISORS,
        ),
    ] = "native"
    cgroup_parent: Annotated[
        str,
        BeforeValidator(_choice(CGROUP_PARENTS)),
        Doc(
            "root: the sandboxes' cgroups at the top of the cgroup2 tree; delegated: under the "
            "daemon's own cgroup, the daemon in a leaf of it, as a systemd unit with "
            "Delegate=yes wants",
            "WHERE",
            choices=CGROUP_PARENTS,
        ),
    ] = "root"
    uid_base: Annotated[
        Whole,
        Doc(
            "the first host uid of the ranges given to sandboxes' user namespaces: each live "
            "sandbox owns [uid_base + slot * 65536, +65536); far above the usual /etc/subuid "
            "ranges; room for max_sandboxes + pool_size ranges below 2**32",
            "UID",
            Source.FILE,
        ),
    ] = 1_000_000_000
    cgroup_name: Annotated[
        str,
        BeforeValidator(_name),
        Doc(
            "the cgroup, at the top of each hierarchy, under which each sandbox gets one of its "
            "own; two daemons on one host need different ones",
            "NAME",
            Source.FILE,
        ),
    ] = "sandboxd"
    bridge_name: Annotated[
        str,
        BeforeValidator(_ifname),
        Doc(
            "the bridge that bridged sandboxes are plugged into",
            "NAME",
            default_text="sandboxd0 for /var/lib/sandboxd, else sandboxdN, claimed once per "
            "state directory",
        ),
    ] = "sandboxd0"
    bridge_subnet: Annotated[
        IPv4Network,
        BeforeValidator(_subnet),
        Doc(
            "the bridge's IPv4 subnet: the bridge holds the first address, sandboxes lease the "
            "rest; the daemon refuses to start if anything else on the host routes it",
            "CIDR",
            default_text="10.88.0.0/16 for /var/lib/sandboxd, else one no route uses, claimed "
            "once per state directory",
        ),
    ] = IPv4Network("10.88.0.0/16")
    egress: Annotated[
        Flag,
        Doc(
            "let bridged sandboxes reach the outside through NAT (turns on ip_forward), and "
            "give them the host's name servers",
            default_text="off",
        ),
    ] = False

    # The settings given by flag, environment or file; the others hold their defaults. Not part
    # of equality: two configs with the same values are the same, however they were set.
    # uid_base, cgroup_name, bridge_name and bridge_subnet, unless given, are claimed per state
    # directory when the daemon starts (daemon/lifecycle/claims.py), so that daemons side by side
    # never
    # share them: their defaults above are the names of the default state directory's daemon.
    _given: frozenset[str] = PrivateAttr(default=frozenset())

    @property
    def given(self) -> frozenset[str]:
        return self._given

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Config) and self.model_dump() == other.model_dump()

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.model_dump(mode="json").items(), key=str)))

    def replace(self, **changes: Any) -> Config:
        """A copy with `changes`, validated, that keeps what was given."""
        copy = Config.model_validate(self.model_dump() | changes)
        copy._given = self._given
        return copy

    @model_validator(mode="before")
    @classmethod
    def _socket_in_the_run_dir(cls, data: Any) -> Any:
        """The default endpoint is the socket in the run directory, wherever that is."""
        if isinstance(data, dict) and "listen" not in data and "run_dir" in data:
            run_dir = _directory(data["run_dir"])
            data = {**data, "listen": [f"unix://{run_dir / SOCKET_NAME}"]}
        return data

    @property
    def slots(self) -> int:
        """How many sandboxes may hold a uid range and an address at once: pooled ones too."""
        return self.max_sandboxes + self.pool_size

    @property
    def uid_count(self) -> int:
        """How many host uids the sandboxes take: a UID_RANGE for each slot."""
        return self.slots * UID_RANGE

    def slot_uid_base(self, slot: int) -> int:
        """The first host uid of a slot's range: root inside the sandbox holding it."""
        return self.uid_base + slot * UID_RANGE

    @model_validator(mode="after")
    def _uid_ranges_fit(self) -> Config:
        last_uid = self.uid_base + self.uid_count - 1
        if self.uid_base < UID_RANGE or last_uid > _MAX_UID:
            raise ValueError(
                f"uid_base {self.uid_base} with max_sandboxes {self.max_sandboxes} and pool_size "
                f"{self.pool_size}: the sandboxes' uid ranges must lie within "
                f"[{UID_RANGE}, {_MAX_UID}]"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Only what load_config merged: it reads the environment and the file itself, as
        # layers it can name in an error and apply the token rule to.
        return (init_settings,)


def settings() -> Iterator[tuple[str, FieldInfo, Doc]]:
    """Each setting, in declaration order, with its field and its documentation."""
    for name, field in Config.model_fields.items():
        doc = next(m for m in field.metadata if isinstance(m, Doc))
        yield name, field, doc


def _names(source: Source) -> frozenset[str]:
    return frozenset(name for name, _, doc in settings() if source in doc.sources)


FLAG_KEYS = _names(Source.FLAG)
ENV_KEYS = _names(Source.ENV)
FILE_KEYS = _names(Source.FILE)


# -- the three layers --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Setting:
    """A raw value and where it came from, so that an error can point at it."""

    value: object
    where: str


_Layer = dict[str, _Setting]


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source, over a given mapping instead of os.environ."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Config, env_prefix=ENV_PREFIX, env_ignore_empty=True)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(
            self._environ, self.case_sensitive, self.env_ignore_empty, self.env_parse_none_str
        )


def _environment(environ: Mapping[str, str]) -> _Layer:
    values = _Environment(environ)()
    return {
        name: _Setting(value, _doc(name).variable(name))
        for name, value in values.items()
        if name in ENV_KEYS and str(value).strip()
    }


def _file(given: _Setting | None) -> _Layer:
    """The file's settings; a missing default file is no file, a missing named one an error."""
    path = Path(str(given.value)) if given is not None else DEFAULT_CONFIG_FILE
    if given is None and not path.exists():
        return {}
    try:
        with path.open("rb"):
            pass
        data = TomlConfigSettingsSource(Config, toml_file=path)()
    except OSError as exc:
        raise ConfigError(f"cannot read the configuration file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    unknown = sorted(data.keys() - FILE_KEYS)
    if unknown:
        raise ConfigError(
            f"{path}: unknown setting(s) {', '.join(unknown)}; "
            f"the known ones are {', '.join(sorted(FILE_KEYS))}"
        )
    if "token" in data and "token_file" in data:
        raise ConfigError(f"{path}: set token or token_file, not both")
    layer = {key: _Setting(value, f"{key} in {path}") for key, value in data.items()}
    for key, setting in layer.items():  # relative to what? A service's cwd is arbitrary.
        if _is_path(key) and not Path(str(setting.value)).is_absolute():
            raise ConfigError(f"{setting.where}: expected an absolute path, got {setting.value!r}")
    return layer


def load_config(argv_values: Mapping[str, object], environ: Mapping[str, str]) -> Config:
    """Merge flags (`argv_values` by setting name, None meaning not given), the environment and
    the file into a Config. Empty environment variables count as unset. Raises ConfigError for
    an unreadable file, an unknown key or a value that cannot be used."""
    flags = {k: _Setting(v, _doc(k).flag(k)) for k, v in argv_values.items() if v is not None}
    env = _environment(environ)
    file = _file(flags.get("config") or env.get("config"))

    # Lowest layer first. The token is one setting given two ways: the highest layer that
    # gives either form wins, so a flag's --token-file beats a file's token.
    layers = [file, env, flags]
    token_layer = next((la for la in reversed(layers) if {"token", "token_file"} & la.keys()), {})
    merged: _Layer = {}
    for layer in layers:
        merged.update({k: v for k, v in layer.items() if k not in ("token", "token_file")})
    merged.update(_resolve_token(token_layer))
    merged.pop("config", None)  # where the settings came from, not one of them

    try:
        config = Config.model_validate({name: setting.value for name, setting in merged.items()})
    except ValidationError as exc:
        raise ConfigError(_explain(exc, merged)) from None
    config._given = frozenset(merged)
    return config


def _resolve_token(layer: Mapping[str, _Setting]) -> _Layer:
    """The token a layer gives: itself, or what its token file holds."""
    if "token" in layer and "token_file" in layer:
        raise ConfigError(f"{layer['token'].where} and {layer['token_file'].where}: give one")
    if "token_file" not in layer:
        return {k: v for k, v in layer.items() if k == "token"}
    setting = layer["token_file"]
    try:
        token = Path(str(setting.value)).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{setting.where}: cannot read the token file: {exc}") from exc
    return {"token_file": setting, "token": _Setting(token, setting.where)}


def _explain(exc: ValidationError, merged: Mapping[str, _Setting]) -> str:
    """The first error, said of the setting as the user gave it."""
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    name = str(error["loc"][0]) if error["loc"] else None
    if name is None:
        return message
    where = merged[name].where if name in merged else f"the default {name}"
    return f"{where}: {message}"


def variable(name: str) -> str:
    """The environment variable of a setting."""
    return _doc(name).variable(name)


def _doc(name: str) -> Doc:
    return next(m for m in Config.model_fields[name].metadata if isinstance(m, Doc))


def _is_path(name: str) -> bool:
    annotation = str(Config.model_fields[name].annotation)
    return "Path" in annotation


# -- the flags, the example file and the reference, from the declaration ------------------------


def _default_text(name: str, field: FieldInfo, doc: Doc) -> str:
    if doc.default_text is not None:
        return doc.default_text
    default = field.get_default(call_default_factory=True)
    return str(default)


def add_flags(parser: argparse.ArgumentParser, names: frozenset[str] = FLAG_KEYS) -> None:
    """The flags of the named settings, each with its help, variable and default."""
    token = parser.add_mutually_exclusive_group() if {"token", "token_file"} <= names else parser
    for name, field, doc in settings():
        if name not in names or Source.FLAG not in doc.sources:
            continue
        where = doc.variable(name) if Source.ENV in doc.sources else "file only"
        text = f"{doc.help} [{where}; default {_default_text(name, field, doc)}]"
        target = token if name in ("token", "token_file") else parser
        if field.annotation is bool:
            target.add_argument(
                doc.flag(name), dest=name, action=argparse.BooleanOptionalAction, help=text
            )
        elif field.annotation == list[str]:
            target.add_argument(
                doc.flag(name), dest=name, action="append", metavar=doc.metavar, help=text
            )
        elif doc.choices:
            target.add_argument(doc.flag(name), dest=name, choices=doc.choices, help=text)
        else:
            target.add_argument(doc.flag(name), dest=name, metavar=doc.metavar, help=text)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def example_toml() -> str:
    """deploy/config.example.toml: every setting the file takes, commented out at its default."""
    lines = [
        "# sandboxd configuration: /etc/sandboxd/config.toml (or --config FILE, or "
        "SANDBOXD_CONFIG).",
        "# Generated from daemon/config.py by `sandboxd settings --toml`: edit that, not this.",
        "# Every setting is optional; the values shown are the defaults. A flag overrides the",
        "# environment variable named beside each setting, which overrides this file. Paths",
        "# must be absolute. An unknown key is an error, so a misspelt setting is never ignored.",
    ]
    for name, field, doc in settings():
        if Source.FILE not in doc.sources:
            continue
        lines.append("")
        lines.extend(_wrap(doc.help[0].upper() + doc.help[1:] + ".", "# "))
        given = [doc.flag(name)] if Source.FLAG in doc.sources else []
        given += [doc.variable(name)] if Source.ENV in doc.sources else []
        lines.append("#   [" + (", ".join(given) or "this file only") + "]")
        default = field.get_default(call_default_factory=True)
        if default is not None or not doc.examples:
            shown = _toml_value(default) if default is not None else '""'
            lines.append(f"#{name} = {shown}")
        lines.extend(f"#{name} = {example}" for example in doc.examples)
    return "\n".join(lines) + "\n"


def reference_markdown() -> str:
    """docs/configuration.md: the table of every setting."""
    lines = [
        "# Configuration",
        "",
        "Generated from `daemon/config.py` by `sandboxd settings --markdown`; a test fails when",
        "it drifts. Each setting comes from a flag of `sandboxd serve`, an environment variable",
        "or a key of the TOML file (`--config FILE`, `SANDBOXD_CONFIG`, default",
        "`/etc/sandboxd/config.toml` when it exists): a flag overrides the environment, which",
        "overrides the file, which overrides the default. `deploy/config.example.toml` lists",
        "every key of the file.",
        "",
        "| setting | flag | environment | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, field, doc in settings():
        flag = f"`{doc.flag(name)} {doc.metavar}`" if Source.FLAG in doc.sources else "—"
        if field.annotation is bool:
            flag = f"`{doc.flag(name)}`, `--no-{name.replace('_', '-')}`"
        env = f"`{doc.variable(name)}`" if Source.ENV in doc.sources else "—"
        key = f"`{name}`" if Source.FILE in doc.sources else f"{name} (not in the file)"
        default = _default_text(name, field, doc)
        lines.append(f"| {key} | {flag} | {env} | `{default}` | {doc.help} |")
    return "\n".join(lines) + "\n"


def _wrap(text: str, prefix: str, width: int = 96) -> list[str]:
    lines: list[str] = []
    line = prefix
    for word in text.split():
        if len(line) + len(word) + 1 > width and line != prefix:
            lines.append(line.rstrip())
            line = prefix
        line += word + " "
    lines.append(line.rstrip())
    return lines


def parse_origin(value: str) -> str:
    """`scheme://host[:port]` as a browser's Origin header spells it, or `*` (any origin)."""
    if value == "*":
        return value
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid origin: {exc}") from exc
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or parts.username is not None
        or parts.password is not None
    ):
        raise ValueError(f"{value!r}: an origin is http(s)://HOST[:PORT], with no path")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default_port = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port not in (None, default_port) else "")


# -- listen URLs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class UnixEndpoint:
    path: Path


@dataclass(frozen=True)
class TcpEndpoint:
    host: str
    port: int


Endpoint = UnixEndpoint | TcpEndpoint


def parse_listen(url: str) -> Endpoint:
    """`unix:///abs/path` or `tcp://HOST:PORT` (an IPv6 host in brackets); ValueError otherwise."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r} is not a valid URL: {exc}") from exc
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: a listen URL takes no query or fragment")
    if parts.scheme == "unix":
        if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
            raise ValueError(f"{url!r}: expected unix:///absolute/path/to/socket")
        if len(os.fsencode(parts.path)) > _MAX_SOCKET_PATH:
            raise ValueError(f"{url!r}: a unix socket path is limited to {_MAX_SOCKET_PATH} bytes")
        return UnixEndpoint(Path(parts.path))
    if parts.scheme == "tcp":
        if not parts.hostname or port is None or parts.path not in ("", "/"):
            raise ValueError(f"{url!r}: expected tcp://HOST:PORT, e.g. tcp://127.0.0.1:8080")
        if parts.username is not None or parts.password is not None:
            raise ValueError(f"{url!r}: a listen URL takes no user or password")
        return TcpEndpoint(parts.hostname, port)
    raise ValueError(f"{url!r}: the scheme must be unix:// or tcp://")
