"""The store's hot methods timed one call at a time on a fresh SQLite file: p50 and p90 per
method, in milliseconds, without the daemon around it.

    python3 tests/perf/store_calls.py [ROUNDS] [--json OUT.json]

Runs in: this process, unprivileged; the database lives in a temporary directory that is
removed at the end. Each round is one sandbox's life as the service drives it (create,
transition to running, set base_dir, get by id and by name, an exec recorded and finished,
read back, transition to exited, then to destroying, delete), then a pooled sandbox's (created
pooled, taken by a create), beside a few bystander sandboxes that keep their rows, so the
lookups do not run on an empty table.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Network
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from daemon.lifecycle.states import LifecycleState  # noqa: E402
from daemon.store.database import Store  # noqa: E402

T = TypeVar("T")
SUBNET = IPv4Network("10.88.0.0/16")
BYSTANDERS = 20
SPEC: dict[str, Any] = {  # about the size of a SandboxCreate dumped as JSON
    "name": None,
    "cmd": ["sleep", "infinity"],
    "env": {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
    "namespaces": ["mount", "uts", "ipc", "pid", "net", "user", "cgroup"],
    "rootfs": {"image": "/var/lib/sandboxd/images/base", "readonly": False},
    "mounts": [],
    "network": {"mode": "bridge", "ports": []},
    "limits": {"memory_bytes": 268435456, "cpus": 1.0, "pids": 256},
    "labels": {"team": "ci"},
    "ttl_seconds": None,
}


def timed(times: dict[str, list[float]], label: str, call: Callable[[], T]) -> T:
    start = time.perf_counter_ns()
    result = call()
    times[label].append((time.perf_counter_ns() - start) / 1e6)
    return result


def run(rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = defaultdict(list)
    now = datetime.now(UTC)
    with tempfile.TemporaryDirectory(prefix="sandboxd-store-bench-") as tmp:
        store = Store(Path(tmp) / "sandboxd.db")
        try:
            for i in range(BYSTANDERS):
                store.create_sandbox(
                    id=f"sb_by{i}", name=f"by-{i}", hostname="h", spec=SPEC, max_live=1000,
                    now=now, expires_at=None, subnet=SUBNET,
                )  # fmt: skip
                store.transition(f"sb_by{i}", LifecycleState.RUNNING, pid=100 + i, started_at=now)
                store.insert_exec(id=f"ex_by{i}", sandbox_id=f"sb_by{i}", cmd=["true"], now=now)
            for i in range(rounds):
                one_life(store, times, i, now)
        finally:
            store.close()
    return times


def one_life(store: Store, times: dict[str, list[float]], i: int, now: datetime) -> None:
    sid, name, eid = f"sb_{i:06d}", f"web-{i}", f"ex_{i:06d}"
    timed(times, "create_sandbox", lambda: store.create_sandbox(
        id=sid, name=name, hostname=name, spec=SPEC, max_live=1000, now=now,
        expires_at=now + timedelta(hours=1), subnet=SUBNET,
    ))  # fmt: skip
    timed(times, "transition", lambda: store.transition(
        sid, LifecycleState.RUNNING, pid=4242, pid_start=99, started_at=now
    ))  # fmt: skip
    timed(times, "update_sandbox", lambda: store.update_sandbox(sid, base_dir="/run/x"))
    timed(times, "get_sandbox", lambda: store.get_sandbox(sid))
    timed(times, "get_sandbox(name)", lambda: store.get_sandbox(name))
    timed(times, "insert_exec", lambda: store.insert_exec(
        id=eid, sandbox_id=sid, cmd=["sh", "-c", "echo hi"], now=now
    ))  # fmt: skip
    timed(times, "set_exec_pid", lambda: store.set_exec_pid(eid, 4343))
    timed(times, "finish_exec", lambda: store.finish_exec(
        eid, exit_code=0, signal=None, timed_out=False, stdout=b"hi\n" * 20, stderr=b"",
        stdout_truncated=False, stderr_truncated=False, finished_at=now, oom_killed=False,
        pid=4343,
    ))  # fmt: skip
    timed(times, "get_exec", lambda: store.get_exec(sid, eid))
    timed(times, "transition(exit)", lambda: store.transition(
        sid, LifecycleState.EXITED, pid=None, uid_slot=None, ip=None, finished_at=now, exit_code=0
    ))  # fmt: skip
    timed(times, "transition(destroying)", lambda: store.transition(sid, LifecycleState.DESTROYING))
    timed(times, "remove_sandbox", lambda: store.remove_sandbox(sid))  # DELETE answers
    timed(times, "delete_sandbox", lambda: store.delete_sandbox(sid))
    pooled = f"sb_p{i:06d}"
    timed(times, "create_sandbox(pool)", lambda: store.create_sandbox(
        id=pooled, name=None, hostname=pooled, spec=SPEC, max_live=1000, now=now,
        expires_at=None, subnet=SUBNET, pooled=True,
    ))  # fmt: skip
    store.transition(pooled, LifecycleState.POOLED, pid=4444, pid_start=99, started_at=now)
    timed(times, "take_pooled", lambda: store.take_pooled(
        pooled, name=name, hostname=name, spec=SPEC, max_live=1000, now=now, expires_at=None
    ))  # fmt: skip
    store.transition(pooled, LifecycleState.DESTROYING)
    store.remove_sandbox(pooled)
    store.delete_sandbox(pooled)


def main(argv: list[str]) -> None:
    out = None
    if "--json" in argv:
        at = argv.index("--json")
        out = Path(argv[at + 1])
        del argv[at : at + 2]
    rounds = int(argv[0]) if argv else 500
    times = run(rounds)
    rows = {
        label: {
            "p50": statistics.median(values),
            "p90": statistics.quantiles(values, n=10)[-1],
            "n": len(values),
        }
        for label, values in times.items()
    }
    print(f"{'method':<24} {'p50 ms':>8} {'p90 ms':>8} {'n':>6}")
    for label, row in rows.items():
        print(f"{label:<24} {row['p50']:>8.3f} {row['p90']:>8.3f} {row['n']:>6}")
    if out is not None:
        out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
