"""The peers compare.py measures beside sandboxd: podman (REST API), crun (CLI), bubblewrap.

Runs in: compare.py's process, as root, inside the private mount namespace it entered (see
compare.py). Each peer drives its tool through the same operations: create a lasting sandbox,
run a command in it, destroy it, a whole lifecycle; and says which processes it has, for PSS.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.perf.bench import memory
from tests.perf.bench.run import TRUE

IMAGE = "sandboxd-compare-busybox"
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"]
BWRAP += ["--proc", "/proc", "--dev", "/dev"]
IDLE_CMD = ["sleep", "3600"]
_CGROUPS = Path("/sys/fs/cgroup")
# The cgroup podman (cgroupfs manager) puts its conmons and containers under, in each hierarchy.
_PODMAN_CGROUP = "libpod_parent"


class PeerError(RuntimeError):
    pass


# -- the peers --------------------------------------------------------------------------------


class Peer:
    """A sandboxing tool driven through the same workloads as sandboxd."""

    name = ""
    lasting = True  # has sandboxes that outlive one command (create, exec into, destroy)

    def __init__(self, work: Path) -> None:
        self.work = work

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def worker(self) -> Worker:
        raise NotImplementedError

    def service_pids(self) -> list[int]:
        return []

    def pids(self, handles: list[str]) -> list[int]:
        raise NotImplementedError

    def tidy(self) -> None:
        """Between rows: whatever the tool leaves running that no sandbox needs."""


class Worker:
    """One thread's means of driving a peer (its own connection, if it has one)."""

    def create(self) -> str:
        raise NotImplementedError

    def run(self, handle: str | None, cmd: list[str]) -> bytes:
        """Run `cmd` in the sandbox `handle` (a one-shot sandbox for None); its stdout."""
        raise NotImplementedError

    def destroy(self, handle: str) -> None:
        raise NotImplementedError

    def lifecycle(self) -> None:
        handle = self.create()
        self.run(handle, TRUE)
        self.destroy(handle)

    def close(self) -> None:
        pass


