"""sandboxd beside podman (its REST API), crun and bubblewrap: the bench's workloads against
each of them that is installed, in the same run, each figure printed beside ours with the ratio.

    python3 tests/perf/compare.py [--count 100] [--idle 100] [--json]     (as root)

Runs in: this process, as root. Ours first, through `sandboxd bench` on a private daemon in
the host's namespaces. Then the peers, from a private mount namespace this process enters, in
which the few host paths they write to are covered, so that nothing of theirs stays on the host:
  - /sys/fs/cgroup/unified/cgroup.controllers reads empty: crun 1.8 refuses to run on a hybrid
    cgroup host whose cgroup2 hierarchy offers any controller (this one offers hugetlb), and
    checks only this file; containers then live in the v1 hierarchies, as they would anyway;
  - /run/containers and /var/lib/containers are private tmpfs (podman's network and blob
    caches); everything else of podman's (storage, runtime state) is under our temporary
    directory, given with --root, --runroot and --tmpdir.
What the peers run, the same for each: a busybox rootfs imported from /bin/busybox (Debian's
busybox-static), `sleep 3600` as a lasting container's process, `true` and a 1 MiB writer
as execs. Podman: rootful `podman system service`, Docker-compatible API, NetworkMode "none",
exec = create, start attached, inspect. crun: `crun run --detach` (create), `crun exec`,
`crun delete --force`, and `crun run` of `true` for a whole lifecycle. bubblewrap has no lasting
sandbox: its lifecycle is one `bwrap --unshare-all … true`, and its 1 MiB and throughput figures
are such one-shot runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from bench import memory  # noqa: E402
from bench.run import OUTPUT_BYTES, OUTPUT_CMD, TRUE, Options, heading, run_bench  # noqa: E402
from bench.stats import Latency, format_table, measure, run_concurrently  # noqa: E402
from daemon import syscalls  # noqa: E402

IMAGE = "sandboxd-compare-busybox"
BWRAP = ["bwrap", "--unshare-all", "--die-with-parent", "--ro-bind", "/", "/"]
BWRAP += ["--proc", "/proc", "--dev", "/dev"]
IDLE_CMD = ["sleep", "3600"]
_SETTLE_SECONDS = 1.0
_HYBRID_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")
# Host paths podman and crun write to whatever their flags say: private tmpfs while we run.
_SHADOWED = [
    Path(p) for p in ("/run/containers", "/var/lib/containers", "/run/libpod", "/run/crun")
]
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
        return [pid for pid in _pids_with(str(self.work)) if _comm(pid) == "conmon"]

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


# -- the workloads, as the bench runs them on sandboxd ----------------------------------------


def measure_peer(peer: Peer, options: Options, say: Callable[[str], None]) -> dict[str, Any]:
    count, warmup = options.count, options.warmup
    worker = peer.worker()
    try:
        say(f"{peer.name}: latencies")
        for _ in range(warmup):
            worker.lifecycle()
            handle = worker.create() if peer.lasting else None
            _check_output(worker.run(handle, OUTPUT_CMD))
            if handle is not None:
                worker.destroy(handle)
        rows = [
            Latency("create_bridge", "create with a bridge", skipped="measured with no network")
        ]
        if peer.lasting:
            ids: list[str] = []
            rows.insert(0, measure("create", "create", lambda: ids.append(worker.create()), count))
            fresh = iter(ids)
            rows.append(
                measure(
                    "first_exec",
                    "first exec `true`",
                    lambda: worker.run(next(fresh), TRUE),
                    count,
                )
            )
            warm = ids[0]
            rows.append(measure("exec", "exec `true`", lambda: worker.run(warm, TRUE), count))
            peer.tidy()
            rows.append(
                measure(
                    "exec_1mib",
                    "exec with 1 MiB of output",
                    lambda: _check_output(worker.run(warm, OUTPUT_CMD)),
                    count,
                )
            )
            peer.tidy()
            rows.append(measure("destroy", "destroy", lambda: worker.destroy(ids.pop()), count))
        else:
            rows.append(
                measure(
                    "exec_1mib",
                    "one-shot run with 1 MiB of output",
                    lambda: _check_output(worker.run(None, OUTPUT_CMD)),
                    count,
                )
            )
        rows.append(measure("lifecycle", "lifecycle", worker.lifecycle, count))
        peer.tidy()
        throughput = [t.summary() for t in _throughput(peer, options, say)]
        idle = [_idle_memory(peer, worker, k, say) for k in options.idle]
        return {
            "latency": [row.summary() for row in rows],
            "throughput": throughput,
            "memory": idle,
        }
    finally:
        worker.close()


def _throughput(peer: Peer, options: Options, say: Callable[[str], None]) -> list[Any]:
    if not options.concurrency:
        return []
    say(f"{peer.name}: throughput at {options.concurrency}")
    workers = [peer.worker() for _ in range(max(options.concurrency))]
    handles = [w.create() if peer.lasting else None for w in workers]
    results = []
    try:
        for level in options.concurrency:
            operations = [_bound(workers[i], handles[i]) for i in range(level)]
            for operation in operations:
                operation()
            results.append(run_concurrently(operations, options.duration))
            peer.tidy()
    finally:
        for worker, handle in zip(workers, handles, strict=True):
            if handle is not None:
                worker.destroy(handle)
            worker.close()
    return results


def _bound(worker: Worker, handle: str | None) -> Callable[[], object]:
    return lambda: worker.run(handle, TRUE)


def _idle_memory(
    peer: Peer, worker: Worker, count: int, say: Callable[[str], None]
) -> dict[str, Any]:
    say(f"{peer.name}: memory with {count} idle sandboxes")
    peer.tidy()
    time.sleep(_SETTLE_SECONDS)
    available_before = memory.mem_available_kib()
    kernel_before = memory.kernel_kib()
    service_before = memory.pss_kib(peer.service_pids())[0]
    handles: list[str] = []
    started = time.perf_counter()
    try:
        for _ in range(count):
            handles.append(worker.create())
        created = time.perf_counter() - started
        time.sleep(_SETTLE_SECONDS)
        available_after = memory.mem_available_kib()
        kernel_after = memory.kernel_kib()
        pss_after, readable = memory.pss_kib(peer.pids(handles))
    finally:
        for handle in handles:
            worker.destroy(handle)
    return {
        "sandboxes": count,
        "mem_available_mib_per_sandbox": round(
            (available_before - available_after) / count / 1024, 3
        ),
        "kernel_mib_per_sandbox": round((kernel_after - kernel_before) / count / 1024, 3),
        "pss_mib_per_sandbox": round((pss_after - service_before) / count / 1024, 3),
        "service_pss_mib": round(service_before / 1024, 3),
        "processes_counted": readable,
        "create_seconds": round(created, 2),
    }


# -- the comparison ---------------------------------------------------------------------------

LATENCY_FIGURES = [
    ("create", "create"),
    ("create_bridge", "create with a bridge"),
    ("first_exec", "first exec `true` in a new sandbox"),
    ("exec", "exec `true`, again in one sandbox"),
    ("exec_1mib", "exec with 1 MiB of output"),
    ("destroy", "destroy"),
    ("lifecycle", "create → exec `true` → destroy"),
]


def comparison(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of [figure, ours, then value and ratio for each peer]. A ratio is how many times
    sandboxd is ahead (peer ÷ ours for times and memory, ours ÷ peer for throughput)."""
    rows: list[list[Any]] = []

    def add(
        label: str, get: Callable[[dict[str, Any]], float | None], higher_is_better: bool
    ) -> None:
        mine = get(ours)
        row: list[Any] = [label, mine]
        for report in peers.values():
            theirs = get(report) if "skipped" not in report else None
            row += [theirs, _ratio(mine, theirs, higher_is_better)]
        rows.append(row)

    for name, label in LATENCY_FIGURES:
        for q in ("p50", "p99"):
            add(f"{label}, {q} ms", _latency(name, q), higher_is_better=False)
    for level in ours["throughput"]:
        c = level["concurrency"]
        add(f"exec `true` per second, {c} at once", _throughput_at(c), higher_is_better=True)
    for idle in ours["memory"]:
        k = idle["sandboxes"]
        for key, label in (
            ("mem_available_mib_per_sandbox", "MiB of MemAvailable"),
            ("pss_mib_per_sandbox", "MiB of PSS"),
        ):
            add(f"{label} per idle sandbox, {k} alive", _memory_at(k, key), higher_is_better=False)
        add(f"service PSS MiB, {k} alive", _memory_at(k, "service_pss_mib"), higher_is_better=False)
    return rows


