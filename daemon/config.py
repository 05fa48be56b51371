"""The daemon's settings: one frozen dataclass, filled from flags, environment and a TOML file.

Precedence, as the contract fixes it: a flag overrides the environment, which overrides the
configuration file, which overrides the defaults below. `load_config` does the merging and
checks every value before anything acts on it; a bad value is a `ConfigError` whose message
names the setting and where it came from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from pathlib import Path
from urllib.parse import urlsplit

DEFAULT_SOCKET = "unix:///run/sandboxd/sandboxd.sock"
DEFAULT_CONFIG_FILE = Path("/etc/sandboxd/config.toml")
DEFAULT_SUBNET = IPv4Network("10.88.0.0/16")
SOCKET_NAME = "sandboxd.sock"

# Each live sandbox owns a range of this many host uids (see Config.uid_base).
UID_RANGE = 65536
_MAX_UID = 0xFFFFFFFE
# sun_path is 108 bytes on Linux, including the terminating NUL.
_MAX_SOCKET_PATH = 107
# IFNAMSIZ is 16, including the terminating NUL.
_MAX_IFNAME = 15
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")
CGROUP_PARENTS = ("root", "delegated")
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


@dataclass(frozen=True)
class Config:
    listen: list[str] = field(default_factory=lambda: [DEFAULT_SOCKET])
    state_dir: Path = Path("/var/lib/sandboxd")
    run_dir: Path = Path("/run/sandboxd")
    token: str | None = None
    max_sandboxes: int = 1000
    output_limit: int = 1024 * 1024
    max_body: int = 1024 * 1024
    # First host uid of the ranges given to sandboxes' user namespaces: each live sandbox
    # owns [uid_base + slot * 65536, +65536). Far above the usual /etc/subuid ranges.
    uid_base: int = 1_000_000_000
    # The cgroup (in the cgroup2 hierarchy) under which each sandbox gets one of its own.
    cgroup_name: str = "sandboxd"
    # How long a finished exec's record (status and output) is kept, in seconds.
    exec_retention: int = 86400
    # The bridge that bridged sandboxes are plugged into, and its subnet: the bridge holds the
    # first address, sandboxes lease the rest. 10.88/16 is podman's default and rarely used
    # elsewhere; the daemon refuses to start if anything else on the host routes it.
    bridge_name: str = "sandboxd0"
    bridge_subnet: IPv4Network = DEFAULT_SUBNET
    # Masquerade the bridge's subnet to the outside (and turn on ip_forward).
    egress: bool = False
    # Sandboxes kept started on the default options, so that a create that asks for no more
    # than a name, host name, labels, env and ttl takes one at once (see the README's Pool).
    pool_size: int = 0
    # The log: lines at this level or above (debug, info, warning, error), as text or json.
    log_level: str = "info"
    log_format: str = "text"
    # Where the cgroup2 tree of sandboxes goes: "root", CGROUP2/cgroup_name; "delegated", under
    # the daemon's own cgroup (a systemd unit with Delegate=yes), the daemon in a leaf of it.
    cgroup_parent: str = "root"


class ConfigError(ValueError):
    """A setting that cannot be used; the message says which one and where it was set."""


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


# Setting name -> environment variable. uid_base is deliberately file-only;
# SANDBOXD_TOKEN_FILE is an addition to the contract's table (systemd credentials use files).
ENVIRONMENT = {
    "config": "SANDBOXD_CONFIG",
    "listen": "SANDBOXD_LISTEN",
    "state_dir": "SANDBOXD_STATE_DIR",
    "run_dir": "SANDBOXD_RUN_DIR",
    "token": "SANDBOXD_TOKEN",
    "token_file": "SANDBOXD_TOKEN_FILE",
    "max_sandboxes": "SANDBOXD_MAX_SANDBOXES",
    "output_limit": "SANDBOXD_OUTPUT_LIMIT",
    "max_body": "SANDBOXD_MAX_BODY",
    "exec_retention": "SANDBOXD_EXEC_RETENTION",
    "bridge_name": "SANDBOXD_BRIDGE_NAME",
    "bridge_subnet": "SANDBOXD_BRIDGE_SUBNET",
    "egress": "SANDBOXD_EGRESS",
    "pool_size": "SANDBOXD_POOL_SIZE",
    "log_level": "SANDBOXD_LOG_LEVEL",
    "log_format": "SANDBOXD_LOG_FORMAT",
    "cgroup_parent": "SANDBOXD_CGROUP_PARENT",
}
FILE_KEYS = frozenset(
    {"listen", "state_dir", "run_dir", "token", "token_file", "max_sandboxes"}
    | {"output_limit", "max_body", "uid_base", "cgroup_name", "exec_retention"}
    | {"bridge_name", "bridge_subnet", "egress", "pool_size"}
    | {"log_level", "log_format", "cgroup_parent"}
)


@dataclass(frozen=True)
class _Setting:
    """A raw value and where it came from, so that an error can point at it."""

    value: object
    where: str
    in_file: bool = False


_Layer = dict[str, _Setting]


def load_config(argv_values: Mapping[str, object], environ: Mapping[str, str]) -> Config:
    """Merge flags (`argv_values`, None meaning not given), environment and file into a Config.

    `argv_values` uses the setting names (listen, state_dir, run_dir, token, token_file,
    max_sandboxes, output_limit, max_body, bridge_name, bridge_subnet, egress, pool_size,
    log_level, log_format, cgroup_parent, config). Empty environment variables count as unset.
    Raises ConfigError for an unreadable file, an unknown key or a value that cannot be used.
    """
    flags = {k: _Setting(v, _flag(k)) for k, v in argv_values.items() if v is not None}
    env = {k: _Setting(environ[v], v) for k, v in ENVIRONMENT.items() if environ.get(v, "").strip()}
    if "listen" in env:
        urls = [u.strip() for u in str(env["listen"].value).split(",") if u.strip()]
        env["listen"] = _Setting(urls, env["listen"].where)
    file = _read_file(flags.get("config") or env.get("config"))

    # Lowest layer first. The token is one setting given two ways: the highest layer that
    # gives either form wins, so a flag's --token-file beats a file's token.
    layers = [file, env, flags]
    token_layer = next((la for la in reversed(layers) if {"token", "token_file"} & la.keys()), {})
    merged: _Layer = {}
    for layer in layers:
        merged.update(layer)

    def get(name: str) -> _Setting | None:
        return merged.get(name)

    run_dir = _path(get("run_dir"), Config.run_dir)
    config = Config(
        listen=_listen(get("listen"), default=f"unix://{run_dir / SOCKET_NAME}"),
        state_dir=_path(get("state_dir"), Config.state_dir),
        run_dir=run_dir,
        token=_token(token_layer),
        max_sandboxes=_integer(get("max_sandboxes"), Config.max_sandboxes),
        output_limit=_integer(get("output_limit"), Config.output_limit),
        max_body=_integer(get("max_body"), Config.max_body),
        uid_base=_integer(get("uid_base"), Config.uid_base),
        cgroup_name=_name(get("cgroup_name"), Config.cgroup_name),
        exec_retention=_integer(get("exec_retention"), Config.exec_retention),
        bridge_name=_ifname(get("bridge_name"), Config.bridge_name),
        bridge_subnet=_subnet(get("bridge_subnet"), Config.bridge_subnet),
        egress=_boolean(get("egress"), Config.egress),
        pool_size=_integer(get("pool_size"), Config.pool_size, minimum=0),
        log_level=_choice(get("log_level"), Config.log_level, LOG_LEVELS),
        log_format=_choice(get("log_format"), Config.log_format, LOG_FORMATS),
        cgroup_parent=_choice(get("cgroup_parent"), Config.cgroup_parent, CGROUP_PARENTS),
    )
    # Pooled sandboxes hold uid ranges too.
    last_uid = config.uid_base + (config.max_sandboxes + config.pool_size) * UID_RANGE - 1
    if config.uid_base < UID_RANGE or last_uid > _MAX_UID:
        raise ConfigError(
            f"uid_base {config.uid_base} with max_sandboxes {config.max_sandboxes} and pool_size "
            f"{config.pool_size}: the "
            f"sandboxes' uid ranges must lie within [{UID_RANGE}, {_MAX_UID}]"
        )
    return config


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _read_file(given: _Setting | None) -> _Layer:
    """The file's settings; a missing default file is no file, a missing named one an error."""
    path = Path(str(given.value)) if given is not None else DEFAULT_CONFIG_FILE
    if given is None and not path.exists():
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
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
    return {key: _Setting(value, f"{key} in {path}", in_file=True) for key, value in data.items()}


