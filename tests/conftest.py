"""Fixtures that run the real daemon as root, and the leak check that ends every module.

Each test module gets its own directory /tmp/sandboxd-test-XXXX holding the daemon's socket,
state and run directories, a uid region, and a bridge and subnet of its own (so test runs side
by side never meet). When the module ends, its daemons are stopped, `sandboxd cleanup` removes
the bridge, and the machine is searched for anything of that module: processes, mounts (in any
mount namespace), host processes in a sandbox uid range, leftover sandbox files, links on the
bridge or named after its sandboxes, the bridge itself and its nft table. Any find fails the
module. While a daemon runs, `Daemon.leaks` also reports TCP ports it listens on beyond those
it had at start (published ports not released).
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pyroute2.nftables.main import NFTables

from daemon.network.bridge import unrouted_subnet

ROOT = Path(__file__).resolve().parent.parent
SLOTS_PER_DAEMON = 128
UID_BASE = 1_000_000_000  # the daemon's default; each test daemon gets a region above it
REGIONS = 360  # uid regions: they end below 2**32 with room for 1000 slots past the last
SYS_NET = Path("/sys/class/net")
# A process in a sandbox's cgroup (NAME/sb_ID/...) that is not the module's belongs to
# another daemon (another test run's, or one on default settings, whose uid range may
# overlap a test daemon's region): the module's own are found by their cgroup's name.
# Which PID 1 the daemons run (unset: the daemon's default; tests/native says "native").
SUPERVISOR = os.environ.get("SANDBOXD_TEST_SUPERVISOR")
OTHER_SANDBOX = re.compile(r"/sb_[0-9a-f]{16}(/|$)", re.MULTILINE)


class Daemon:
    """One `sandboxd serve` process on a private directory."""

    def __init__(
        self,
        root: Path,
        uid_base: int,
        cgroup_name: str,
        bridge: str,
        subnet: str,
        derived: bool = False,
        supervisor: str | None = SUPERVISOR,
    ) -> None:
        self.root = root
        self.supervisor = supervisor
        # Derived: the daemon gets none of the four below and claims its own (they are read
        # from GET /info once it serves).
        self.derived = derived
        self.uid_base = uid_base
        self.cgroup_name = cgroup_name
        self.bridge = bridge
        self.subnet = subnet
        self.socket = root / "sandboxd.sock"
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.config = root / "config.toml"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.listening: set[int] = set()
        self.created: set[str] = set()  # ids of the sandboxes made through `client`
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://localhost",
            timeout=60,
            event_hooks={"response": [self._remember]},
        )

    def _remember(self, response: httpx.Response) -> None:
        request = response.request
        created = response.status_code == 201 and request.url.path == "/sandboxes"
        if created and request.method == "POST":
            response.read()
            self.created.add(response.json()["id"])

    def start(self, *args: str) -> Daemon:
        # A cgroup, a bridge and a subnet of its own: daemons sharing a cgroup would remove
        # each other's sandboxes, and a bridge belongs to one state directory.
        self.config.write_text(
            (
                ""
                if self.derived
                else f'uid_base = {self.uid_base}\ncgroup_name = "{self.cgroup_name}"\n'
                f'bridge_name = "{self.bridge}"\nbridge_subnet = "{self.subnet}"\n'
            )
            + (f'supervisor = "{self.supervisor}"\n' if self.supervisor else "")
        )
        # This checkout's code (python -m api, from ROOT), whatever `sandboxd` is installed.
        command = [
            sys.executable, "-m", "api", "serve", "--config", str(self.config),
            "--listen", f"unix://{self.socket}",
            "--state-dir", str(self.state_dir), "--run-dir", str(self.run_dir), *args,
        ]  # fmt: skip
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"sandboxd exited {self.proc.returncode}:\n{self.log_text()}")
            try:
                if self.client.get("/healthz").status_code == 200:
                    self.listening = listening_ports(self.proc.pid)
                    if self.derived:
                        info = self.client.get("/info").json()
                        self.uid_base, self.cgroup_name = info["uid_base"], info["cgroup_name"]
                        self.bridge, self.subnet = info["bridge_name"], info["bridge_subnet"]
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"sandboxd did not get ready:\n{self.log_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(30)
        self.proc = None
        return code

    def leaks(self) -> list[str]:
        """What is left of deleted or ended sandboxes while the daemon (and its zygote) run,
        once it has finished removing them (a DELETE answers before their files are gone)."""
        assert self.proc is not None
        self.settled()
        own = {self.proc.pid} | {pid for pid in _pids() if _parent(pid) == self.proc.pid}
        leaks = find_leaks(self.root, self.uid_base, frozenset(own), self.bridge, self.created)
        ports = listening_ports(self.proc.pid) - self.listening
        leaks.extend(f"the daemon listens on TCP port {port}" for port in sorted(ports))
        return leaks

    def settled(self, timeout: float = 60) -> None:
        """Wait till the daemon has no removal under way or queued (GET /info)."""

        def idle() -> bool:
            return self.client.get("/info").json()["sandboxes"]["removing"] == 0  # type: ignore[no-any-return]

        assert wait_for(idle, timeout), "the daemon's removals never finished"

    def cleanup(self) -> subprocess.CompletedProcess[str]:
        """`sandboxd cleanup` for this daemon's state directory and bridge."""
        return subprocess.run(
            [sys.executable, "-m", "api", "cleanup", "--config", str(self.config),
             "--state-dir", str(self.state_dir)],
            capture_output=True, text=True, timeout=60, cwd=ROOT,
        )  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    # -- conveniences -------------------------------------------------------------------------

    def create(self, **body: Any) -> dict[str, Any]:
        response = self.client.post("/sandboxes", json=body)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    def exec(self, ref: str, cmd: list[str], **body: Any) -> dict[str, Any]:
        response = self.client.post(f"/sandboxes/{ref}/exec", json={"cmd": cmd, **body})
        assert response.status_code in (200, 202), response.text
        return response.json()  # type: ignore[no-any-return]

    def await_state(self, path: str, state: str, timeout: float = 10) -> dict[str, Any]:
        """GET `path` (a sandbox or an exec) until its record is in `state`; that record."""
        last: dict[str, Any] = {}

        def reached() -> bool:
            last.update(self.client.get(path).json())
            return last.get("state") == state

        assert wait_for(reached, timeout), f"{path} never reached {state}: {last}"
        return last

    def sh(self, ref: str, script: str, **body: Any) -> dict[str, Any]:
        return self.exec(ref, ["sh", "-c", script], **body)

    def destroy_all(self) -> None:
        for sandbox in self.client.get("/sandboxes").json()["items"]:
            self.client.delete(f"/sandboxes/{sandbox['id']}")


