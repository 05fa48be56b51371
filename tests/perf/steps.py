"""Where a create, an exec and a destroy spend their time on the daemon's side: a private daemon
with a timer around each of their steps, driven through each N times; p50 and p90 per step.

    python3 tests/perf/steps.py [--count 50] [--warmup 5] [--json]          (as root)
    python3 -m tests.perf.steps daemon OUT serve --config C --listen unix:///…/s.sock …
        the timed daemon alone, for any other load: `kill -USR1 PID` writes the steps so
        far to OUT.N.json (N = 0, 1, …) and starts counting afresh

Runs in: this process, as root, an HTTP client of a private daemon (tests/perf/bench/daemon.py)
whose process is this module too (the `daemon` command): it wraps the steps, functions and
methods of daemon/lifecycle, daemon/linux, daemon/network and the store, by name and at run
time (daemon/ itself is not changed), then becomes `sandboxd serve`. A step renamed or gone in
daemon/ is listed as missing (tests/perf/test_steps_smoke.py fails on it). Each step's time is
counted for the request being served (create, exec or destroy: the driver sends one at a
time), at its depth below the request; a step called more than once per request shows how
many times, and its time per request.

The driver: a few warm-up lifecycles, then N creates (the sandboxes stay), N execs of `true`
(wait mode) into one of them, N destroys. The zygote and the supervisor are other processes:
their part shows as round trips (the zygote chain from its request to its reply, the wait for
the supervisor's HELLO, EXEC sent → STARTED and → EXITED read); inside them, strace -f -ttt.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import functools
import inspect
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tests.perf.bench.daemon import PrivateDaemon  # noqa: E402
from tests.perf.bench.run import TRUE, Api, Bench, Options  # noqa: E402
from tests.perf.bench.stats import format_table, percentile  # noqa: E402

OPERATIONS = ("create", "exec", "destroy")
OUTSIDE = "outside a request"
CLIENT = "the request, as the client sees it"
HTTP = "HTTP, routing, JSON (client's time - SandboxManager's)"
_CHECKPOINT_TIMEOUT = 10.0

# -- the daemon's side: timers around its steps -------------------------------------------------

Key = tuple[str, int, str]  # operation, depth below the request, step
STEPS: dict[Key, list[float]] = {}
MISSING: list[str] = []
_operation: str | None = None  # the request being served (one at a time)
_depth: contextvars.ContextVar[int] = contextvars.ContextVar("steps_depth", default=0)


def _now() -> float:
    return time.perf_counter_ns() / 1e6


def _add(label: str, depth: int, ms: float) -> None:
    STEPS.setdefault((_operation or OUTSIDE, depth, label), []).append(ms)


def timed(owner: Any, name: str, label: str, *, depth: int | None = None) -> None:
    """Wrap owner.name (a function or coroutine function) so that each call's milliseconds
    are counted for `label`. `depth`: where it sits below the request, for a step that runs
    in a task of its own (whose context does not say); else one below its caller."""
    original = getattr(owner, name, None)
    if original is None or not callable(original):
        MISSING.append(f"{getattr(owner, '__name__', owner)}.{name}")
        return

    def enter() -> tuple[int, contextvars.Token[int], float]:
        level = _depth.get() + 1 if depth is None else depth
        # Registered on entry: a table in the order the steps start, parents before children.
        STEPS.setdefault((_operation or OUTSIDE, level, label), [])
        return level, _depth.set(level), _now()

    if inspect.iscoroutinefunction(original):

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            level, token, start = enter()
            try:
                return await original(*args, **kwargs)
            finally:
                _add(label, level, _now() - start)
                _depth.reset(token)

        setattr(owner, name, async_wrapper)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        level, token, start = enter()
        try:
            return original(*args, **kwargs)
        finally:
            _add(label, level, _now() - start)
            _depth.reset(token)

    setattr(owner, name, wrapper)


def request(owner: Any, name: str, operation: str) -> None:
    """Wrap the service's entry point for `operation`: what it calls counts for it."""
    timed(owner, name, f"{owner.__name__}.{name}", depth=0)
    inner = getattr(owner, name, None)
    if inner is None:
        return

    @functools.wraps(inner)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        global _operation
        _operation = operation
        try:
            return await inner(*args, **kwargs)
        finally:
            _operation = None

    setattr(owner, name, wrapper)


