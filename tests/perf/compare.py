"""sandboxd beside podman (its REST API), crun and bubblewrap: the bench's workloads against
each of them that is installed, in the same run, each figure printed beside ours with the ratio.

    python3 tests/perf/compare.py [--count 100] [--idle 50] [--pool 4] [--json]     (as root)

Then each of the project's targets (TARGETS: create, pooled create, exec, destroy, lifecycle,
execs per second at 16 clients, memory per idle sandbox with the service's share and the
service's memory, both with 50 alive), our figure, whether it is met, each peer's beside it.

Runs in: this process, as root. Ours first, through the bench (tests/perf/bench) on a private
daemon in the host's namespaces. Then the peers, from a private mount namespace this process
enters, in which the few host paths they write to are covered, so that nothing of theirs stays
on the host:
  - /sys/fs/cgroup/unified/cgroup.controllers reads empty: crun 1.8 refuses to run on a hybrid
    cgroup host whose cgroup2 hierarchy offers any controller (this one offers hugetlb), and
    checks only this file; containers then live in the v1 hierarchies, as they would anyway;
  - /run/containers, /var/lib/containers, /run/libpod and /run/crun are private tmpfs (what
    podman and crun write there whatever their flags say); everything else of theirs
    (storage, runtime state, bundles) is under our temporary directory, given with --root,
    --runroot and --tmpdir; the cgroups podman makes and never removes, we remove.
What the peers run (tests/perf/peers.py), the same for each: a busybox rootfs imported from
/bin/busybox (Debian's busybox-static), `sleep 3600` as a lasting container's process, `true`
and a 1 MiB writer as execs. Podman: rootful `podman system service`, Docker-compatible API,
NetworkMode "none", exec = create, start attached, inspect. crun: `crun run --detach`
(create), `crun exec`, `crun delete --force`, and `crun run` of `true` for a whole lifecycle.
bubblewrap has no lasting sandbox: its lifecycle is one `bwrap --unshare-all … true`, and its
1 MiB and throughput figures are such one-shot runs too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from daemon.linux import syscalls  # noqa: E402
from tests.perf.bench import memory  # noqa: E402
from tests.perf.bench.run import (  # noqa: E402
    OUTPUT_BYTES,
    OUTPUT_CMD,
    SPACED_MS,
    TRUE,
    Options,
    heading,
    run_bench,
)
from tests.perf.bench.stats import Latency, format_table, measure, run_concurrently  # noqa: E402
from tests.perf.peers import (  # noqa: E402
    Bubblewrap,
    Crun,
    Peer,
    PeerError,
    Podman,
    Worker,
    busybox_rootfs,
    pids_with,
    tool_version,
)

_SETTLE_SECONDS = 1.0
_HYBRID_CONTROLLERS = Path("/sys/fs/cgroup/unified/cgroup.controllers")
# Host paths podman and crun write to whatever their flags say: private tmpfs while we run.
_SHADOWED = [
    Path(p) for p in ("/run/containers", "/var/lib/containers", "/run/libpod", "/run/crun")
]


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
            rows.append(
                measure(
                    "exec_spaced",
                    "exec `true`, spaced",
                    lambda: worker.run(warm, TRUE),
                    count,
                    pause=SPACED_MS / 1000,
                )
            )
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
        service = set(peer.service_pids())
        pss_after, readable = memory.pss_kib(service | set(peer.pids(handles)))
        service_alive = memory.pss_kib(service)[0]
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
        "pss_total_mib_per_sandbox": round(pss_after / count / 1024, 3),
        "service_pss_mib": round(service_before / 1024, 3),
        "service_pss_alive_mib": round(service_alive / 1024, 3),
        "processes_counted": readable,
        "create_seconds": round(created, 2),
    }


# -- the comparison ---------------------------------------------------------------------------

Getter = Callable[[dict[str, Any]], float | None]

LATENCY_FIGURES = [
    ("create", "create"),
    ("create_bridge", "create with a bridge"),
    ("first_exec", "first exec `true` in a new sandbox"),
    ("exec", "exec `true`, again in one sandbox"),
    ("exec_spaced", f"the same, {SPACED_MS} ms after the last"),
    ("exec_1mib", "exec with 1 MiB of output"),
    ("destroy", "destroy"),
    ("lifecycle", "create → exec `true` → destroy"),
]
# With --pool: ours from the warm pool, beside the peers' plain figures.
POOL_FIGURES = [
    ("create_pool", "create", "create, from the warm pool"),
    ("lifecycle_pool", "lifecycle", "create → exec → destroy, from the pool"),
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
    for mine, theirs, label in POOL_FIGURES:
        if _latency(mine, "p50")(ours) is None:
            continue
        for q in ("p50", "p99"):
            add(
                f"{label}, {q} ms",
                _ours_or_theirs(ours, _latency(mine, q), _latency(theirs, q)),
                higher_is_better=False,
            )
    for level in ours["throughput"]:
        c = level["concurrency"]
        add(f"exec `true` per second, {c} at once", _throughput_at(c), higher_is_better=True)
    for idle in ours["memory"]:
        k = idle["sandboxes"]
        for key, label in (
            ("mem_available_mib_per_sandbox", "MiB of MemAvailable"),
            ("pss_mib_per_sandbox", "MiB of PSS"),
            ("pss_total_mib_per_sandbox", "MiB of PSS, with the service's share,"),
        ):
            add(f"{label} per idle sandbox, {k} alive", _memory_at(k, key), higher_is_better=False)
        add(f"service PSS MiB, {k} alive", _service_alive(k), higher_is_better=False)
        add(
            f"service PSS MiB, before the {k} were made",
            _memory_at(k, "service_pss_mib"),
            higher_is_better=False,
        )
    return rows


def _ours_or_theirs(ours: dict[str, Any], mine: Getter, theirs: Getter) -> Getter:
    """`mine` of our report, `theirs` of a peer's: a row whose figure differs by who runs it."""
    return lambda report: mine(report) if report is ours else theirs(report)


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