def find_leaks(
    root: Path,
    uid_base: int,
    ignore: frozenset[int] = frozenset(),
    bridge: str | None = None,
    sandbox_ids: set[str] | frozenset[str] = frozenset(),
) -> list[str]:
    """Everything of the test directory `root` (and the daemon's uid region, bridge and
    sandboxes) still on the machine, but the `ignore` pids."""
    uids = range(uid_base, uid_base + SLOTS_PER_DAEMON * 65536)
    marker = str(root)
    leaks = []
    for pid in _pids():
        if pid in ignore:
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            uid = int(Path(f"/proc/{pid}/status").read_text().split("\nUid:")[1].split()[0])
            mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
            cgroup = Path(f"/proc/{pid}/cgroup").read_text()
        except (OSError, IndexError, ValueError):
            continue
        if marker in cmdline:
            leaks.append(f"process {pid}: {cmdline}")
        elif root.name in cgroup:
            leaks.append(f"process {pid} in the module's cgroup: {cmdline}")
        elif uid in uids and not OTHER_SANDBOX.search(cgroup):  # not another daemon's
            leaks.append(f"process {pid} with sandbox uid {uid}: {cmdline}")
        elif marker in mountinfo:
            leaks.append(f"process {pid} holds mounts of {marker}")
    for parent in (
        root / "run" / "sandboxes",
        root / "state" / "sandboxes",
        root / "state" / "logs",
    ):
        if parent.is_dir():
            leaks.extend(f"file {p}" for p in parent.iterdir())
    cgroup_root = Path("/sys/fs/cgroup")
    for hierarchy in [cgroup_root, *(p for p in cgroup_root.iterdir() if p.is_dir())]:
        for path in hierarchy.glob(f"{root.name}*"):
            # A running daemon keeps its own cgroup: only sandboxes' ones in it are leaks.
            found = [p for p in path.iterdir() if p.is_dir()] if ignore else [path]
            leaks.extend(f"cgroup {p}" for p in found)
    if bridge is not None:
        leaks.extend(f"link {name} on the bridge {bridge}" for name in bridge_ports(bridge))
    for sandbox_id in sandbox_ids:
        if (SYS_NET / host_ifname(sandbox_id)).exists():
            leaks.append(f"link {host_ifname(sandbox_id)} of sandbox {sandbox_id}")
    return leaks


def cgroup_dirs(name: str) -> list[Path]:
    """The cgroups named `name` at the top of any hierarchy (v2, and each v1 controller)."""
    root = Path("/sys/fs/cgroup")
    hierarchies = [root, *(p for p in root.iterdir() if p.is_dir())]
    return [h / name for h in hierarchies if (h / name).is_dir()]


def host_ifname(sandbox_id: str) -> str:
    """The host end of a bridged sandbox's veth (as daemon/network/bridge.py names it)."""
    return "sbx" + sandbox_id.removeprefix("sb_")[:12]


