"""Network modes: bridge (an address on the daemon's bridge, sandbox to sandbox, published
ports), none and host; and that destroy, a failed create and a dead supervisor leave no link,
lease or port behind.

Traffic goes only to 127.0.0.1, [::1], the module's bridge address, the sandboxes' own
addresses and a test host of our own in a network namespace made here (egress): nothing
leaves the machine.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyroute2 import IPRoute, NetNS, netns
from pyroute2.nftables.main import NFTables

from daemon.config import Config
from tests.conftest import (
    ROOT,
    SYS_NET,
    Daemon,
    bridge_ports,
    free_subnet,
    host_ifname,
    wait_for,
)

SERVE = "cd /tmp && echo {text} > index.html && exec python3 -m http.server 80"
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read())"


def table_rules(table: str) -> list[tuple[str, list[str]]]:
    """The rules of an nft table: (chain, the names of their expressions)."""
    with NFTables() as nft:
        return [
            (
                rule.get("NFTA_RULE_CHAIN"),
                [e.get("NFTA_EXPR_NAME") for e in rule.get("NFTA_RULE_EXPRESSIONS")],
            )
            for rule in nft.get_rules()
            if rule.get("NFTA_RULE_TABLE") == table
        ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return int(s.getsockname()[1])


def fetch(url: str, timeout: float = 10.0) -> str:
    """The body at `url`, retrying while the server is not up yet."""

    def attempt() -> str | None:
        try:
            response = httpx.get(url, timeout=2)
        except httpx.TransportError:
            return None
        return response.text if response.status_code == 200 else None

    body = wait_for(attempt, timeout=timeout)
    assert body is not None, f"nothing answered at {url}"
    return str(body)


def bridged(daemon: Daemon, **body: Any) -> dict[str, Any]:
    network = {"mode": "bridge", "ports": body.pop("ports", [])}
    return daemon.create(network=network, **body)


def out(daemon: Daemon, box: dict[str, Any], script: str) -> str:
    result = daemon.sh(box["id"], script)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def leases(daemon: Daemon) -> dict[str, str]:
    """Sandbox id -> address, as the store holds them."""
    with sqlite3.connect(daemon.state_dir / "sandboxd.db") as db:
        rows = db.execute("SELECT id, ip FROM sandboxes WHERE ip IS NOT NULL").fetchall()
    return dict(rows)


def can_bind(port: int) -> bool:
    """Whether a server could take the port now (with SO_REUSEADDR, as servers do: the
    proxy's last connections may sit in TIME_WAIT)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            s.listen()
        except OSError as exc:
            assert exc.errno == errno.EADDRINUSE
            return False
    return True


# The tests that look for leaks anywhere in the daemon come first: once the module's two web
# sandboxes exist, they would count as leaks.


@pytest.fixture(scope="module")
def gateway(daemon: Daemon) -> str:
    return str(ipaddress.IPv4Network(daemon.subnet).network_address + 1)


@pytest.fixture(scope="module")
def web(daemon: Daemon) -> list[dict[str, Any]]:
    """Two bridged sandboxes, each serving its own page with `python3 -m http.server 80`."""
    boxes = []
    for text in ("one", "two"):
        port = free_port()
        box = bridged(daemon, name=f"web-{text}", ports=[{"host_port": port, "sandbox_port": 80}])
        started = time.monotonic()
        daemon.sh(box["id"], SERVE.format(text=text), wait=False)
        # http.server looks up a name for its address at bind: with no name server that
        # must fail at once, not stall for a resolver timeout.
        assert fetch(f"http://{box['network']['ip']}/index.html") == f"{text}\n"
        box["startup"] = time.monotonic() - started
        boxes.append(box)
    return boxes


def test_none_has_only_lo_and_host_sees_the_hosts_links(daemon: Daemon) -> None:
    none = daemon.create()
    host = daemon.create(namespaces=["pid", "mnt", "ipc", "uts", "user"], network={"mode": "host"})
    try:
        assert out(daemon, none, "ls /sys/class/net").split() == ["lo"]
        inside = set(out(daemon, host, "ls /sys/class/net").split())
        assert {"lo", daemon.bridge} <= inside
        assert inside == set(os.listdir(SYS_NET))
        assert none["network"]["ip"] is None and host["network"]["ip"] is None
    finally:
        for box in (none, host):
            daemon.client.delete(f"/sandboxes/{box['id']}")


def test_only_bridged_sandboxes_come_from_the_zygote_with_netlink(daemon: Daemon) -> None:
    """A supervisor keeps its zygote's command line: `… daemon.sandbox.zygote FD RUN net` for the
    one
    that loaded pyroute2. The others fork from the lean one (see daemon/lifecycle/service.py)."""
    none = daemon.create()
    bridged = daemon.create(network={"mode": "bridge"})
    try:
        words = {
            box["network"]["mode"]: Path(f"/proc/{box['pid']}/cmdline").read_bytes().split(b"\0")
            for box in (none, bridged)
        }
        if (daemon.supervisor or Config.model_fields["supervisor"].default) == "native":
            # B execs the native PID 1: nothing of either zygote (or pyroute2) is left in it.
            assert all(w[0] == b"sandboxd-init" for w in words.values()), words
            return
        assert words["bridge"][-2:] == [b"net", b""], words
        assert b"net" not in words["none"] and b"daemon.sandbox.zygote" in words["none"], words
    finally:
        for box in (none, bridged):
            daemon.client.delete(f"/sandboxes/{box['id']}")


def test_a_port_in_use_is_409_and_changes_nothing(daemon: Daemon) -> None:
    published = free_port()
    holder = bridged(daemon, ports=[{"host_port": published, "sandbox_port": 80}])
    before = daemon.client.get("/sandboxes").json()["items"]
    links, held = bridge_ports(daemon.bridge), leases(daemon)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        for port in (busy, published):
            body = {"mode": "bridge", "ports": [{"host_port": port, "sandbox_port": 80}]}
            response = daemon.client.post("/sandboxes", json={"network": body})
            assert response.status_code == 409, response.text
            assert str(port) in response.json()["detail"]
    twice = [{"host_port": 8000, "sandbox_port": 80}, {"host_port": 8000, "sandbox_port": 81}]
    response = daemon.client.post(
        "/sandboxes", json={"network": {"mode": "bridge", "ports": twice}}
    )
    assert response.status_code == 422, response.text
    assert daemon.client.get("/sandboxes").json()["items"] == before
    assert bridge_ports(daemon.bridge) == links and leases(daemon) == held
    daemon.client.delete(f"/sandboxes/{holder['id']}")
    assert not daemon.leaks()


def test_destroy_leaves_no_link_lease_or_port(daemon: Daemon) -> None:
    port = free_port()
    box = bridged(daemon, ports=[{"host_port": port, "sandbox_port": 80}])
    daemon.sh(box["id"], SERVE.format(text="gone"), wait=False)
    assert fetch(f"http://127.0.0.1:{port}/index.html") == "gone\n"
    link = host_ifname(box["id"])
    assert (SYS_NET / link).exists() and box["id"] in leases(daemon)
    assert not can_bind(port)

    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204

    # Its link and ports go before the answer; its address is let go after its removal.
    assert not (SYS_NET / link).exists()
    assert can_bind(port)
    daemon.settled()
    assert box["id"] not in leases(daemon)
    assert not daemon.leaks()
    # The address is free again: the next bridged sandbox gets it (and answers on it).
    again = bridged(daemon)
    assert again["network"]["ip"] == box["network"]["ip"]
    daemon.client.delete(f"/sandboxes/{again['id']}")


def test_a_killed_supervisor_leaves_no_link_lease_or_port(daemon: Daemon) -> None:
    port = free_port()
    box = bridged(daemon, ports=[{"host_port": port, "sandbox_port": 80}])
    os.kill(box["pid"], signal.SIGKILL)

    url = f"/sandboxes/{box['id']}"
    record = daemon.await_state(url, "failed", timeout=5)
    assert record and record["exit"]["reason"] == "supervisor_lost"
    # Its address is let go at the teardown's last step, after its end is recorded.
    assert record["network"]["ip"] is None
    assert wait_for(lambda: box["id"] not in leases(daemon))
    assert not (SYS_NET / host_ifname(box["id"])).exists()
    assert can_bind(port)
    assert not daemon.leaks()
    daemon.client.delete(f"/sandboxes/{box['id']}")


def test_a_failed_create_leaves_no_link_lease_or_port(daemon: Daemon) -> None:
    port = free_port()
    # A file bound over a directory: the supervisor fails after A has made the veth.
    body = {
        "network": {"mode": "bridge", "ports": [{"host_port": port, "sandbox_port": 80}]},
        "mounts": [{"source": "/etc/hostname", "target": "/usr"}],
    }
    before = daemon.client.get("/sandboxes").json()["items"]
    response = daemon.client.post("/sandboxes", json=body)
    # The kernel refused the request's own mount: bad input after all, so nothing is stored.
    assert response.status_code == 422, response.text
    assert daemon.client.get("/sandboxes").json()["items"] == before
    # The host end of a veth is made a port of the bridge as it is made: a leaked one would
    # be a port of this daemon's bridge (links of another daemon are none of this test's).
    kept = {host_ifname(b["id"]) for b in before}
    assert not [name for name in bridge_ports(daemon.bridge) if name not in kept]
    assert can_bind(port)
    assert not daemon.leaks()


def test_thirty_at_once_get_distinct_addresses_and_all_answer(daemon: Daemon) -> None:
    def create(index: int) -> dict[str, Any]:
        transport = httpx.HTTPTransport(uds=str(daemon.socket))
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=120) as c:
            response = c.post(
                "/sandboxes",
                json={"network": {"mode": "bridge"}, "cmd": ["python3", "-m", "http.server", "80"]},
            )
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    with ThreadPoolExecutor(30) as pool:
        boxes = list(pool.map(create, range(30)))
        try:
            ips = [box["network"]["ip"] for box in boxes]
            assert len(set(ips)) == 30, ips
            assert (
                len({host_ifname(box["id"]) for box in boxes} & set(bridge_ports(daemon.bridge)))
                == 30
            )
            pages = list(pool.map(lambda ip: fetch(f"http://{ip}/", timeout=20), ips))
            assert all("Directory listing" in page for page in pages)
        finally:
            statuses = list(
                pool.map(lambda b: daemon.client.delete(f"/sandboxes/{b['id']}"), boxes)
            )
    assert [s.status_code for s in statuses] == [204] * 30
    assert not daemon.leaks()
    assert not any(box["id"] in leases(daemon) for box in boxes)