def _service_alive(count: int) -> Callable[[dict[str, Any]], float | None]:
    """The service's PSS with `count` alive; a report from before that figure has only the
    one measured before they were made."""
    alive, before = _memory_at(count, "service_pss_alive_mib"), _memory_at(count, "service_pss_mib")

    def get(report: dict[str, Any]) -> float | None:
        value = alive(report)
        return before(report) if value is None else value

    return get


def _ratio(mine: float | None, theirs: float | None, higher_is_better: bool) -> str | None:
    if mine is None or theirs is None or mine <= 0 or theirs <= 0:
        return None
    ratio = mine / theirs if higher_is_better else theirs / mine
    return f"{ratio:.1f}x" if ratio >= 10 else f"{ratio:.2f}x"


# The project's targets: (row, target as written, limit, higher is better, our figure, a peer's
# figure to set beside it). The memory rows are at TARGET_IDLE sandboxes alive (--idle).
TARGET_IDLE = 50
TARGET_CLIENTS = 16
TARGETS: list[tuple[str, str, float, bool, Getter, Getter]] = [
    ("create (fresh) p50, ms", "<= 5", 5.0, False, _latency("create", "p50"),
     _latency("create", "p50")),
    ("create from the warm pool p50, ms", "<= 2", 2.0, False, _latency("create_pool", "p50"),
     _latency("create", "p50")),
    ("exec `true` p50 with its exit code back, ms", "<= 2", 2.0, False, _latency("exec", "p50"),
     _latency("exec", "p50")),
    ("destroy p50, ms", "<= 4", 4.0, False, _latency("destroy", "p50"),
     _latency("destroy", "p50")),
    ("destroy p99, ms", "<= 15", 15.0, False, _latency("destroy", "p99"),
     _latency("destroy", "p99")),
    ("create → exec → destroy p50, ms", "<= 12", 12.0, False, _latency("lifecycle", "p50"),
     _latency("lifecycle", "p50")),
    (f"execs/s with {TARGET_CLIENTS} clients", ">= 800", 800.0, True,
     _throughput_at(TARGET_CLIENTS), _throughput_at(TARGET_CLIENTS)),
    (f"MiB per idle sandbox, PSS with the service's share, {TARGET_IDLE} alive", "<= 1", 1.0,
     False, _memory_at(TARGET_IDLE, "pss_total_mib_per_sandbox"),
     _memory_at(TARGET_IDLE, "pss_total_mib_per_sandbox")),
    (f"service MiB (daemon + zygotes PSS), {TARGET_IDLE} alive", "<= 40", 40.0, False,
     _service_alive(TARGET_IDLE), _service_alive(TARGET_IDLE)),
]  # fmt: skip


