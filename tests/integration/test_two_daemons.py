"""Several daemons on one host on default settings: each state directory claims a bridge,
subnet, cgroup and uid range of its own, keeps them across restarts, and is served by one
daemon at a time; a bridge whose owner is gone is taken over; `cleanup` waits for the daemon.

The daemons here get only --state-dir, --run-dir and --listen (and an empty configuration
file, so that the host's /etc/sandboxd/config.toml does not count); what they claim is read
from GET /info. Traffic goes only to the sandboxes' own addresses.
"""

from __future__ import annotations

import ipaddress
import json
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyroute2 import IPRoute

from daemon.config import Config, load_config
from daemon.lifecycle import claims
from tests.conftest import (
    ROOT,
    SYS_NET,
    Daemon,
    Daemons,
    bridge_ports,
    cgroup_dirs,
    host_ifname,
    wait_for,
)

SERVE = "cd /tmp && echo {text} > index.html && exec python3 -m http.server 80"
# What the default state directory's daemon (/var/lib/sandboxd) keeps: a derived claim never
# takes any of it, whether or not that daemon runs on this machine.
DEFAULT_NAMES = {"sandboxd0", "sandboxd"}
DEFAULTS = Config()
DEFAULT_UIDS = range(DEFAULTS.uid_base, DEFAULTS.uid_base + 2048 * 65536)


def info(daemon: Daemon) -> dict[str, Any]:
    return daemon.client.get("/info").json()  # type: ignore[no-any-return]


def uids(facts: dict[str, Any]) -> range:
    return range(facts["uid_base"], facts["uid_last"] + 1)


def overlap(a: range, b: range) -> bool:
    return a.start < b.stop and b.start < a.stop


def serving(daemon: Daemon, text: str) -> dict[str, Any]:
    """A bridged sandbox with a web server on port 80 that says `text`."""
    box = daemon.create(network={"mode": "bridge"})
    daemon.sh(box["id"], SERVE.format(text=text), wait=False)
    return box


def fetch(ip: str) -> str | None:
    def attempt() -> str | None:
        try:
            return httpx.get(f"http://{ip}/index.html", timeout=2).text
        except httpx.TransportError:
            return None

    return wait_for(attempt, timeout=15)  # type: ignore[no-any-return]


def in_place(daemon: Daemon, box: dict[str, Any]) -> None:
    """The sandbox sits in its daemon's uid range, cgroup and bridge."""
    facts = info(daemon)
    (cgroup2,) = [
        d / box["id"]
        for d in cgroup_dirs(facts["cgroup_name"])
        if d.parent.name in ("cgroup", "unified")
    ]
    # Its execs (the web server): root inside, an unprivileged uid of the range outside.
    pids = [
        int(pid)
        for leaf in cgroup2.iterdir()
        if leaf.is_dir() and leaf.name != "init"
        for pid in (leaf / "cgroup.procs").read_text().split()
    ]
    assert pids
    for pid in pids:
        uid = int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])
        assert uid in uids(facts) and (uid - facts["uid_base"]) % 65536 == 0
    assert host_ifname(box["id"]) in bridge_ports(facts["bridge_name"])
    assert ipaddress.IPv4Address(box["network"]["ip"]) in ipaddress.IPv4Network(
        facts["bridge_subnet"]
    )


@pytest.fixture(scope="module")
def pair(daemons: Daemons) -> tuple[Daemon, Daemon]:
    return daemons.new(derived=True), daemons.new(derived=True)


def test_two_daemons_on_default_settings_use_names_of_their_own(
    pair: tuple[Daemon, Daemon],
) -> None:
    first, second = (info(d) for d in pair)
    for facts in (first, second):
        assert len(facts["bridge_name"]) <= 15
        assert facts["bridge_name"] not in DEFAULT_NAMES
        assert facts["cgroup_name"] not in DEFAULT_NAMES
        assert not overlap(uids(facts), DEFAULT_UIDS)
        subnet = ipaddress.IPv4Network(facts["bridge_subnet"])
        assert not subnet.overlaps(ipaddress.IPv4Network("10.88.0.0/16"))  # podman's
    assert first["bridge_name"] != second["bridge_name"]
    assert first["cgroup_name"] != second["cgroup_name"]
    assert not overlap(uids(first), uids(second))
    assert not ipaddress.IPv4Network(first["bridge_subnet"]).overlaps(
        ipaddress.IPv4Network(second["bridge_subnet"])
    )
    # Recorded in the state directory, for the next daemon there.
    for daemon, facts in zip(pair, (first, second), strict=True):
        record = json.loads((daemon.state_dir / "claims.json").read_text())
        assert record["bridge_name"] == facts["bridge_name"]
        assert record["bridge_subnet"] == facts["bridge_subnet"]