def test_two_sandboxes_both_serve_port_80(web: list[dict[str, Any]], daemon: Daemon) -> None:
    ips = [box["network"]["ip"] for box in web]
    assert len(set(ips)) == 2
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network(daemon.subnet) for ip in ips)
    assert all(box["startup"] < 3 for box in web), [box["startup"] for box in web]
    for box, text in zip(web, ("one", "two"), strict=True):
        port = box["network"]["ports"][0]["host_port"]
        assert fetch(f"http://{box['network']['ip']}:80/index.html") == f"{text}\n"
        assert fetch(f"http://127.0.0.1:{port}/index.html") == f"{text}\n"
        if socket.has_ipv6 and Path("/proc/net/if_inet6").read_text().strip():
            assert fetch(f"http://[::1]:{port}/index.html") == f"{text}\n"


def test_a_published_port_answers_on_the_hosts_other_addresses(
    web: list[dict[str, Any]], gateway: str
) -> None:
    port = web[0]["network"]["ports"][0]["host_port"]
    assert fetch(f"http://{gateway}:{port}/index.html") == "one\n"


def test_one_sandbox_reaches_the_other_over_the_bridge(
    web: list[dict[str, Any]], daemon: Daemon, gateway: str
) -> None:
    one, two = web
    page = out(daemon, one, f"python3 -c '{FETCH}' http://{two['network']['ip']}/index.html")
    assert page.strip() == "b'two\\n'"
    # ... and a published port through the host's address on the bridge, as a client would.
    port = one["network"]["ports"][0]["host_port"]
    page = out(daemon, two, f"python3 -c '{FETCH}' http://{gateway}:{port}/index.html")
    assert page.strip() == "b'one\\n'"


