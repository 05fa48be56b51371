"""The daemon's side of bridge networking: the bridge, the host ends of the sandboxes' links,
egress NAT, and the files that name a bridged sandbox's address and name servers.

Runs in: the daemon, host root in the host's namespaces, on its asyncio loop, through pyroute2's
AsyncIPRoute and AsyncNFTables (the sync classes must not run inside a running loop: pyroute2
issue 1342); `sandboxd cleanup` runs the same code under asyncio.run. The sandbox's side (the
veth pair, eth0's address and route) is made by process A, in daemon/sandbox/build.py; addresses are
leased in the store (daemon/store/database.py); published ports are daemon/network/ports.py.

What it owns on the host, and how it tells its own from anyone else's:
    the bridge (config bridge_name)   its alias says "sandboxd STATE_DIR": a bridge of that name
                                      with another alias belongs to another daemon, and is refused,
                                      unless that state directory has no database any more (the
                                      owner is gone): then it is taken over, made afresh
    sbxXXXXXXXXXXXX                   a sandbox's host link (from its id), enslaved to the bridge
    nft table ip sandboxd-BRIDGE      egress on: the masquerade rule; off: a forward rule that
                                      drops what the sandboxes send beyond the bridge
The bridge stays when the daemon stops; only `sandboxd cleanup` removes it. Which bridge and
subnet a state directory uses by default is daemon/lifecycle/claims.py's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from ipaddress import IPv4Address, IPv4Network, ip_address, ip_network
from pathlib import Path
from typing import Any

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError
from pyroute2.netlink.nfnetlink.nftsocket import Cmp, Meta, Regs
from pyroute2.nftables.expressions import genex, ipv4addr, masq, verdict
from pyroute2.nftables.main import AsyncNFTables

from daemon.config import Config, ConfigError
from daemon.protocol import NetworkPlan

log = logging.getLogger(__name__)

HOST_IFNAME_PREFIX = "sbx"
_RT_TABLE_LOCAL = 255
_NF_DROP = 0
_GONE_TIMEOUT = 5.0
_IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")
_RESOLV_CONF = Path("/etc/resolv.conf")
# Where systemd-resolved keeps the upstream servers when /etc/resolv.conf names its stub.
_RESOLVED_UPSTREAMS = Path("/run/systemd/resolve/resolv.conf")


class NetworkError(Exception):
    """The kernel refused a step of the bridge's or a link's setup."""


def host_ifname(sandbox_id: str) -> str:
    """The host end of a sandbox's veth: sbx + 12 hex digits of its id (15 characters)."""
    return HOST_IFNAME_PREFIX + sandbox_id.removeprefix("sb_")[:12]


def mac_for(ip: str) -> str:
    """A locally administered MAC made of the address, as Docker does: a reused address then
    keeps its MAC, so the host's and other sandboxes' ARP caches never point at a dead link."""
    return "02:5b:" + ":".join(f"{octet:02x}" for octet in IPv4Address(ip).packed)