def bridge_ports(bridge: str) -> list[str]:
    brif = SYS_NET / bridge / "brif"
    return sorted(os.listdir(brif)) if brif.is_dir() else []


def nft_tables() -> set[str]:
    with NFTables() as nft:
        return {table.get("NFTA_TABLE_NAME") for table in nft.get_tables()}


def listening_ports(pid: int) -> set[int]:
    """TCP ports on which the process `pid` holds a listening socket."""
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    ports = set()
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def free_subnet() -> str:
    """A random unrouted 10.X.Y.0/24 for a test daemon's bridge."""
    return str(unrouted_subnet())


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]


class Daemons:
    """The module's daemons; the leak check runs when the module is done with them."""

    def __init__(self, supervisor: str | None = SUPERVISOR) -> None:
        self.supervisor = supervisor  # the PID 1 of their sandboxes: python or native
        self.root = Path(tempfile.mkdtemp(prefix="sandboxd-test-"))
        os.chmod(self.root, 0o755)
        self.started: list[Daemon] = []
        # Uid regions of their own, so daemons (and test runs) side by side never mix.
        self.regions = random.sample(range(REGIONS), 8)

    def new(self, *args: str, derived: bool = False) -> Daemon:
        """Another daemon, with a directory (below the module's), a uid region, a cgroup, a
        bridge and a subnet of its own: given it, or, `derived`, claimed by the daemon."""
        index = len(self.started)
        root = self.root if index == 0 else self.root / f"daemon{index}"
        root.mkdir(exist_ok=True)
        uid_base = UID_BASE + self.regions[index] * SLOTS_PER_DAEMON * 65536
        cgroup_name = self.root.name + (f"-{index}" if index else "")
        bridge = f"sbt{random.randrange(16**8):08x}"
        daemon = Daemon(
            root, uid_base, cgroup_name, bridge, free_subnet(), derived, self.supervisor
        )
        self.started.append(daemon)
        return daemon.start(*args)

    def close(self) -> list[str]:
        created: set[str] = set()
        leaks: list[str] = []
        for daemon in self.started:
            try:
                if daemon.proc is None:
                    daemon.start()
                daemon.destroy_all()
                daemon.stop()
            except (RuntimeError, httpx.HTTPError) as exc:  # still clean up the bridge
                leaks.append(f"the daemon could not be stopped cleanly: {exc}")
                if daemon.proc is not None:
                    daemon.stop(signal.SIGKILL)
            daemon.client.close()
            created |= daemon.created
            # Links left on the bridge before cleanup takes them away with it.
            leaks += [
                f"link {n} on the bridge {daemon.bridge}" for n in bridge_ports(daemon.bridge)
            ]
            result = daemon.cleanup()
            if result.returncode != 0:
                leaks.append(f"sandboxd cleanup failed: {result.stderr.strip()}")
            if (SYS_NET / daemon.bridge).exists():
                leaks.append(f"the bridge {daemon.bridge}")
            if f"sandboxd-{daemon.bridge}" in nft_tables():
                leaks.append(f"the nft table ip sandboxd-{daemon.bridge}")
            if daemon.derived:  # its cgroup is not named after the module
                leaks += [f"cgroup {p}" for p in cgroup_dirs(daemon.cgroup_name)]

        def found() -> list[str]:
            return [
                leak
                for daemon in self.started
                for leak in find_leaks(self.root, daemon.uid_base, sandbox_ids=created)
            ]

        wait_for(lambda: not found(), timeout=5)
        leaks.extend(sorted(set(found())))
        if not os.environ.get("SANDBOXD_TEST_KEEP"):  # set it to read the daemons' logs
            shutil.rmtree(self.root, ignore_errors=True)
        return leaks


@pytest.fixture(scope="module")
def supervisor() -> str | None:
    """The PID 1 of the module's sandboxes (tests/native overrides it)."""
    return SUPERVISOR


@pytest.fixture(scope="module")
def daemons(supervisor: str | None) -> Iterator[Daemons]:
    factory = Daemons(supervisor)
    yield factory
    leaks = factory.close()
    assert not leaks, "left on the machine:\n" + "\n".join(leaks)


@pytest.fixture(scope="module")
def daemon(daemons: Daemons) -> Daemon:
    return daemons.new()


@pytest.fixture
def nothing_carries_over(daemon: Daemon) -> Iterator[None]:
    """A test that fails (or stops its daemon) leaves no sandbox for the next test, or for
    the module's leak check, to find. Modules opt in with `pytestmark`."""
    yield
    if daemon.proc is None:
        daemon.start()
    daemon.destroy_all()


def pytest_sessionstart(session: pytest.Session) -> None:
    """The native PID 1 is built from source at install; a checkout builds it here (gcc)."""
    from daemon.sandbox import native

    if native.stale():
        native.build()