def test_inside_a_bridged_sandbox(web: list[dict[str, Any]], daemon: Daemon, gateway: str) -> None:
    box = web[0]
    ip = box["network"]["ip"]
    assert box["network"] == {
        "mode": "bridge",
        "ip": ip,
        "ports": [{"host_port": box["network"]["ports"][0]["host_port"], "sandbox_port": 80,
                   "protocol": "tcp"}],
    }  # fmt: skip
    assert out(daemon, box, "ls /sys/class/net").split() == ["eth0", "lo"]
    assert f"{ip}\tweb-one\n" in out(daemon, box, "cat /etc/hosts")
    assert out(daemon, box, "getent hosts web-one").split() == [ip, "web-one"]
    assert out(daemon, box, "cat /etc/resolv.conf") == ""
    route = out(daemon, box, "cat /proc/net/route").splitlines()[1].split()
    assert route[:3] == ["eth0", "00000000", socket.inet_aton(gateway)[::-1].hex().upper()]
    mac = out(daemon, box, "cat /sys/class/net/eth0/address").strip()
    assert mac == "02:5b:" + ":".join(f"{int(o):02x}" for o in ip.split("."))
    # From the host: the veth's host end is on the module's bridge.
    assert host_ifname(box["id"]) in bridge_ports(daemon.bridge)