class BridgeNetwork:
    """The daemon's bridge and everything plugged into it."""

    def __init__(self, config: Config) -> None:
        self.bridge = config.bridge_name
        self.subnet = config.bridge_subnet
        self.gateway = str(self.subnet.network_address + 1)
        self.egress = config.egress
        self.alias = owner_alias(config)

    def plan(self, sandbox_id: str, ip: str) -> NetworkPlan:
        """What process A needs to plug the sandbox in."""
        return NetworkPlan(
            bridge=self.bridge,
            host_ifname=host_ifname(sandbox_id),
            mac=mac_for(ip),
            ip=ip,
            prefix=self.subnet.prefixlen,
            gateway=self.gateway,
        )

    async def start(self) -> None:
        """Make the bridge (or check the one there is ours), then egress on or off."""
        try:
            async with _ipr() as ipr:
                orphan = await check_bridge(ipr, self.subnet, self.bridge, self.alias)
                if orphan is not None:
                    await self._take_over(ipr, orphan)
                await self._ensure_bridge(ipr)
            if self.egress:
                _IP_FORWARD.write_text("1\n")
            await set_egress(self.bridge, self.subnet, self.egress)
        except (NetlinkError, OSError) as exc:
            raise NetworkError(f"cannot set up the bridge {self.bridge}: {exc}") from exc

    async def _take_over(self, ipr: AsyncIPRoute, alias: str) -> None:
        """Remove a bridge of our name whose owner is gone, with the links on it (of sandboxes
        whose records went with their state directory): _ensure_bridge then makes ours."""
        log.warning("taking over the bridge %s: its owner (%s) is gone", self.bridge, alias)
        for name in await bridge_ports(ipr, self.bridge):
            await delete_link(ipr, name)
        await delete_link(ipr, self.bridge)

    async def _ensure_bridge(self, ipr: AsyncIPRoute) -> None:
        """Make the bridge if it is missing (check_bridge vouched for one that is there)."""
        found = await ipr.link_lookup(ifname=self.bridge)
        if not found:
            # A MAC of its own: a bridge left to take its ports' lowest MAC changes it as ports
            # come and go, and every sandbox's ARP entry for the gateway goes stale with it.
            mac = "02:5a:" + ":".join(f"{b:02x}" for b in self.subnet.network_address.packed)
            await ipr.link("add", ifname=self.bridge, kind="bridge", address=mac)
            found = await ipr.link_lookup(ifname=self.bridge)
            await ipr.link("set", index=found[0], ifalias=self.alias)
            address = f"{self.gateway}/{self.subnet.prefixlen}"
            await ipr.addr("add", index=found[0], address=address)
            log.info("made the bridge %s with %s", self.bridge, address)
        await ipr.link("set", index=found[0], state="up")

    async def unplug(self, sandbox_id: str) -> None:
        """Delete a sandbox's host link (its eth0 goes with it) and wait until it is gone.

        The kernel tears down a dead sandbox's network namespace, and so the pair, on its own,
        20-45 ms later: an address is released only after we have seen the link go.
        """
        try:
            async with _ipr() as ipr:
                await delete_link(ipr, host_ifname(sandbox_id))
        except (NetlinkError, OSError) as exc:
            raise NetworkError(f"cannot remove the link of {sandbox_id}: {exc}") from exc

    async def remove_stale(self, live: set[str]) -> list[str]:
        """Delete our links on our bridge that belong to no live sandbox; their names. A
        failure is logged: it is no reason to refuse to serve the sandboxes that do live."""
        keep = {host_ifname(sandbox_id) for sandbox_id in live}
        removed = []
        try:
            async with _ipr() as ipr:
                for name in await bridge_ports(ipr, self.bridge):
                    if name not in keep:
                        log.warning("removing %s, a link of no sandbox this daemon has", name)
                        await delete_link(ipr, name)
                        removed.append(name)
        except (NetlinkError, OSError) as exc:
            log.error("cannot remove stale links from the bridge %s: %s", self.bridge, exc)
        return removed

    def identity(self, ip: str) -> tuple[str, str]:
        """The /etc/hosts address of a bridged sandbox's name, and its /etc/resolv.conf."""
        return ip, resolv_conf() if self.egress else ""


_SUBNET_TRIES = 10000


def unrouted_subnet(
    prefix: str = "10",
    first: int = 200,
    last: int = 254,
    prefixlen: int = 24,
    avoid: Sequence[IPv4Network] = (),
) -> IPv4Network:
    """A random PREFIX.X.Y.0/PREFIXLEN (X from `first` to `last`) that no route of the host's
    main table covers or falls in, nor any of `avoid`. Test modules take theirs from 10.200,
    benches from 10.100, daemons on default settings below (daemon/lifecycle/claims.py)."""
    taken = [*avoid]
    for line in Path("/proc/net/route").read_text().splitlines()[1:]:
        fields = line.split()
        dst, mask = (IPv4Address(bytes.fromhex(f)[::-1]) for f in (fields[1], fields[7]))
        if int(mask):
            taken.append(IPv4Network(f"{dst}/{mask}", strict=False))
    for _ in range(_SUBNET_TRIES):
        address = f"{prefix}.{random.randrange(first, last + 1)}.{random.randrange(256)}.0"
        subnet = IPv4Network(f"{address}/{prefixlen}", strict=False)
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise ConfigError(f"no free /{prefixlen} in {prefix}.{first}-{last}: set bridge_subnet")