def test_each_serves_bridged_sandboxes_at_its_own_address(pair: tuple[Daemon, Daemon]) -> None:
    boxes = [serving(daemon, f"from-{i}") for i, daemon in enumerate(pair)]
    for i, (daemon, box) in enumerate(zip(pair, boxes, strict=True)):
        assert fetch(box["network"]["ip"]) == f"from-{i}\n"
        in_place(daemon, box)
    for daemon, box in zip(pair, boxes, strict=True):
        daemon.client.delete(f"/sandboxes/{box['id']}")
        assert host_ifname(box["id"]) not in bridge_ports(daemon.bridge)
        daemon.settled()  # its removal comes after the answer
        assert not any((d / box["id"]).exists() for d in cgroup_dirs(daemon.cgroup_name))


def test_a_second_daemon_on_the_same_state_directory_is_refused(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    first = pair[0]
    before = info(first)
    command = [
        sys.executable, "-m", "api", "serve", "--config", str(first.config),
        "--state-dir", str(first.state_dir), "--run-dir", str(tmp_path / "run"),
        "--listen", f"unix://{tmp_path}/other.sock",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:  # it served: the lock did not hold
            proc.kill()
            proc.wait()
    assert proc.returncode == 1
    assert stderr.strip().count("\n") == 0 and "holds the state directory" in stderr, stderr
    assert f"pid {first.proc.pid if first.proc else '?'}" in stderr
    assert info(first) == before


def test_cleanup_waits_for_the_daemon_then_releases_everything(
    pair: tuple[Daemon, Daemon],
) -> None:
    second = pair[1]
    facts = info(second)
    refused = second.cleanup()
    assert refused.returncode == 1 and "holds the state directory" in refused.stderr
    assert (SYS_NET / second.bridge).exists()
    assert second.client.get("/healthz").status_code == 200

    second.stop()
    assert (SYS_NET / second.bridge).exists()  # the bridge outlives its daemon
    done = second.cleanup()
    assert done.returncode == 0, done.stderr
    assert f"removed bridge {facts['bridge_name']}" in done.stdout
    assert not (SYS_NET / facts["bridge_name"]).exists()
    assert not (second.state_dir / "claims.json").exists()
    assert str(second.state_dir) not in registered()
    second.start()  # claims afresh, for the module's teardown


def test_a_third_daemon_then_the_first_again_adopting_its_sandbox_and_bridge(
    daemons: Daemons, pair: tuple[Daemon, Daemon]
) -> None:
    first = pair[0]
    box = serving(first, "kept")
    before = info(first)
    first.stop()
    assert (SYS_NET / before["bridge_name"]).exists()  # stale: its daemon is gone

    third = daemons.new(derived=True)
    facts = info(third)
    taken = [info(pair[1]), before]
    assert all(facts["bridge_name"] != t["bridge_name"] for t in taken)
    assert all(facts["cgroup_name"] != t["cgroup_name"] for t in taken)
    assert all(not overlap(uids(facts), uids(t)) for t in taken)
    other = serving(third, "third")
    assert fetch(other["network"]["ip"]) == "third\n"
    in_place(third, other)

    first.start()
    after = info(first)
    for key in ("bridge_name", "bridge_subnet", "cgroup_name", "uid_base"):
        assert after[key] == before[key]
    assert first.client.get(f"/sandboxes/{box['id']}").json()["state"] == "running"
    assert fetch(box["network"]["ip"]) == "kept\n"
    in_place(first, box)
    assert first.sh(box["id"], "echo adopted")["stdout"] == "adopted\n"
    for daemon, sandbox in ((first, box), (third, other)):
        daemon.client.delete(f"/sandboxes/{sandbox['id']}")


def test_a_bridge_whose_owner_is_gone_is_taken_over(daemons: Daemons, tmp_path: Path) -> None:
    daemon = daemons.new()
    daemon.stop()
    gone = tmp_path / "deleted-state"
    stale = f"sbx{random.randrange(16**12):012x}"
    with IPRoute() as ipr:
        (bridge,) = ipr.link_lookup(ifname=daemon.bridge)
        ipr.link("set", index=bridge, ifalias=f"sandboxd {gone}")
        # A link of a sandbox of the gone daemon, still on the bridge.
        ipr.link("add", ifname=stale, kind="veth", peer={"ifname": stale.replace("sbx", "sby")})
        ipr.link("set", ifname=stale, master=bridge)
    try:
        daemon.start()
        alias = (SYS_NET / daemon.bridge / "ifalias").read_text().strip()
        assert alias == f"sandboxd {daemon.state_dir}"
        assert not (SYS_NET / stale).exists()
        box = serving(daemon, "taken")
        assert fetch(box["network"]["ip"]) == "taken\n"
        daemon.client.delete(f"/sandboxes/{box['id']}")
    finally:
        if (SYS_NET / stale).exists():
            with IPRoute() as ipr:
                ipr.link("del", ifname=stale)


def test_a_bridge_of_a_state_directory_that_lives_is_still_refused(
    pair: tuple[Daemon, Daemon], tmp_path: Path
) -> None:
    (tmp_path / "none.toml").write_text("")
    result = subprocess.run(
        [sys.executable, "-m", "api", "serve", "--config", str(tmp_path / "none.toml"),
         "--listen", f"unix://{tmp_path}/s.sock", "--state-dir", str(tmp_path / "state"),
         "--run-dir", str(tmp_path / "run"), "--bridge-name", pair[0].bridge],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2 and "did not make" in result.stderr, result.stderr
    # Refused before it served: it holds no claim.
    assert str(tmp_path / "state") not in registered()


# -- claims, against a registry of the test's own -------------------------------------------


def registered(registry: Path = claims.REGISTRY) -> set[str]:
    return {json.loads(p.read_text())["state_dir"] for p in registry.glob("*.json")}


def test_concurrent_claims_never_share_anything(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    configs = []
    for i in range(6):
        state = tmp_path / f"state{i}"
        state.mkdir()
        configs.append(load_config({"state_dir": str(state)}, {}))
    results: list[Config] = []
    threads = [threading.Thread(target=lambda c=c: results.append(claims.claim(c, registry)))
               for c in configs]  # fmt: skip
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == len(configs)
    assert len({c.bridge_name for c in results}) == len(configs)
    assert len({c.cgroup_name for c in results}) == len(configs)
    for a in results:
        for b in results:
            if a is not b:
                assert not a.bridge_subnet.overlaps(b.bridge_subnet)
                span = (a.max_sandboxes + a.pool_size) * 65536
                assert abs(a.uid_base - b.uid_base) >= span
    # A restart reuses what was recorded; a removed state directory's claim is dropped.
    again = claims.claim(configs[0], registry)
    assert again == results[[c.state_dir for c in results].index(configs[0].state_dir)]
    (configs[1].state_dir / "claims.json").unlink()
    claims.claim(configs[0], registry)
    assert str(configs[1].state_dir) not in registered(registry)


def test_given_settings_win(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    config = load_config(
        {"state_dir": str(state), "bridge_name": "sbtgiven0", "bridge_subnet": "10.201.3.0/24"},
        {},
    )
    claimed = claims.claim(config, tmp_path / "registry")
    assert claimed.bridge_name == "sbtgiven0"
    assert str(claimed.bridge_subnet) == "10.201.3.0/24"
    assert claimed.cgroup_name.startswith("sandboxd") and claimed.cgroup_name != "sandboxd"
    assert set(json.loads((state / "claims.json").read_text())) == {"cgroup_name", "uid_base"}