def _latency(name: str, q: str) -> Callable[[dict[str, Any]], float | None]:
    def get(report: dict[str, Any]) -> float | None:
        row = next((r for r in report["latency"] if r["name"] == name), None)
        return None if row is None else row.get(f"{q}_ms")

    return get


def _throughput_at(concurrency: int) -> Callable[[dict[str, Any]], float | None]:
    def get(report: dict[str, Any]) -> float | None:
        row = next((r for r in report["throughput"] if r["concurrency"] == concurrency), None)
        return None if row is None or row["errors"] else row["per_second"]

    return get


def _memory_at(count: int, key: str) -> Callable[[dict[str, Any]], float | None]:
    def get(report: dict[str, Any]) -> float | None:
        row = next((r for r in report["memory"] if r["sandboxes"] == count), None)
        return None if row is None else row.get(key)

    return get


def _ratio(mine: float | None, theirs: float | None, higher_is_better: bool) -> str | None:
    if mine is None or theirs is None or mine <= 0 or theirs <= 0:
        return None
    ratio = mine / theirs if higher_is_better else theirs / mine
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


def render_comparison(result: dict[str, Any]) -> str:
    peers = result["peers"]
    headers = ["figure", "sandboxd"]
    for name in peers:
        headers += [name, "x"]
    measured = [
        f"{name} {report.get('version', '?')} (load {_load(report.get('load_before'))} before)"
        for name, report in peers.items()
        if "skipped" not in report
    ]
    lines = [
        *heading(result["sandboxd"]),
        f"then, in the same run: {', '.join(measured) or 'no peer'}; "
        f"load {_load(result.get('load_after'))} at the end",
        "",
        format_table(headers, comparison(result["sandboxd"], peers)),
        "",
        "x: how many times sandboxd is ahead (peer ÷ sandboxd for times and memory, "
        "sandboxd ÷ peer for execs per second).",
    ]
    for name, report in peers.items():
        if "skipped" in report:
            lines.append(f"{name}: not measured: {report['skipped']}")
        elif "note" in report:
            lines.append(f"{name}: {report['note']}")
    return "\n".join(lines) + "\n"