def target_rows(ours: dict[str, Any], peers: dict[str, dict[str, Any]]) -> list[list[Any]]:
    """Rows of [row, target, ours, met, then value and ratio for each peer]. met is "yes",
    "no" or "not measured"; the pool row's peer figure is its plain create (it has no pool)."""
    rows: list[list[Any]] = []
    for label, target, limit, higher_is_better, mine_get, theirs_get in TARGETS:
        mine = mine_get(ours)
        if mine is None:
            met = "not measured"
        else:
            met = "yes" if (mine >= limit if higher_is_better else mine <= limit) else "no"
        row: list[Any] = [label, target, mine, met]
        for report in peers.values():
            theirs = theirs_get(report) if "skipped" not in report else None
            row += [theirs, _ratio(mine, theirs, higher_is_better)]
        rows.append(row)
    return rows


def render_targets(result: dict[str, Any]) -> list[str]:
    peers = result["peers"]
    rows = target_rows(result["sandboxd"], peers)
    headers = ["target", "aim", "sandboxd", "met"]
    for name in peers:
        headers += [name, "x"]
    met = sum(row[3] == "yes" for row in rows)
    missing = [row[0] for row in rows if row[3] == "not measured"]
    lines = [
        format_table(headers, rows),
        "",
        f"targets met: {met} of {len(rows)}"
        + (f"; not measured: {', '.join(missing)}" if missing else "")
        + (f" (the pool row needs --pool, the memory rows --idle {TARGET_IDLE}, "
           f"the execs/s row --concurrency {TARGET_CLIENTS})" if missing else ""),
        "the warm pool's row has each peer's plain create beside it (they have no pool).",
    ]  # fmt: skip
    return lines


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
    lines += ["", *render_targets(result)]
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
    options = Options(
        args.count, args.warmup, args.concurrency, args.duration, args.idle, transfer_mib=0
    )

    def say(message: str) -> None:
        print(f"compare: {message}", file=sys.stderr, flush=True)

    say("sandboxd (python3 -m tests.perf.bench on a private daemon)")
    ours = run_bench(None, None, options)
    if args.pool:
        say(f"sandboxd with a warm pool of {args.pool} (another private daemon)")
        pooled = Options(
            args.count,
            args.warmup,
            [],
            args.duration,
            [],
            args.pool,
            pool_only=True,
            transfer_mib=0,
        )
        ours["latency"] += run_bench(None, None, pooled)["latency"]
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
    result["targets"] = [
        dict(zip(["row", "target", "sandboxd", "met"], row[:4], strict=True))
        for row in target_rows(ours, result["peers"])
    ]
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
    left = pids_with(str(work / name))
    if left:
        raise PeerError(f"{name} left processes behind: {left}")
    return report | {"note": PEER_NOTES[name], "load_before": load, "version": tool_version(tool)}


_PACKAGES = {"podman": "podman", "crun": "crun", "bwrap": "bubblewrap"}


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


def _check_output(stdout: bytes) -> None:
    if len(stdout) != OUTPUT_BYTES:
        raise PeerError(f"expected {OUTPUT_BYTES} bytes of output, got {len(stdout)}")


def _parser() -> argparse.ArgumentParser:
    def counts(text: str) -> list[int]:
        return [int(part) for part in text.split(",") if part.strip()]

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=100, help="samples per latency row [100]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed rounds first [5]")
    parser.add_argument("--concurrency", type=counts, default=[1, 4, 16], help="[1,4,16]")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level [5]")
    parser.add_argument(
        "--idle", type=counts, default=[TARGET_IDLE], help=f"idle sandboxes [{TARGET_IDLE}]"
    )
    parser.add_argument(
        "--peers",
        type=lambda text: [p for p in text.split(",") if p],
        default=["podman", "crun", "bwrap"],
        help="which peers, of podman, crun, bwrap [all]",
    )
    parser.add_argument(
        "--pool",
        type=int,
        default=4,
        help="also measure our creates from a warm pool of N, on a second daemon (0: not) [4]",
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


if __name__ == "__main__":
    sys.exit(main())