class Podman(Peer):
    name = "podman"

    def __init__(self, work: Path, rootfs: Path) -> None:
        super().__init__(work)
        self.rootfs = rootfs
        self.socket = work / "podman.sock"
        self.flags = [
            "--root", str(work / "root"), "--runroot", str(work / "runroot"),
            "--tmpdir", str(work / "tmp"), "--cgroup-manager", "cgroupfs",
            "--events-backend", "file",
        ]  # fmt: skip
        self.service: subprocess.Popen[bytes] | None = None
        self.counter = itertools.count()
        self.cgroups_before: set[Path] = set()

    def start(self) -> None:
        self.start_cgroups()
        tar = subprocess.Popen(["tar", "-C", str(self.rootfs), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(
            ["podman", *self.flags, "import", "-", IMAGE],
            stdin=tar.stdout,
            check=True,
            capture_output=True,
        )
        tar.wait()
        with open(self.work / "service.log", "wb") as log:
            self.service = subprocess.Popen(
                ["podman", *self.flags, "system", "service", "--time=0", f"unix://{self.socket}"],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError), self.client() as client:
                if client.get("/_ping").status_code == 200:
                    return
            time.sleep(0.1)
        raise PeerError("podman system service did not answer in 30 s")

    def client(self) -> httpx.Client:
        transport = httpx.HTTPTransport(uds=str(self.socket))
        return httpx.Client(transport=transport, base_url="http://podman/v4.0.0", timeout=120)

    def worker(self) -> Worker:
        return PodmanWorker(self)

    def start_cgroups(self) -> None:
        self.cgroups_before = set(_CGROUPS.glob(f"*/{_PODMAN_CGROUP}"))

    def stop(self) -> None:
        try:
            self.stop_service()
        finally:
            # Empty now, but podman never removes them: those it made, we do.
            for path in set(_CGROUPS.glob(f"*/{_PODMAN_CGROUP}")) - self.cgroups_before:
                with contextlib.suppress(OSError):
                    _remove_cgroup(path)

    def stop_service(self) -> None:
        if self.service is not None and self.service.poll() is None:
            with self.client() as client:
                for container in client.get("/containers/json", params={"all": True}).json():
                    client.delete(f"/containers/{container['Id']}", params={"force": True})
            self.service.terminate()
            self.service.wait(30)
        self.kill_conmons(execs_only=False)

    def conmons(self) -> list[int]:
        return [pid for pid in pids_with(str(self.work)) if _comm(pid) == "conmon"]

    def kill_conmons(self, execs_only: bool) -> None:
        """conmon stays 5 minutes after each exec, two processes of it: end them by pid."""
        for pid in self.conmons():
            if not execs_only or b"--exec-process-spec" in _cmdline(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def tidy(self) -> None:
        self.kill_conmons(execs_only=True)

    def service_pids(self) -> list[int]:
        assert self.service is not None
        return [self.service.pid, *memory.descendants(self.service.pid)]

    def pids(self, handles: list[str]) -> list[int]:
        found = self.service_pids()
        for pid in self.conmons():
            found += [pid, *memory.descendants(pid)]
        return sorted(set(found))


# podman's default rlimits (1048576 files) exceed this host's hard limits: crun would fail.
PODMAN_ULIMITS = [
    {"Name": "nofile", "Soft": 1024, "Hard": 1024},
    {"Name": "nproc", "Soft": 4096, "Hard": 4096},
]


class PodmanWorker(Worker):
    def __init__(self, podman: Podman) -> None:
        self.podman = podman
        self.client = podman.client()

    def create(self) -> str:
        body = {
            "Image": IMAGE,
            "Cmd": IDLE_CMD,
            "HostConfig": {"NetworkMode": "none", "Ulimits": PODMAN_ULIMITS},
        }
        name = f"sbcmp-{os.getpid()}-{next(self.podman.counter)}"
        created = self.client.post("/containers/create", params={"name": name}, json=body)
        _expect(created, 201, "podman create")
        handle = str(created.json()["Id"])
        _expect(self.client.post(f"/containers/{handle}/start"), 204, "podman start")
        return handle

    def run(self, handle: str | None, cmd: list[str]) -> bytes:
        body = {"Cmd": cmd, "AttachStdout": True, "AttachStderr": True}
        created = self.client.post(f"/containers/{handle}/exec", json=body)
        _expect(created, 201, "podman exec create")
        exec_id = created.json()["Id"]
        started = self.client.post(f"/exec/{exec_id}/start", json={"Detach": False, "Tty": False})
        _expect(started, 200, "podman exec start")
        inspected = self.client.get(f"/exec/{exec_id}/json")
        _expect(inspected, 200, "podman exec inspect")
        if inspected.json()["ExitCode"] != 0:
            raise PeerError(f"podman exec {cmd} ended {inspected.json()['ExitCode']}")
        return _demultiplex(started.content)

    def destroy(self, handle: str) -> None:
        deleted = self.client.delete(f"/containers/{handle}", params={"force": True})
        _expect(deleted, 204, "podman delete")

    def close(self) -> None:
        self.client.close()


class Crun(Peer):
    name = "crun"

    def __init__(self, work: Path, rootfs: Path) -> None:
        super().__init__(work)
        self.rootfs = rootfs
        self.state = work / "state"
        self.counter = itertools.count()

    def start(self) -> None:
        for name, args in (("idle", IDLE_CMD), ("true", TRUE)):
            bundle = self.work / name
            bundle.mkdir(parents=True)
            subprocess.run(["crun", "spec"], cwd=bundle, check=True)
            config = json.loads((bundle / "config.json").read_text())
            config["process"]["terminal"] = False
            config["process"]["args"] = args
            config["root"] = {"path": str(self.rootfs), "readonly": True}
            (bundle / "config.json").write_text(json.dumps(config, indent=1))

    def crun(self, *args: str, output: bool = False) -> bytes:
        # A file, not a pipe, for stderr: a detached container keeps what it inherited open.
        with tempfile.TemporaryFile(dir=self.work) as errors:
            result = subprocess.run(
                ["crun", "--root", str(self.state), *args],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if output else subprocess.DEVNULL,
                stderr=errors,
            )
            if result.returncode != 0:
                errors.seek(0)
                message = errors.read().decode(errors="replace")
                raise PeerError(f"crun {' '.join(args)} ended {result.returncode}: {message}")
        return result.stdout or b""

    def containers(self) -> list[dict[str, Any]]:
        if not self.state.exists():
            return []
        found: list[dict[str, Any]] = json.loads(self.crun("list", "--format", "json", output=True))
        return found or []

    def worker(self) -> Worker:
        return CrunWorker(self)

    def pids(self, handles: list[str]) -> list[int]:
        pids = [int(c["pid"]) for c in self.containers() if c["id"] in set(handles)]
        return [p for pid in pids for p in (pid, *memory.descendants(pid))]

    def stop(self) -> None:
        for container in self.containers():
            self.crun("delete", "--force", container["id"])


class CrunWorker(Worker):
    def __init__(self, crun: Crun) -> None:
        self.crun = crun

    def create(self) -> str:
        handle = f"sbcmp-{os.getpid()}-{next(self.crun.counter)}"
        self.crun.crun("run", "--detach", "--bundle", str(self.crun.work / "idle"), handle)
        return handle

    def run(self, handle: str | None, cmd: list[str]) -> bytes:
        assert handle is not None
        return self.crun.crun("exec", handle, *cmd, output=True)

    def destroy(self, handle: str) -> None:
        self.crun.crun("delete", "--force", handle)

    def lifecycle(self) -> None:
        """`crun run` of `true`: create, start, wait and delete in one command."""
        handle = f"sbcmp-{os.getpid()}-{next(self.crun.counter)}"
        self.crun.crun("run", "--bundle", str(self.crun.work / "true"), handle)


class Bubblewrap(Peer):
    name = "bwrap"
    lasting = False

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.idle: dict[str, subprocess.Popen[bytes]] = {}

    def worker(self) -> Worker:
        return BubblewrapWorker(self)

    def pids(self, handles: list[str]) -> list[int]:
        pids = [self.idle[h].pid for h in handles]
        return [p for pid in pids for p in (pid, *memory.descendants(pid))]

    def stop(self) -> None:
        for handle in list(self.idle):
            BubblewrapWorker(self).destroy(handle)


class BubblewrapWorker(Worker):
    def __init__(self, bwrap: Bubblewrap) -> None:
        self.bwrap = bwrap

    def create(self) -> str:
        """An idle sandbox, for the memory figures only: bwrap holding a `sleep`."""
        proc = subprocess.Popen([*BWRAP, *IDLE_CMD], stdin=subprocess.DEVNULL)
        self.bwrap.idle[str(proc.pid)] = proc
        return str(proc.pid)

    def destroy(self, handle: str) -> None:
        proc = self.bwrap.idle.pop(handle)
        proc.kill()  # --die-with-parent takes what it started along
        proc.wait()

    def run(self, handle: str | None, cmd: list[str]) -> bytes:
        result = subprocess.run([*BWRAP, *cmd], stdin=subprocess.DEVNULL, capture_output=True)
        if result.returncode != 0:
            raise PeerError(f"bwrap {cmd} ended {result.returncode}: {result.stderr!r}")
        return result.stdout

    def lifecycle(self) -> None:
        self.run(None, TRUE)


# -- helpers --------------------------------------------------------------------------------


def busybox_rootfs(target: Path) -> Path | None:
    """A root filesystem of one static busybox and a link per applet; None without one."""
    busybox = shutil.which("busybox")
    if busybox is None or _is_dynamic(Path(busybox)):
        return None
    bin_dir = target / "bin"
    bin_dir.mkdir(parents=True)
    shutil.copy2(busybox, bin_dir / "busybox")
    applets = subprocess.run([busybox, "--list"], capture_output=True, text=True, check=True)
    for applet in applets.stdout.split():
        if applet != "busybox":
            (bin_dir / applet).symlink_to("busybox")
    for name in ("proc", "sys", "dev", "tmp", "etc", "root"):
        (target / name).mkdir()
    (target / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    return target


def _is_dynamic(path: Path) -> bool:
    """Whether an ELF file asks for a program interpreter (the dynamic loader)."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # 64-bit only
        return True
    (phoff,) = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    for i in range(phnum):
        (kind,) = struct.unpack_from("<I", data, phoff + i * phentsize)
        if kind == 3:  # PT_INTERP
            return True
    return False


def _remove_cgroup(path: Path) -> None:
    """rmdir a cgroup and the cgroups below it, deepest first."""
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    path.rmdir()


def _demultiplex(stream: bytes) -> bytes:
    """The stdout frames of a Docker attach stream: [kind, 0, 0, 0, size (BE32)] + data."""
    out, offset = bytearray(), 0
    while offset + 8 <= len(stream):
        kind, size = stream[offset], struct.unpack_from(">I", stream, offset + 4)[0]
        if kind == 1:
            out += stream[offset + 8 : offset + 8 + size]
        offset += 8 + size
    return bytes(out)


def _expect(response: httpx.Response, status: int, what: str) -> None:
    if response.status_code != status:
        raise PeerError(f"{what} answered {response.status_code}: {response.text[:300]}")


def pids_with(marker: str) -> list[int]:
    found = []
    for pid in (int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid != os.getpid() and marker.encode() in _cmdline(pid):
            found.append(pid)
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return b""


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def tool_version(tool: str) -> str:
    result = subprocess.run([tool, "--version"], capture_output=True, text=True)
    match = re.search(r"\d+\.\d+(\.\d+)?", result.stdout + result.stderr)
    return match.group(0) if match else "?"