def instrument() -> None:
    """Timers around every step worth one; see the module's docstring."""
    from daemon.lifecycle import (
        default_root,
        execs,
        mailbox,
        recovery,
        service,
        supervisor_link,
        teardown,
    )
    from daemon.lifecycle.cmd_logs import MainLogs
    from daemon.linux import cgroup_v1, cgroup_v2, cgroups, disk, limits
    from daemon.network.bridge import BridgeNetwork
    from daemon.network.ports import PublishedPorts
    from daemon.protocol import ExecRequest, Exited, Message, Started
    from daemon.store.database import Store

    manager = service.SandboxManager
    # create
    timed(manager, "_create", "build a new sandbox (_create)")
    timed(manager, "_take_pooled", "take one from the warm pool (_take_pooled)")
    timed(manager, "_check_host", "1. validate: host paths, controllers (_check_host)")
    timed(cgroups.ProcessTree, "create", "4. cgroup2 mkdir (ProcessTree.create)")
    for module in (cgroup_v1.CgroupV1, cgroup_v2.CgroupV2, limits.NoControllers):
        timed(module, "create", f"4. limits: cgroups and their limits ({module.__name__}.create)")
    timed(manager, "_prepare_files", "4. files: run dir, tmpfs, layers (_prepare_files)")
    timed(disk, "mount_layers_fs", "tmpfs mount (disk.mount_layers_fs)")
    timed(default_root, "write_identity_files", "hostname, hosts, resolv.conf")
    timed(MainLogs, "prepare", "main cmd's log directory (MainLogs.prepare)")
    timed(
        supervisor_link.Zygote,
        "spawn",
        "5. zygote chain: request → fork A, namespaces, fork B → reply (Zygote.spawn)",
    )
    timed(service, "open_pidfd", "5. pidfd_open of PID 1")
    timed(manager, "_connect", "5. wait for the supervisor's HELLO (_connect)")
    timed(supervisor_link.SupervisorLink, "connect", "connect, read HELLO", depth=3)
    timed(manager, "_keep", "6. sandbox.json beside it (_keep)")
    timed(recovery, "keep", "recovery.keep")
    timed(service, "sandbox_view", "the answer's view (sandbox_view)")
    # exec
    timed(execs.Execs, "exec", "Execs.exec")
    timed(supervisor_link.SupervisorLink, "post", "send EXEC (SupervisorLink.post)")
    timed(supervisor_link.SupervisorLink, "answer", "wait for STARTED (SupervisorLink.answer)")
    timed(execs.Execs, "_ended", "wait for EXITED, collected (Execs._ended)")
    timed(execs.Execs, "collect", "collect: mailbox → store (Execs.collect)")
    timed(execs, "read_status", "read the status file")
    timed(execs, "read_output", "read an output file")
    timed(mailbox.Sweeper, "empty", "hand the mailbox slot to the sweeper")
    timed(execs, "exec_view", "the answer's view (exec_view)")
    # destroy: the teardown's seven steps
    timed(manager, "_destroy", "SandboxManager._destroy")
    timed(service, "teardown", "teardown (daemon/lifecycle/teardown.py)")
    timed(service.RecordSteps, "mark", "1. mark (RecordSteps.mark)")
    timed(teardown, "kill", "2. kill (teardown.kill)")
    timed(supervisor_link.SupervisorLink, "aclose", "close the link")
    timed(cgroups.ProcessTree, "kill", "cgroup.kill")
    timed(teardown, "wait_readable", "wait for PID 1 to die (pidfd)")
    timed(PublishedPorts, "close", "3. unpublish (PublishedPorts.close)")
    timed(BridgeNetwork, "unplug", "4. unplug (BridgeNetwork.unplug)")
    timed(service.RecordSteps, "end", "5. end (RecordSteps.end)")
    timed(teardown, "remove_files", "6. remove (teardown.remove_files)")
    timed(cgroups.ProcessTree, "remove", "cgroup2 rmdir (ProcessTree.remove)")
    for module in (cgroup_v1.CgroupV1, cgroup_v2.CgroupV2, limits.NoControllers):
        timed(module, "remove", f"limits: cgroups rmdir ({module.__name__}.remove)")
    timed(disk, "unmount", "tmpfs unmount (disk.unmount)")
    timed(service.RecordSteps, "release", "7. release (RecordSteps.release)")
    timed(MainLogs, "remove", "main cmd's logs (MainLogs.remove)")
    # every store call, wherever it is made
    for name, member in vars(Store).items():
        if inspect.isfunction(member) and not name.startswith("_"):
            timed(Store, name, f"store.{name}")
    # the supervisor's round trips, and the daemon's handling of what it reports
    sent: dict[str, float] = {}
    send = getattr(supervisor_link.SupervisorLink, "send", None)
    on_message = getattr(execs.Execs, "on_message", None)
    if send is None or on_message is None:
        MISSING.append("SupervisorLink.send or Execs.on_message")
        return

    def timed_send(self: Any, message: Message) -> None:
        if isinstance(message, ExecRequest):
            sent[message.id] = _now()
        send(self, message)

    def timed_on_message(self: Any, live: Any, message: Message) -> None:
        # In the link's reader task, whose context says nothing: at the depth of Execs.exec's
        # own steps (2), as if the exec waiting for it had called it.
        arrived = _now()
        exec_id = str(getattr(message, "id", ""))
        if isinstance(message, Started) and exec_id in sent:
            _add("supervisor: EXEC sent → STARTED read", 2, arrived - sent[exec_id])
        elif isinstance(message, Exited) and exec_id in sent:
            _add("supervisor: EXEC sent → EXITED read", 2, arrived - sent.pop(exec_id))
        label = f"handle {type(message).__name__.upper()} (Execs.on_message)"
        STEPS.setdefault((_operation or OUTSIDE, 2, label), [])
        token = _depth.set(2)
        try:
            on_message(self, live, message)
        finally:
            _depth.reset(token)
            _add(label, 2, _now() - arrived)

    supervisor_link.SupervisorLink.send = timed_send  # type: ignore[method-assign]
    execs.Execs.on_message = timed_on_message  # type: ignore[method-assign]
    # Last: the entry points, around everything above.
    request(manager, "create", "create")
    request(manager, "exec", "exec")
    request(manager, "destroy", "destroy")