def test_restart_keeps_addresses_and_ports_and_removes_stale_links(
    web: list[dict[str, Any]], daemon: Daemon
) -> None:
    held = leases(daemon)
    stale = "sbx" + "0" * 12
    with IPRoute() as ipr:
        ipr.link("add", ifname=stale, kind="veth", peer={"ifname": "sbt-stale-peer"})
        ipr.link("set", ifname=stale, master=ipr.link_lookup(ifname=daemon.bridge)[0])
    assert stale in bridge_ports(daemon.bridge)
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert stale not in bridge_ports(daemon.bridge) and not (SYS_NET / stale).exists()
    assert leases(daemon) == held
    for box, text in zip(web, ("one", "two"), strict=True):
        record = daemon.client.get(f"/sandboxes/{box['id']}").json()
        assert record["state"] == "running" and record["network"] == box["network"]
        port = box["network"]["ports"][0]["host_port"]
        assert fetch(f"http://127.0.0.1:{port}/index.html") == f"{text}\n"
    fresh = bridged(daemon)
    assert fresh["network"]["ip"] not in held.values()
    daemon.client.delete(f"/sandboxes/{fresh['id']}")


def test_a_subnet_the_host_routes_or_a_bridge_of_another_daemon_is_refused(
    daemon: Daemon, tmp_path: Path
) -> None:
    inside = str(next(ipaddress.IPv4Network(daemon.subnet).subnets(new_prefix=25)))
    (tmp_path / "none.toml").write_text("")
    elsewhere, ours = str(tmp_path / "state"), str(daemon.state_dir)
    cases = [
        (elsewhere, "sbtother0", inside, "clashes with"),
        (elsewhere, daemon.bridge, daemon.subnet, "did not make"),
        (ours, daemon.bridge, free_subnet(), "has the address(es)"),
    ]
    for state_dir, name, subnet, said in cases:
        if state_dir == ours:
            daemon.stop()  # one daemon per state directory: the next one only once it is gone
        result = subprocess.run(
            [sys.executable, "-m", "api", "serve", "--config", str(tmp_path / "none.toml"),
             "--listen", f"unix://{tmp_path}/s.sock", "--state-dir", state_dir,
             "--run-dir", str(tmp_path / "run"), "--bridge-name", name, "--bridge-subnet", subnet],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 2, result.stderr
        assert said in result.stderr, result.stderr
    daemon.start()
    assert not (SYS_NET / "sbtother0").exists()


@pytest.fixture
def outside() -> Iterator[str]:
    """A test host of our own beyond the bridge: a network namespace behind a veth of the
    host's, routing everything back through the host, with a TCP server on port 8099 that says
    "outside". Its address."""
    tag = f"{random.randrange(16**8):08x}"
    name, link = f"sbt-out-{tag}", f"sbo{tag}"
    subnet = ipaddress.IPv4Network(free_subnet())
    near, far = str(subnet.network_address + 1), str(subnet.network_address + 2)
    netns.create(name)
    server = None
    try:
        with IPRoute() as ipr:
            peer = {"ifname": "eth0", "net_ns_fd": f"/var/run/netns/{name}"}
            ipr.link("add", ifname=link, kind="veth", peer=peer)
            ipr.addr("add", index=ipr.link_lookup(ifname=link)[0], address=f"{near}/24")
            ipr.link("set", ifname=link, state="up")
        with NetNS(name) as ns:
            eth0 = ns.link_lookup(ifname="eth0")[0]
            ns.addr("add", index=eth0, address=f"{far}/24")
            ns.link("set", index=eth0, state="up")
            ns.route("add", dst="0.0.0.0/0", gateway=near)
        server = subprocess.Popen([sys.executable, "-c", OUTSIDE_SERVER, name, far])
        wait_for(lambda: _answers(far), timeout=10)
        yield far
    finally:
        if server is not None:
            server.kill()
            server.wait()
        with IPRoute() as ipr, contextlib.suppress(Exception):
            ipr.link("del", ifname=link)
        netns.remove(name)


OUTSIDE_SERVER = """
import socket, sys
from pyroute2 import netns
netns.setns(sys.argv[1])
server = socket.socket()
server.bind((sys.argv[2], 8099))
server.listen()
while True:
    conn, _ = server.accept()
    conn.sendall(b"outside")
    conn.close()
"""
REACH = "import socket; print(socket.create_connection(('{ip}', 8099), timeout=2).recv(99))"


def _answers(ip: str) -> bool:
    try:
        with socket.create_connection((ip, 8099), timeout=1) as conn:
            return conn.recv(99) == b"outside"
    except OSError:
        return False


def test_egress_masquerades_the_subnet_and_cleanup_removes_everything(
    daemon: Daemon, web: list[dict[str, Any]], outside: str
) -> None:
    table = f"sandboxd-{daemon.bridge}"
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    was = forward.read_text()
    reach = f'python3 -c "{REACH.format(ip=outside)}"'
    try:
        # Egress off (the tests' setting): even on a host that forwards, and to a host that
        # would route the answers back, what a sandbox sends beyond the bridge is dropped.
        forward.write_text("1\n")
        assert table_rules(table) == [("forward", ["meta", "cmp", "meta", "cmp", "immediate"])]
        assert daemon.sh(web[0]["id"], reach)["exit_code"] != 0
        daemon.stop()
        daemon.start("--egress")
        assert forward.read_text().strip() == "1"
        assert table_rules(table) == [("postrouting", ["payload", "bitwise", "cmp"] * 2 + ["masq"])]
        assert out(daemon, web[0], reach).strip() == "b'outside'"
        with NFTables() as nft:
            rules = [r for r in nft.get_rules() if r.get("NFTA_RULE_TABLE") == table]
        subnet = ipaddress.IPv4Network(daemon.subnet)
        assert f"{subnet.network_address.packed!r}" in str(rules[0])
        box = bridged(daemon)
        servers = [
            line for line in Path("/etc/resolv.conf").read_text().splitlines()
            if line.startswith("nameserver") and not line.split()[1].startswith("127.")
        ]  # fmt: skip
        resolv = out(daemon, box, "cat /etc/resolv.conf").splitlines()
        assert [line for line in resolv if line.startswith("nameserver")] == servers
        daemon.client.delete(f"/sandboxes/{box['id']}")
        for sandbox in web:
            daemon.client.delete(f"/sandboxes/{sandbox['id']}")
        daemon.stop()

        result = daemon.cleanup()
        assert result.returncode == 0, result.stderr
        assert f"removed bridge {daemon.bridge}" in result.stdout
        assert f"removed nft table ip {table}" in result.stdout
        assert not (SYS_NET / daemon.bridge).exists()
        with NFTables() as nft:
            assert table not in {t.get("NFTA_TABLE_NAME") for t in nft.get_tables()}
        assert daemon.cleanup().returncode == 0  # nothing left to do is no error
    finally:
        forward.write_text(was)
        if daemon.proc is None:
            daemon.start()  # for the module's own teardown; without egress, so no table
    assert (SYS_NET / daemon.bridge).exists()