def _load(values: list[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "?"


PEER_NOTES = {
    "podman": "REST API (Docker-compatible), rootful, NetworkMode none; exec = create, start "
    "attached, inspect; the conmon pair each exec leaves is killed between rows",
    "crun": "CLI; create = `crun run --detach`, destroy = `crun delete --force`, lifecycle = "
    "one `crun run` of `true`; no user namespace (crun spec's default)",
    "bwrap": "no lasting sandbox: lifecycle, 1 MiB and execs per second are one-shot "
    "`bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev /dev CMD`; "
    "idle = bwrap holding a `sleep`",
}


# -- the run ----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = Options(args.count, args.warmup, args.concurrency, args.duration, args.idle)

    def say(message: str) -> None:
        print(f"compare: {message}", file=sys.stderr, flush=True)

    say("sandboxd (sandboxd bench on a private daemon)")
    ours = run_bench(None, None, options)
    result: dict[str, Any] = {"sandboxd": ours, "peers": {}}
    work = Path(tempfile.mkdtemp(prefix="sandboxd-compare-"))
    try:
        rootfs = busybox_rootfs(work / "rootfs")
        covered = private_mount_namespace(work)
        try:
            for name in args.peers:
                result["peers"][name] = measure_one(name, work, rootfs, options, say)
        finally:
            leave_mount_namespace(work, covered)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    sys.stdout.write(
        json.dumps(result, indent=2) + "\n" if args.json else render_comparison(result)
    )
    return 0


def measure_one(
    name: str, work: Path, rootfs: Path | None, options: Options, say: Callable[[str], None]
) -> dict[str, Any]:
    tool = "bwrap" if name == "bwrap" else name
    if shutil.which(tool) is None:
        return {"skipped": f"{tool} is not installed (apt-get install {_PACKAGES[name]})"}
    if name in ("podman", "crun") and rootfs is None:
        return {"skipped": "no static busybox for a rootfs (apt-get install busybox-static)"}
    (work / name).mkdir()
    peer: Peer
    if name == "podman":
        assert rootfs is not None
        peer = Podman(work / name, rootfs)
    elif name == "crun":
        assert rootfs is not None
        peer = Crun(work / name, rootfs)
    else:
        peer = Bubblewrap(work / name)
    load = [round(x, 2) for x in os.getloadavg()]
    try:
        peer.start()
        report = measure_peer(peer, options, say)
    finally:
        peer.stop()
    left = _pids_with(str(work / name))
    if left:
        raise PeerError(f"{name} left processes behind: {left}")
    return report | {"note": PEER_NOTES[name], "load_before": load, "version": _version(tool)}


_PACKAGES = {"podman": "podman", "crun": "crun", "bwrap": "bubblewrap"}


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


def private_mount_namespace(work: Path) -> list[Path]:
    """Enter a mount namespace of our own (see the top of this file); the paths we created."""
    syscalls.unshare(syscalls.CLONE_NEWNS)
    syscalls.mount(None, "/", None, syscalls.MS_REC | syscalls.MS_PRIVATE)
    if _HYBRID_CONTROLLERS.exists():
        syscalls.mount("/dev/null", str(_HYBRID_CONTROLLERS), None, syscalls.MS_BIND)
    created = []
    for path in _SHADOWED:
        if not path.exists():
            path.mkdir(mode=0o700)
            created.append(path)
        syscalls.mount("tmpfs", str(path), "tmpfs", 0, "mode=0700")
    return created


def leave_mount_namespace(work: Path, created: list[Path]) -> None:
    """Unmount what the peers left mounted under `work` and our covers; remove what we made."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for target in sorted(mounts, key=len, reverse=True):
        if target.startswith(str(work) + "/") or target in {str(p) for p in _SHADOWED}:
            with contextlib.suppress(OSError):
                syscalls.umount2(target, syscalls.MNT_DETACH)
    for path in created:
        with contextlib.suppress(OSError):
            path.rmdir()


def _remove_cgroup(path: Path) -> None:
    """rmdir a cgroup and the cgroups below it, deepest first."""
    for child in path.iterdir():
        if child.is_dir():
            _remove_cgroup(child)
    path.rmdir()


def _check_output(stdout: bytes) -> None:
    if len(stdout) != OUTPUT_BYTES:
        raise PeerError(f"expected {OUTPUT_BYTES} bytes of output, got {len(stdout)}")


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


def _pids_with(marker: str) -> list[int]:
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


def _version(tool: str) -> str:
    result = subprocess.run([tool, "--version"], capture_output=True, text=True)
    match = re.search(r"\d+\.\d+(\.\d+)?", result.stdout + result.stderr)
    return match.group(0) if match else "?"


def _parser() -> argparse.ArgumentParser:
    def counts(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="samples per latency row [100]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first [5]")
    parser.add_argument("--concurrency", type=counts, default=[1, 4, 16], help="[1,4,16]")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level [5]")
    parser.add_argument("--idle", type=counts, default=[100], help="idle sandboxes [100]")
    parser.add_argument(
        "--peers",
        type=lambda text: [p for p in text.split(",") if p],
        default=["podman", "crun", "bwrap"],
        help="which peers, of podman, crun, bwrap [all]",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


if __name__ == "__main__":
    sys.exit(main())
