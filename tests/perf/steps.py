"""`sandboxd serve` with a timer around each step of create, exec and destroy: where a
request's time goes, on the daemon's side, without changing the daemon.

    python3 tests/perf/steps.py OUT.json serve --config C --listen unix:///tmp/s.sock ...
    python3 -m tests.perf.bench --url unix:///tmp/s.sock --idle ''        (or any other load)
    kill -USR1 PID     writes OUT.N.json (the steps so far) and starts counting afresh
    kill -TERM PID     stops the daemon and writes OUT.json

Runs in: the daemon's process (this script becomes it), as root. It wraps methods of the
service, the zygote link and the store by name: a step renamed in daemon/ drops out of the
table (the script says which) rather than failing. Exec's time on the supervisor's side is
the time from sending EXEC to STARTED and to EXITED. The supervisor itself cannot be timed
from here (nor read by py-spy: its root is the sandbox's); strace -f -ttt on it works.
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import signal
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from api.cli import main  # noqa: E402
from daemon import cgroups, parent, service, store  # noqa: E402
from daemon.protocol import MessageType  # noqa: E402

STEPS: dict[str, list[float]] = defaultdict(list)
MISSING: list[str] = []


def _now() -> float:
    return time.perf_counter_ns() / 1e6


def timed(owner: Any, name: str, label: str) -> None:
    """Wrap owner.name (a function or coroutine function) to add its durations to STEPS[label]."""
    original = getattr(owner, name, None)
    if original is None:
        MISSING.append(f"{getattr(owner, '__name__', owner)}.{name}")
        return
    if getattr(original, "__code__", None) and original.__code__.co_flags & 0x80:  # async def

        @functools.wraps(original)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            start = _now()
            try:
                return await original(*args, **kwargs)
            finally:
                STEPS[label].append(_now() - start)

        setattr(owner, name, async_wrapper)
        return

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = _now()
        try:
            return original(*args, **kwargs)
        finally:
            STEPS[label].append(_now() - start)

    setattr(owner, name, wrapper)


def instrument() -> None:
    manager = service.SandboxManager
    for name in ("create", "exec", "destroy", "_connect", "_kill", "_remove_files"):
        timed(manager, name, f"service.{name}")
    for name in ("_prepare_files", "_collect", "_check_host_paths"):
        timed(manager, name, f"service.{name}")
    timed(parent.Zygote, "spawn", "zygote round trip (fork A, namespaces, fork B)")
    for name in ("create_sandbox", "transition", "update_sandbox", "get_sandbox"):
        timed(store.Store, name, f"store.{name}")
    for name in ("insert_exec", "set_exec_pid", "finish_exec", "get_exec", "delete_sandbox"):
        timed(store.Store, name, f"store.{name}")
    timed(cgroups.ProcessTree, "create", "cgroup mkdir")
    timed(cgroups.ProcessTree, "remove", "cgroup rmdir")
    timed(service, "wait_readable", "wait for PID 1 to die (pidfd)")
    timed(service, "write_identity_files", "identity files")
    timed(service, "sandbox_view", "sandbox view")
    timed(service, "exec_view", "exec view")

    sent: dict[str, float] = {}
    send = parent.SupervisorLink.send

    def timed_send(self: parent.SupervisorLink, kind: MessageType, **fields: Any) -> None:
        if kind is MessageType.EXEC:
            sent[str(fields["id"])] = _now()
        send(self, kind, **fields)

    on_message = manager._on_message

    def timed_on_message(
        self: service.SandboxManager,
        live: service.LiveSandbox,
        kind: MessageType,
        message: dict[str, Any],
    ) -> None:
        exec_id, start = str(message.get("id")), _now()
        if kind is MessageType.STARTED and exec_id in sent:
            STEPS["supervisor: EXEC sent → STARTED"].append(start - sent[exec_id])
        if kind is MessageType.EXITED and exec_id in sent:
            STEPS["supervisor: EXEC sent → EXITED"].append(start - sent.pop(exec_id))
        on_message(self, live, kind, message)
        STEPS[f"daemon handles {kind.value}"].append(_now() - start)

    parent.SupervisorLink.send = timed_send  # type: ignore[method-assign]
    manager._on_message = timed_on_message  # type: ignore[method-assign]


def table() -> dict[str, dict[str, float]]:
    return {
        label: {
            "n": len(values),
            "p50_ms": round(statistics.median(values), 3),
            "mean_ms": round(statistics.mean(values), 3),
            "max_ms": round(max(values), 3),
        }
        for label, values in sorted(STEPS.items())
    }


def run(out: Path, argv: list[str]) -> int:
    instrument()
    if MISSING:
        print(
            f"steps.py: not in daemon/ any more, not timed: {', '.join(MISSING)}", file=sys.stderr
        )
    counter = itertools.count()

    def write(path: Path) -> None:
        path.write_text(json.dumps(table(), indent=1) + "\n")

    def on_usr1(_signum: int, _frame: object) -> None:
        write(out.with_suffix(f".{next(counter)}.json"))
        STEPS.clear()

    signal.signal(signal.SIGUSR1, on_usr1)
    atexit.register(write, out)
    return main(argv)


if __name__ == "__main__":
    sys.exit(run(Path(sys.argv[1]), sys.argv[2:]))