def snapshot() -> dict[str, Any]:
    steps = [
        {"operation": op, "depth": depth, "step": label, "samples": [round(v, 4) for v in values]}
        for (op, depth, label), values in STEPS.items()
    ]
    return {"missing": MISSING, "steps": steps}


def serve(out: str, argv: list[str]) -> int:
    """The `daemon` command: this process becomes `sandboxd serve`, with the timers."""
    instrument()
    if MISSING:
        print(f"steps: not in daemon/ (any more), not timed: {', '.join(MISSING)}", file=sys.stderr)
    checkpoints = iter(range(1 << 30))

    def on_usr1(_signum: int, _frame: object) -> None:
        path = Path(f"{out}.{next(checkpoints)}.json")
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(snapshot()) + "\n")
        partial.rename(path)  # whole, or not there: the driver waits for it
        STEPS.clear()

    signal.signal(signal.SIGUSR1, on_usr1)
    from api.cli import main as sandboxd

    return sandboxd(argv)


# -- the driver's side ----------------------------------------------------------------------------


def drive(count: int, warmup: int, say: Callable[[str], None]) -> dict[str, Any]:
    """Run a timed private daemon through `count` creates, execs and destroys; the steps."""
    if count < 1:
        raise SystemExit("steps: --count must be at least 1")
    daemon = PrivateDaemon(max(64, count + 16))
    out = daemon.root / "steps"
    daemon.program = [sys.executable, "-m", "tests.perf.steps", "daemon", str(out)]
    client_ms: dict[str, list[float]] = {op: [] for op in OPERATIONS}
    try:
        daemon.start()
        bench = Bench(Api(daemon.url), Options(count=count, warmup=warmup))
        try:
            say(f"{warmup} warm-up lifecycles, then {count} creates, execs and destroys")
            for _ in range(warmup):
                bench.lifecycle(bench.client)
            checkpoint(daemon, out, 0)  # the warm-up's steps: not counted
            ids: list[str] = []
            for _ in range(count):
                ids.append(_timed(client_ms["create"], lambda: bench.create(bench.client)))
            for _ in range(count):
                _timed(client_ms["exec"], lambda: bench.exec(bench.client, ids[0], TRUE))
            for sandbox in reversed(ids):
                _timed(
                    client_ms["destroy"], functools.partial(bench.destroy, bench.client, sandbox)
                )
            report = checkpoint(daemon, out, 1)
        finally:
            bench.destroy_ours()
            bench.close()
    finally:
        left = daemon.remove()
    if left:
        raise SystemExit(f"steps: the daemon left behind (kept in {daemon.root}):\n{left}")
    result = summarize(report, client_ms, count)
    where = {"root": str(daemon.root), "uid_base": daemon.uid_base, "cgroup": daemon.cgroup_name}
    return result | {"daemon": where}