def _listen(setting: _Setting | None, default: str) -> list[str]:
    if setting is None:
        return [default]
    urls = [setting.value] if isinstance(setting.value, str) else setting.value
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ConfigError(f"{setting.where}: expected one or more listen URLs")
    for url in urls:
        try:
            parse_listen(url)
        except ValueError as exc:
            raise ConfigError(f"{setting.where}: {exc}") from exc
    return list(urls)


def _path(setting: _Setting | None, default: Path) -> Path:
    if setting is None:
        return default
    value = setting.value
    if not isinstance(value, str | Path) or not str(value) or "\x00" in str(value):
        raise ConfigError(f"{setting.where}: expected a directory path, got {value!r}")
    path = Path(value)
    if path.is_absolute():
        return path
    if setting.in_file:  # relative to what? The working directory of a service is arbitrary.
        raise ConfigError(f"{setting.where}: expected an absolute path, got {value!r}")
    return path.absolute()


def _integer(setting: _Setting | None, default: int, minimum: int = 1) -> int:
    if setting is None:
        return default
    value = setting.value
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(f"{setting.where}: expected a whole number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{setting.where}: expected a whole number, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{setting.where}: must be at least {minimum}, got {value}")
    return value


def _name(setting: _Setting | None, default: str) -> str:
    if setting is None:
        return default
    value = setting.value
    if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", value):
        raise ConfigError(f"{setting.where}: expected a name of letters, digits, _ . -")
    return value