def owner_alias(config: Config) -> str:
    return f"{_ALIAS_PREFIX}{config.state_dir}"


_ALIAS_PREFIX = "sandboxd "


def owner_gone(alias: str | None) -> bool:
    """Whether a link's alias names a sandboxd state directory that no longer holds a database:
    nothing can adopt the sandboxes behind it any more, so its bridge is free to take."""
    if alias is None or not alias.startswith(_ALIAS_PREFIX):
        return False
    state_dir = Path(alias.removeprefix(_ALIAS_PREFIX))
    return state_dir.is_absolute() and not (state_dir / "sandboxd.db").exists()


async def host_bridges() -> dict[str, tuple[str | None, IPv4Network | None]]:
    """Every bridge on the host: its alias and the network of its first IPv4 address."""
    found: dict[str, tuple[str | None, IPv4Network | None]] = {}
    try:
        async with _ipr() as ipr:
            for link in await dump(lambda: ipr.link("dump")):
                if link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND") != "bridge":
                    continue
                addresses = await dump(
                    partial(ipr.addr, "dump", family=socket.AF_INET, index=link["index"])
                )
                subnet = None
                if addresses:
                    first = addresses[0]
                    subnet = IPv4Network(
                        f"{first.get('address')}/{first['prefixlen']}", strict=False
                    )
                found[link.get("ifname")] = (link.get("ifalias"), subnet)
    except (NetlinkError, OSError) as exc:
        raise NetworkError(f"cannot read the host's links: {exc}") from exc
    return found


async def preflight(config: Config) -> None:
    """Check, changing nothing, that the daemon may use its bridge and subnet: ConfigError
    if not (`sandboxd serve` does this before it binds anything)."""
    try:
        async with _ipr() as ipr:
            await check_bridge(ipr, config.bridge_subnet, config.bridge_name, owner_alias(config))
    except (NetlinkError, OSError) as exc:
        raise NetworkError(f"cannot read the host's links and routes: {exc}") from exc


_DUMP_TRIES = 5


async def dump(request: Callable[[], Awaitable[AsyncIterator[Any]]]) -> list[Any]:
    """A whole netlink dump. One that the kernel marks interrupted (NLM_F_DUMP_INTR: a link or
    route changed meanwhile, as they do on a busy host) is taken again, a few times."""
    for attempt in range(1, _DUMP_TRIES + 1):
        try:
            return [message async for message in await request()]
        except NetlinkDumpInterrupted:
            if attempt == _DUMP_TRIES:
                raise
            log.debug("a netlink dump was interrupted; taking it again")
    raise AssertionError("unreachable")


