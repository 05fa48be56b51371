"""What keeps daemons on one host apart: one daemon per state directory (a lock held for its
life), and for each state directory a bridge, subnet, cgroup and uid range of its own, claimed
host-wide once and recorded in the state directory so that a restart finds them again.

Runs in: the `sandboxd serve` and `sandboxd cleanup` processes, as root, before the service
starts (no event loop yet: the netlink look-up runs under asyncio.run).

    STATE/sandboxd.lock        flock'd for the daemon's whole life (and by cleanup); says its pid
    STATE/claims.json          the names and ranges this state directory took: a restart reuses
                               them, so adopted sandboxes keep their uids and addresses
    /var/lib/sandboxd-claims/  the host's registry: `lock`, flock'd while anyone claims, and one
                               ENTRY.json per state directory with what it uses. An entry whose
                               state directory has no claims.json any more is dropped.

What a setting that is not given becomes:
    state directory        /var/lib/sandboxd       any other
    bridge_name            sandboxd0               sandboxdN, the lowest N free host-wide
    cgroup_name            sandboxd                sandboxdN, the same N
    uid_base               1,000,000,000           the lowest free range above the default's room
    bridge_subnet          a 10.X.Y.0/P that no route and no other claim uses (X < 100, not
                           10.88, podman's default); P fits max_sandboxes + pool_size
A bridge already on the host with this state directory's alias keeps its name and subnet.
Given settings win; one that collides with another daemon's claim is only warned about.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Network
from pathlib import Path

from daemon.config import UID_RANGE, Config, ConfigError
from daemon.linux.cgroups import CGROUP_ROOT, find_cgroup2
from daemon.network.bridge import host_bridges, owner_alias, owner_gone, unrouted_subnet

log = logging.getLogger(__name__)

REGISTRY = Path("/var/lib/sandboxd-claims")
DEFAULTS = Config()  # the default state directory's daemon
DEFAULT_STATE_DIR = DEFAULTS.state_dir
LOCK_FILE = "sandboxd.lock"
RECORD_FILE = "claims.json"
CLAIMED = ("bridge_name", "bridge_subnet", "cgroup_name", "uid_base")
# The default state directory's daemon keeps today's uid_base; its ranges may grow this far
# (max_sandboxes + pool_size slots) before the first derived range begins.
_DEFAULT_ROOM = 2048 * UID_RANGE
_LAST_UID = 0xFFFFFFFE
_PODMAN_SUBNET = IPv4Network("10.88.0.0/16")
_SYS_NET = Path("/sys/class/net")


class StateDirBusy(ConfigError):
    """Another process (a daemon, or `sandboxd cleanup`) holds the state directory."""


@dataclass(frozen=True)
class Claim:
    """What one state directory's daemon uses on the host."""

    state_dir: str
    bridge_name: str
    bridge_subnet: IPv4Network
    cgroup_name: str
    uid_base: int
    uid_count: int

    @property
    def uids(self) -> range:
        return range(self.uid_base, self.uid_base + self.uid_count)

    def clashes(self, other: Claim) -> list[str]:
        """What of ours `other` uses too, one phrase each."""
        found = []
        if self.bridge_name == other.bridge_name:
            found.append(f"bridge {self.bridge_name}")
        if self.cgroup_name == other.cgroup_name:
            found.append(f"cgroup {self.cgroup_name}")
        if self.bridge_subnet.overlaps(other.bridge_subnet):
            found.append(f"subnet {self.bridge_subnet} (theirs {other.bridge_subnet})")
        if self.uids.start < other.uids.stop and other.uids.start < self.uids.stop:
            found.append(f"uids {_span(self.uids)} (theirs {_span(other.uids)})")
        return found

    def to_json(self) -> dict[str, object]:
        return {
            "state_dir": self.state_dir,
            "bridge_name": self.bridge_name,
            "bridge_subnet": str(self.bridge_subnet),
            "cgroup_name": self.cgroup_name,
            "uid_base": self.uid_base,
            "uid_count": self.uid_count,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> Claim:
        return cls(
            state_dir=str(data["state_dir"]),
            bridge_name=str(data["bridge_name"]),
            bridge_subnet=IPv4Network(str(data["bridge_subnet"])),
            cgroup_name=str(data["cgroup_name"]),
            uid_base=int(str(data["uid_base"])),
            uid_count=int(str(data["uid_count"])),
        )


def _span(uids: range) -> str:
    return f"{uids.start}-{uids.stop - 1}"


# -- the state directory's lock ---------------------------------------------------------------


# The state directories this process holds, by path: a second take returns the same fd.
_held: dict[Path, int] = {}


def lock_state_dir(state_dir: Path) -> int:
    """Take the state directory's lock, or StateDirBusy; the fd, which holds it until closed
    (or the process ends). It is close-on-exec, and the zygotes are exec'd: no sandbox
    process inherits it, so the lock goes with the daemon."""
    if state_dir in _held:  # this process holds it already (serve, then the service)
        return _held[state_dir]
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        raise StateDirBusy(
            f"another sandboxd process (pid {holder}) holds the state directory {state_dir}"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[state_dir] = fd
    return fd


def unlock(state_dir: Path) -> None:
    """Let the state directory go (for a process that goes on without it)."""
    fd = _held.pop(state_dir, None)
    if fd is not None:
        os.close(fd)


# -- claiming ---------------------------------------------------------------------------------


def claim(config: Config, registry: Path = REGISTRY) -> Config:
    """The config with this state directory's bridge, subnet, cgroup and uid range: those
    given, else those recorded, else new ones free host-wide; recorded and registered. Call
    it with the state directory locked. ConfigError if a recorded or derived one is taken."""
    with _registry(registry):
        others = [c for c in _entries(registry) if c.state_dir != str(config.state_dir)]
        record = _read_record(config.state_dir)
        bridges = asyncio.run(host_bridges())
        values = {key: str(getattr(config, key)) for key in CLAIMED if key in config.given}
        values |= {key: value for key, value in record.items() if key not in values}
        values |= _derive(config, values, others, bridges)
        mine = Claim(
            state_dir=str(config.state_dir),
            bridge_name=values["bridge_name"],
            bridge_subnet=IPv4Network(values["bridge_subnet"]),
            cgroup_name=values["cgroup_name"],
            uid_base=int(values["uid_base"]),
            uid_count=config.uid_count,
        )
        _check(config, mine, others)
        # A given setting overrides, but does not erase, what the state directory claimed.
        kept = record | {key: values[key] for key in CLAIMED if key not in config.given}
        _write_json(config.state_dir / RECORD_FILE, kept)
        _write_json(_entry_path(registry, config.state_dir), mine.to_json())
    log.info(
        "state directory %s: bridge %s, subnet %s, cgroup %s, uids %s",
        mine.state_dir, mine.bridge_name, mine.bridge_subnet, mine.cgroup_name, _span(mine.uids),
    )  # fmt: skip
    return _applied(config, mine)


def known(config: Config) -> Config | None:
    """The config with the names this state directory uses (given, recorded, or its bridge
    found by alias), for `sandboxd cleanup`; None if it never made a bridge."""
    if "bridge_name" in config.given or config.state_dir == DEFAULT_STATE_DIR:
        return config
    bridge = _read_record(config.state_dir).get("bridge_name")
    if bridge is None:
        alias = owner_alias(config)
        bridge = next((n for n, (a, _) in asyncio.run(host_bridges()).items() if a == alias), None)
    return None if bridge is None else config.replace(bridge_name=bridge)


def recorded(state_dir: Path) -> bool:
    """Whether a daemon on `state_dir` has claimed its names before (and not released them)."""
    return (state_dir / RECORD_FILE).exists()


def release(config: Config, registry: Path = REGISTRY) -> None:
    """Drop this state directory's claim and record (cleanup, with no sandbox left live):
    its next daemon claims afresh."""
    with _registry(registry):
        with contextlib.suppress(FileNotFoundError):
            _entry_path(registry, config.state_dir).unlink()
        with contextlib.suppress(FileNotFoundError):
            (config.state_dir / RECORD_FILE).unlink()


def _derive(
    config: Config,
    values: dict[str, str],
    others: list[Claim],
    bridges: dict[str, tuple[str | None, IPv4Network | None]],
) -> dict[str, str]:
    """New values for the claimed settings that are neither given nor recorded."""
    derived: dict[str, str] = {}
    alias = owner_alias(config)
    default_dir = config.state_dir == DEFAULT_STATE_DIR
    if {"bridge_name", "cgroup_name"} - values.keys():
        if default_dir:
            derived |= {"bridge_name": DEFAULTS.bridge_name, "cgroup_name": DEFAULTS.cgroup_name}
        else:
            name = f"sandboxd{_free_index(config, others, bridges)}"
            # A bridge on the host with our alias (an older sandboxd's, or a lost record): kept.
            bridge = next((n for n, (a, _) in bridges.items() if a == alias), name)
            derived |= {"bridge_name": bridge, "cgroup_name": name}
    if "uid_base" not in values:
        derived["uid_base"] = str(DEFAULTS.uid_base if default_dir else _free_uids(config, others))
    if "bridge_subnet" not in values:
        owner, subnet = bridges.get(
            values.get("bridge_name") or derived["bridge_name"], (None, None)
        )
        if owner == alias and subnet is not None:
            derived["bridge_subnet"] = str(subnet)  # the subnet its sandboxes lease from
        else:
            derived["bridge_subnet"] = str(_free_subnet(config, others, bridges))
    return {key: value for key, value in derived.items() if key not in values}


def _free_index(
    config: Config,
    others: list[Claim],
    bridges: dict[str, tuple[str | None, IPv4Network | None]],
) -> int:
    """The lowest N ≥ 1 whose sandboxdN no claim uses as a bridge or cgroup name, no link
    but a bridge of ours or of a gone owner has, and no cgroup directory exists for."""
    taken = {c.bridge_name for c in others} | {c.cgroup_name for c in others}
    cgroup_parents = [CGROUP_ROOT, *(p for p in CGROUP_ROOT.iterdir() if p.is_dir())]
    cgroup2 = find_cgroup2()
    if cgroup2 is not None:
        cgroup_parents.append(cgroup2)
    n = 1
    while True:
        name = f"sandboxd{n}"
        link_free = not (_SYS_NET / name).exists() or (
            name in bridges
            and (bridges[name][0] == owner_alias(config) or owner_gone(bridges[name][0]))
        )
        cgroup_free = not any((parent / name).exists() for parent in cgroup_parents)
        if name not in taken and link_free and cgroup_free:
            return n
        n += 1


def _free_uids(config: Config, others: list[Claim]) -> int:
    """The lowest uid_base, above the default daemon's room, whose range no claim overlaps."""
    count = config.uid_count
    taken = sorted(
        [
            (DEFAULTS.uid_base, DEFAULTS.uid_base + _DEFAULT_ROOM),
            *((c.uids.start, c.uids.stop) for c in others),
        ]
    )
    base = DEFAULTS.uid_base
    for start, stop in taken:
        if base + count <= start:
            break
        # Ranges start a whole number of slots above the default base, like its own slots.
        base = max(
            base, DEFAULTS.uid_base + -(-(stop - DEFAULTS.uid_base) // UID_RANGE) * UID_RANGE
        )
    if base + count - 1 > _LAST_UID:
        raise ConfigError(
            f"no free range of {count} uids is left for {config.state_dir}: set uid_base"
        )
    return base


def _free_subnet(
    config: Config,
    others: list[Claim],
    bridges: dict[str, tuple[str | None, IPv4Network | None]],
) -> IPv4Network:
    """A subnet that fits the sandboxes (with the network, gateway and broadcast addresses),
    from a /24 to a /16, that no route, bridge or claim on the host uses."""
    prefixlen = 32 - math.ceil(math.log2(config.slots + 3))
    avoid = [_PODMAN_SUBNET, *(c.bridge_subnet for c in others)]
    avoid += [subnet for _, subnet in bridges.values() if subnet is not None]
    return unrouted_subnet(first=1, last=99, prefixlen=min(24, max(16, prefixlen)), avoid=avoid)


def _check(config: Config, mine: Claim, others: list[Claim]) -> None:
    """ConfigError if what we did not get from the settings collides with another daemon's
    claim (a recorded range grown into the next by a larger max_sandboxes, or a copied state
    directory); a given setting that collides is only warned about: given settings win."""
    if mine.uid_base < UID_RANGE or mine.uids.stop - 1 > _LAST_UID:
        raise ConfigError(
            f"uid_base {mine.uid_base} with max_sandboxes {config.max_sandboxes} and pool_size "
            f"{config.pool_size}: the uid ranges must lie within [{UID_RANGE}, {_LAST_UID}]"
        )
    for other in others:
        for clash in mine.clashes(other):
            setting = clash.split()[0]
            key = {"bridge": "bridge_name", "cgroup": "cgroup_name", "subnet": "bridge_subnet"}
            if key.get(setting, "uid_base") in config.given:
                log.warning("%s is also used by the daemon of %s", clash, other.state_dir)
                continue
            raise ConfigError(
                f"{config.state_dir} would use {clash}, which the daemon of {other.state_dir} "
                f"has claimed: set it explicitly, or run `sandboxd cleanup` on one of them"
            )


def _applied(config: Config, mine: Claim) -> Config:
    return config.replace(
        bridge_name=mine.bridge_name,
        bridge_subnet=mine.bridge_subnet,
        cgroup_name=mine.cgroup_name,
        uid_base=mine.uid_base,
    )


# -- the registry and the record --------------------------------------------------------------


@contextlib.contextmanager
def _registry(registry: Path) -> Iterator[None]:
    """The host's registry, locked: claims are made one at a time, across processes."""
    registry.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(registry / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _entries(registry: Path) -> list[Claim]:
    """The live claims: an entry whose state directory no longer has its record is removed
    (the directory was deleted, or `sandboxd cleanup` released it)."""
    claims = []
    for path in registry.glob("*.json"):
        try:
            entry = Claim.from_json(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("ignoring the unreadable claim %s: %s", path, exc)
            continue
        if not (Path(entry.state_dir) / RECORD_FILE).exists():
            log.info("dropping the claim of %s: its state directory is gone", entry.state_dir)
            path.unlink(missing_ok=True)
            continue
        claims.append(entry)
    return claims


def _entry_path(registry: Path, state_dir: Path) -> Path:
    return registry / (hashlib.sha256(str(state_dir).encode()).hexdigest()[:16] + ".json")


def _read_record(state_dir: Path) -> dict[str, str]:
    try:
        data = json.loads((state_dir / RECORD_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {state_dir / RECORD_FILE}: {exc}") from exc
    return {key: str(data[key]) for key in CLAIMED if key in data}


def _write_json(path: Path, data: Mapping[str, object]) -> None:
    """Written whole or not at all: to a temporary file, then renamed over."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)