def _ifname(setting: _Setting | None, default: str) -> str:
    if setting is None:
        return default
    value = setting.value
    if (
        not isinstance(value, str)
        or not 0 < len(value) <= _MAX_IFNAME
        or value in (".", "..")
        or not all(c.isascii() and (c.isalnum() or c in "_.-") for c in value)
    ):
        raise ConfigError(
            f"{setting.where}: expected an interface name of 1 to {_MAX_IFNAME} letters, "
            f"digits, '_', '.' or '-', got {value!r}"
        )
    return value


def _subnet(setting: _Setting | None, default: IPv4Network) -> IPv4Network:
    """An IPv4 network with room for the bridge and at least one sandbox, that is not
    loopback, link-local, multicast or reserved."""
    if setting is None:
        return default
    try:
        if not isinstance(setting.value, str):
            raise ValueError("not a string")
        subnet = IPv4Network(setting.value)
    except ValueError as exc:
        raise ConfigError(
            f"{setting.where}: expected an IPv4 network like 10.88.0.0/16, got "
            f"{setting.value!r} ({exc})"
        ) from None
    if not 8 <= subnet.prefixlen <= 30:
        raise ConfigError(f"{setting.where}: expected a prefix from /8 to /30, got {subnet}")
    if subnet.is_loopback or subnet.is_link_local or subnet.is_multicast or subnet.is_reserved:
        raise ConfigError(f"{setting.where}: {subnet} is not usable for a bridge")
    return subnet


def _boolean(setting: _Setting | None, default: bool) -> bool:
    if setting is None:
        return default
    value = setting.value
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigError(f"{setting.where}: expected true or false, got {value!r}")


def _choice(setting: _Setting | None, default: str, choices: tuple[str, ...]) -> str:
    if setting is None:
        return default
    value = setting.value
    if not isinstance(value, str) or value.strip().lower() not in choices:
        raise ConfigError(f"{setting.where}: expected one of {', '.join(choices)}, got {value!r}")
    return value.strip().lower()


def _token(layer: Mapping[str, _Setting]) -> str | None:
    if "token" in layer and "token_file" in layer:
        raise ConfigError(f"{layer['token'].where} and {layer['token_file'].where}: give one")
    if "token_file" in layer:
        setting = layer["token_file"]
        try:
            token = Path(str(setting.value)).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{setting.where}: cannot read the token file: {exc}") from exc
    elif "token" in layer:
        setting = layer["token"]
        if not isinstance(setting.value, str):
            raise ConfigError(f"{setting.where}: expected a string")
        token = setting.value.strip()
    else:
        return None
    # A bearer token travels in an HTTP header: printable ASCII, no spaces.
    if not token or not all("!" <= c <= "~" for c in token):
        raise ConfigError(f"{setting.where}: a token must be non-empty printable ASCII, no spaces")
    return token