async def check_bridge(
    ipr: AsyncIPRoute, subnet: IPv4Network, bridge: str, alias: str
) -> str | None:
    """ConfigError for a link of the bridge's name that is not ours (not a bridge, or a live
    daemon's), for our bridge with another subnet, and for a subnet that any route but our
    bridge's covers or falls within. The alias of a bridge of our name whose owner is gone,
    for the caller to take over; else None."""
    ours = orphan = None
    for link in await dump(lambda: ipr.link("dump")):
        if link.get("ifname") != bridge:
            continue
        kind = link.get_nested("IFLA_LINKINFO", "IFLA_INFO_KIND")
        if kind == "bridge" and owner_gone(link.get("ifalias")):
            ours, orphan = link["index"], link.get("ifalias")  # its routes go with it
            continue
        if kind != "bridge" or link.get("ifalias") != alias:
            raise ConfigError(
                f"a link named {bridge} exists that this daemon did not make "
                f"({kind or 'no kind'}, alias {link.get('ifalias')!r}, expected {alias!r}): "
                "choose another bridge_name"
            )
        ours = link["index"]
        address = f"{subnet.network_address + 1}/{subnet.prefixlen}"
        addresses = [
            f"{a.get('address')}/{a['prefixlen']}"
            for a in await dump(partial(ipr.addr, "dump", family=socket.AF_INET, index=ours))
        ]
        if addresses != [address]:
            raise ConfigError(
                f"the bridge {bridge} has the address(es) {', '.join(addresses) or 'none'}, "
                f"not {address} for bridge_subnet {subnet}: remove it with `sandboxd cleanup` "
                "(with the old settings) or set bridge_subnet back"
            )
    for route in await dump(lambda: ipr.route("dump", family=socket.AF_INET)):
        table = route.get("table")
        if table == _RT_TABLE_LOCAL or route["dst_len"] == 0 or route.get("oif") == ours:
            continue
        dst = ip_network(f"{route.get('dst')}/{route['dst_len']}", strict=False)
        if isinstance(dst, IPv4Network) and dst.overlaps(subnet):
            raise ConfigError(
                f"bridge_subnet {subnet} clashes with the host's route to {dst} (table "
                f"{table}): choose another subnet for bridged sandboxes"
            )
    return orphan


async def bridge_ports(ipr: AsyncIPRoute, bridge: str) -> list[str]:
    """The names of our links (sbx...) enslaved to `bridge`: anything else an operator put
    there is left alone."""
    found = await ipr.link_lookup(ifname=bridge)
    if not found:
        return []
    return [
        link.get("ifname")
        for link in await dump(lambda: ipr.link("dump"))
        if link.get("master") == found[0] and link.get("ifname").startswith(HOST_IFNAME_PREFIX)
    ]


async def delete_link(ipr: AsyncIPRoute, name: str) -> None:
    """Delete the link `name` if it exists, and return once the kernel no longer lists it."""
    with contextlib.suppress(NetlinkError):  # ENODEV: gone already, or going
        await ipr.link("del", ifname=name)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _GONE_TIMEOUT
    while await ipr.link_lookup(ifname=name):
        if loop.time() > deadline:
            raise OSError(errno.EBUSY, f"the link {name} did not go away")
        await asyncio.sleep(0.005)


# -- egress -----------------------------------------------------------------------------------


def nft_table(bridge: str) -> str:
    return f"sandboxd-{bridge}"


async def set_egress(bridge: str, subnet: IPv4Network, egress: bool) -> None:
    """Our nft table, made afresh. Egress on: `ip saddr SUBNET ip daddr != SUBNET masquerade`
    in a nat postrouting chain. Off: `iifname BRIDGE oifname != BRIDGE drop` in a filter
    forward chain, so that a host that forwards anyway (ip_forward on for something else)
    still does not carry the sandboxes' packets out. Traffic within the subnet keeps its
    addresses; bridged traffic (sandbox to sandbox, which br_netfilter shows to the forward
    hook as from the bridge to the bridge) and traffic to and from the host pass."""
    table = nft_table(bridge)
    async with _nft() as nft:
        if table in await _tables(nft):
            await nft.table("del", name=table)
        await nft.table("add", name=table)
        if egress:
            chain, hook, kind = "postrouting", "postrouting", "nat"
            rule = (
                ipv4addr(src=str(subnet)),
                ipv4addr(dst=str(subnet), op=Cmp.NFT_CMP_NEQ),
                masq(),
            )
        else:
            chain, hook, kind = "forward", "forward", "filter"
            rule = (
                _ifname_is(Meta.NFT_META_IIFNAME, bridge, Cmp.NFT_CMP_EQ),
                _ifname_is(Meta.NFT_META_OIFNAME, bridge, Cmp.NFT_CMP_NEQ),
                verdict(code=_NF_DROP),
            )
        await nft.chain("add", table=table, name=chain, hook=hook, type=kind, priority=100)
        await nft.rule("add", table=table, chain=chain, expressions=rule)