def _timed(samples: list[float], call: Callable[[], object]) -> Any:
    start = _now()
    result = call()
    samples.append(_now() - start)
    return result


def checkpoint(daemon: PrivateDaemon, out: Path, number: int) -> dict[str, Any]:
    """Ask the daemon for its steps so far (it starts afresh), and read them."""
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGUSR1)
    path = Path(f"{out}.{number}.json")
    deadline = time.monotonic() + _CHECKPOINT_TIMEOUT
    while not path.exists():
        if time.monotonic() > deadline or daemon.proc.poll() is not None:
            raise SystemExit(f"steps: the daemon wrote no {path.name}:\n{daemon.log_tail()}")
        time.sleep(0.02)
    report: dict[str, Any] = json.loads(path.read_text())
    return report


def summarize(
    report: dict[str, Any], client_ms: dict[str, list[float]], count: int
) -> dict[str, Any]:
    """Per operation, its steps in the order they start: p50, p90, calls and ms per request."""
    operations: dict[str, list[dict[str, Any]]] = {}
    for op in OPERATIONS:
        rows = [_row(CLIENT, 0, client_ms[op], count)]
        manager: list[float] = next(
            (s["samples"] for s in report["steps"] if s["operation"] == op and s["depth"] == 0),
            [],
        )
        if len(manager) == len(client_ms[op]):  # one each, in the same order
            http = [c - m for c, m in zip(client_ms[op], manager, strict=True)]
            rows.append(_row(HTTP, 1, http, count))
        rows += [
            _row(s["step"], s["depth"] + 1, s["samples"], count)
            for s in report["steps"]
            if s["operation"] == op and s["samples"]
        ]
        operations[op] = rows
    outside = [s["step"] for s in report["steps"] if s["operation"] not in OPERATIONS]
    return {"count": count, "missing": report["missing"], "operations": operations} | (
        {"outside_requests": sorted(set(outside))} if outside else {}
    )


def _row(step: str, depth: int, samples: list[float], count: int) -> dict[str, Any]:
    return {
        "step": step,
        "depth": depth,
        "n": len(samples),
        "calls_per_request": round(len(samples) / count, 2),
        "p50_ms": round(percentile(samples, 50), 3),
        "p90_ms": round(percentile(samples, 90), 3),
        "ms_per_request": round(sum(samples) / count, 3),
    }


def render(result: dict[str, Any]) -> str:
    lines = []
    for op, rows in result["operations"].items():
        table = [
            [
                "  " * row["depth"] + row["step"],
                *(row[k] for k in ("p50_ms", "p90_ms", "calls_per_request", "ms_per_request")),
            ]
            for row in rows
        ]
        headers = [f"{op} ({result['count']} requests): step", "p50 ms", "p90 ms"]
        lines += [format_table([*headers, "calls/request", "ms/request"], table), ""]
    lines.append(
        "p50 and p90 are per call; a step called more than once a request shows its calls and "
        "its total per request. Indented: within the step above."
    )
    if result["missing"]:
        lines.append(f"not in daemon/ (any more), not timed: {', '.join(result['missing'])}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["daemon"]:
        if len(argv) < 3:
            raise SystemExit("usage: python3 -m tests.perf.steps daemon OUT serve …")
        return serve(argv[1], argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=50, help="requests of each kind [50]")
    parser.add_argument("--warmup", type=int, default=5, help="untimed lifecycles first [5]")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args(argv)

    def say(message: str) -> None:
        print(f"steps: {message}", file=sys.stderr, flush=True)

    with contextlib.suppress(BrokenPipeError):
        result = drive(args.count, args.warmup, say)
        sys.stdout.write(json.dumps(result, indent=1) + "\n" if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
