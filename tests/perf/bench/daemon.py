"""A private daemon for one bench run: started on a temporary directory, removed at the end.

Runs in: the bench's process, as root (the daemon it starts needs root). The daemon is this
installation's code (`python -m api serve`, run from the directory that holds the `api`
package), with a configuration file of its own: a cgroup name and a uid region that no other
daemon on the machine uses, so that test runs and other daemons side by side never mix with it.
"""

from __future__ import annotations

import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import api
from daemon.network.bridge import unrouted_subnet

PACKAGE_ROOT = Path(api.__file__).resolve().parent.parent
UID_RANGE = 65536
# Test daemons take regions at and above 1,000,000,000 (the default daemon's base): bench
# daemons take theirs below it, above the usual /etc/subuid ranges.
_UID_FLOOR = 200_000_000
_UID_CEILING = 1_000_000_000
_READY_TIMEOUT = 30.0
_STOP_TIMEOUT = 30.0


class DaemonError(RuntimeError):
    """The private daemon did not start, or did not go away cleanly."""


class PrivateDaemon:
    """One `sandboxd serve` on a temporary directory: socket, state and run directories."""

    def __init__(self, max_sandboxes: int, pool: int = 0, program: list[str] | None = None) -> None:
        self.max_sandboxes, self.pool = max_sandboxes, pool
        # What runs `serve`: sandboxd itself, or a wrapper that becomes it (tests/perf/steps.py).
        self.program = program or [sys.executable, "-m", "api"]
        self.root = Path(tempfile.mkdtemp(prefix="sandboxd-bench-"))
        os.chmod(self.root, 0o755)
        self.cgroup_name = self.root.name
        self.uid_base = _free_uid_region(max_sandboxes + pool)
        # A bridge and subnet of its own: the host's daemon may own the default ones.
        self.bridge = f"sbb{secrets.token_hex(4)}"
        self.subnet = unrouted_subnet(first=100)
        self.socket = self.root / "sandboxd.sock"
        self.log = self.root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        config = self.root / "config.toml"
        config.write_text(
            f'uid_base = {self.uid_base}\ncgroup_name = "{self.cgroup_name}"\n'
            f'bridge_name = "{self.bridge}"\nbridge_subnet = "{self.subnet}"\n'
        )
        command = [
            *self.program, "serve", "--config", str(config),
            "--listen", self.url,
            "--state-dir", str(self.root / "state"), "--run-dir", str(self.root / "run"),
            "--max-sandboxes", str(self.max_sandboxes), "--pool-size", str(self.pool),
        ]  # fmt: skip
        # Only PATH and the locale: the daemon's environment is not the bench user's.
        env = {k: v for k, v in os.environ.items() if k in ("PATH", "PYTHONPATH", "LANG")}
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=PACKAGE_ROOT, env=env
            )
        transport = httpx.HTTPTransport(uds=str(self.socket))
        with httpx.Client(transport=transport, base_url="http://sandboxd", timeout=5) as client:
            deadline = time.monotonic() + _READY_TIMEOUT
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise DaemonError(f"sandboxd exited {self.proc.returncode}:\n{self.log_tail()}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get("/healthz").status_code == 200:
                        return
                time.sleep(0.05)
        raise DaemonError(
            f"sandboxd did not get ready in {_READY_TIMEOUT:.0f} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        """SIGTERM and wait; the caller has destroyed every sandbox before."""
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None
        subprocess.run(  # its bridge goes with it
            [sys.executable, "-m", "api", "cleanup", "--config", str(self.root / "config.toml"),
             "--state-dir", str(self.root / "state")],
            capture_output=True, timeout=60, cwd=PACKAGE_ROOT, check=False,
        )  # fmt: skip

    def leftovers(self) -> list[str]:
        """Anything of this daemon still on the machine once it has stopped."""
        marker = str(self.root)
        found = []
        for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
            with contextlib.suppress(OSError):
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
                if marker.encode() in cmdline and pid != os.getpid():
                    found.append(f"process {pid}: {cmdline.decode(errors='replace')}")
        for parent in (self.root / "state" / "sandboxes", self.root / "run" / "sandboxes"):
            if parent.is_dir():
                found.extend(f"file {p}" for p in parent.iterdir())
        cgroup = Path("/sys/fs/cgroup")
        for hierarchy in [cgroup, *(p for p in cgroup.iterdir() if p.is_dir())]:
            found.extend(f"cgroup {p}" for p in hierarchy.glob(self.cgroup_name))
        if Path("/sys/class/net", self.bridge).exists():
            found.append(f"the bridge {self.bridge}")
        return found

    def remove(self) -> list[str]:
        """Stop, check that nothing is left, remove the directory; what was left, if anything.

        A directory with leftovers stays, with the daemon's log, for a look.
        """
        self.stop()
        deadline = time.monotonic() + 5
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        return left

    def log_tail(self, lines: int = 40) -> str:
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _free_uid_region(max_sandboxes: int) -> int:
    """A random uid region below the test daemons' that no running process has a uid in."""
    size = max_sandboxes * UID_RANGE
    regions = list(range(_UID_FLOOR, _UID_CEILING - size, size))
    if not regions:
        raise DaemonError(f"--max-sandboxes {max_sandboxes} is too many for a bench daemon")
    used = _uids_in_use()
    random.shuffle(regions)
    for base in regions:
        if not any(base <= uid < base + size for uid in used):
            return base
    raise DaemonError("every bench uid region is in use by running processes")


def _uids_in_use() -> set[int]:
    uids = set()
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        with contextlib.suppress(OSError, IndexError, ValueError):
            status = Path(f"/proc/{pid}/status").read_text()
            uids.add(int(status.split("\nUid:")[1].split()[0]))
    return uids