def _ifname_is(key: Meta, name: str, op: Cmp) -> list[dict[str, Any]]:
    """`meta iifname|oifname ==|!= NAME` as nftables expressions."""
    value = name.encode().ljust(16, b"\0")  # names compare as IFNAMSIZ bytes
    return [
        genex("meta", {"dreg": Regs.NFT_REG_1, "key": key}),
        genex("cmp", {"sreg": Regs.NFT_REG_1, "op": op,
                      "data": {"attrs": [("NFTA_DATA_VALUE", value)]}}),
    ]  # fmt: skip


async def remove_egress_table(bridge: str) -> bool:
    """Drop our nft table if it is there; whether it was."""
    table = nft_table(bridge)
    async with _nft() as nft:
        if table not in await _tables(nft):
            return False
        await nft.table("del", name=table)
        return True


async def _tables(nft: AsyncNFTables) -> set[str]:
    return {t.get("NFTA_TABLE_NAME") async for t in await nft.get_tables()}


def resolv_conf() -> str:
    """The host's name servers for a sandbox that can reach them: its resolv.conf without
    loopback servers (they would be the sandbox's own loopback), with its search and options.
    """
    lines = _resolv_lines(_RESOLV_CONF)
    if not any(line.startswith("nameserver") for line in lines):
        lines = _resolv_lines(_RESOLVED_UPSTREAMS)  # only a local stub: its upstreams
    return "".join(f"{line}\n" for line in lines)


def _resolv_lines(path: Path) -> list[str]:
    try:
        text = path.read_text()
    except OSError:
        return []
    kept = []
    for line in text.splitlines():
        words = line.split()
        if not words or words[0] not in ("nameserver", "search", "options"):
            continue
        if words[0] == "nameserver":
            try:
                if len(words) < 2 or ip_address(words[1].split("%")[0]).is_loopback:
                    continue
            except ValueError:
                continue
        kept.append(" ".join(words))
    return kept


# -- `sandboxd cleanup` -----------------------------------------------------------------------


async def cleanup(config: Config) -> list[str]:
    """Remove what the daemon made on the host's network: the links on its bridge, the bridge
    (only if it is ours) and the egress table. What was removed, one line each."""
    removed = []
    try:
        async with _ipr() as ipr:
            found = await ipr.link_lookup(ifname=config.bridge_name)
            if found:
                await _check_owner(ipr, found[0], config)
                for name in await bridge_ports(ipr, config.bridge_name):
                    await delete_link(ipr, name)
                    removed.append(f"link {name}")
                await delete_link(ipr, config.bridge_name)
                removed.append(f"bridge {config.bridge_name}")
        if await remove_egress_table(config.bridge_name):
            removed.append(f"nft table ip {nft_table(config.bridge_name)}")
    except (NetlinkError, OSError) as exc:
        raise NetworkError(f"cannot clean up the bridge {config.bridge_name}: {exc}") from exc
    return removed


async def _check_owner(ipr: AsyncIPRoute, index: int, config: Config) -> None:
    link = (await ipr.link("get", index=index))[0]
    alias = link.get("ifalias")
    if alias != owner_alias(config):
        raise ConfigError(
            f"the link {config.bridge_name} is not this daemon's (alias {alias!r}, expected "
            f"{owner_alias(config)!r}); leaving it alone"
        )


# -- pyroute2 sockets, one per operation ------------------------------------------------------


@contextlib.asynccontextmanager
async def _ipr() -> AsyncIterator[AsyncIPRoute]:
    # A socket per operation: a few microseconds to open, and no shared socket whose requests
    # could interleave between concurrent creates and deletes.
    async with AsyncIPRoute() as ipr:
        yield ipr


@contextlib.asynccontextmanager
async def _nft() -> AsyncIterator[Any]:
    nft = AsyncNFTables()
    await nft.setup_endpoint()
    try:
        yield nft
    finally:
        nft.close()
