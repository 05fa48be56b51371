"""Fixtures that run the real daemon as root, and the leak check that ends every module.

Each test module gets its own directory /tmp/sandboxd-test-XXXX holding the daemon's socket,
state and run directories. When the module ends, its daemons are stopped and the machine is
searched for anything of that directory: processes, mounts (in any mount namespace), host
processes in a sandbox uid range, and leftover sandbox files. Any find fails the module.
"""

from __future__ import annotations

import os
import random
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

ROOT = Path(__file__).resolve().parent.parent
SLOTS_PER_DAEMON = 128
UID_BASE = 1_000_000_000  # the daemon's default; each test daemon gets a region above it
REGIONS = 360  # uid regions: they end below 2**32 with room for 1000 slots past the last


class Daemon:
    """One `sandboxd serve` process on a private directory."""

    def __init__(self, root: Path, uid_base: int, cgroup_name: str) -> None:
        self.root = root
        self.uid_base = uid_base
        self.cgroup_name = cgroup_name
        self.socket = root / "sandboxd.sock"
        self.state_dir = root / "state"
        self.run_dir = root / "run"
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(self.socket)),
            base_url="http://localhost",
            timeout=60,
        )

    def start(self, *args: str) -> Daemon:
        config = self.root / "config.toml"
        # A cgroup of its own too: daemons sharing one would remove each other's sandboxes.
        config.write_text(f'uid_base = {self.uid_base}\ncgroup_name = "{self.cgroup_name}"\n')
        # This checkout's code (python -m api, from ROOT), whatever `sandboxd` is installed.
        command = [
            sys.executable, "-m", "api", "serve", "--config", str(config),
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
        """What is left of deleted or ended sandboxes while the daemon (and its zygote) run."""
        assert self.proc is not None
        own = {self.proc.pid} | {pid for pid in _pids() if _parent(pid) == self.proc.pid}
        return find_leaks(self.root, self.uid_base, frozenset(own))

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

    def sh(self, ref: str, script: str, **body: Any) -> dict[str, Any]:
        return self.exec(ref, ["sh", "-c", script], **body)

    def destroy_all(self) -> None:
        for sandbox in self.client.get("/sandboxes").json()["items"]:
            self.client.delete(f"/sandboxes/{sandbox['id']}")


def find_leaks(root: Path, uid_base: int, ignore: frozenset[int] = frozenset()) -> list[str]:
    """Everything of the test directory `root` (and the daemon's uid region) still on the
    machine, but the `ignore` pids."""
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
        elif uid in uids and "sandboxd-test-" not in cgroup:  # not another test run's
            leaks.append(f"process {pid} with sandbox uid {uid}: {cmdline}")
        elif marker in mountinfo:
            leaks.append(f"process {pid} holds mounts of {marker}")
    for parent in (root / "run" / "sandboxes", root / "state" / "sandboxes"):
        if parent.is_dir():
            leaks.extend(f"file {p}" for p in parent.iterdir())
    cgroup = Path("/sys/fs/cgroup")
    for hierarchy in [cgroup, *(p for p in cgroup.iterdir() if p.is_dir())]:
        for path in hierarchy.glob(f"{root.name}*"):
            # A running daemon keeps its own cgroup: only sandboxes' ones in it are leaks.
            found = [p for p in path.iterdir() if p.is_dir()] if ignore else [path]
            leaks.extend(f"cgroup {p}" for p in found)
    return leaks


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

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sandboxd-test-"))
        os.chmod(self.root, 0o755)
        self.started: list[Daemon] = []
        # Uid regions of their own, so daemons (and test runs) side by side never mix.
        self.regions = random.sample(range(REGIONS), 8)

    def new(self, *args: str) -> Daemon:
        """Another daemon, with a directory (below the module's) and a uid region of its own."""
        index = len(self.started)
        root = self.root if index == 0 else self.root / f"daemon{index}"
        root.mkdir(exist_ok=True)
        uid_base = UID_BASE + self.regions[index] * SLOTS_PER_DAEMON * 65536
        daemon = Daemon(root, uid_base, self.root.name + (f"-{index}" if index else ""))
        self.started.append(daemon)
        return daemon.start(*args)

    def close(self) -> list[str]:
        for daemon in self.started:
            if daemon.proc is None:
                daemon.start()
            daemon.destroy_all()
            daemon.stop()
            daemon.client.close()

        def leaks() -> list[str]:
            return [leak for d in self.started for leak in find_leaks(self.root, d.uid_base)]

        wait_for(lambda: not leaks(), timeout=5)
        found = sorted(set(leaks()))
        if not os.environ.get("SANDBOXD_TEST_KEEP"):  # set it to read the daemons' logs
            shutil.rmtree(self.root, ignore_errors=True)
        return found


@pytest.fixture(scope="module")
def daemons() -> Iterator[Daemons]:
    factory = Daemons()
    yield factory
    leaks = factory.close()
    assert not leaks, "left on the machine:\n" + "\n".join(leaks)


@pytest.fixture(scope="module")
def daemon(daemons: Daemons) -> Daemon:
    return daemons.new()
