"""Timing loops and their summaries: percentiles of latencies, operations per second, tables.

Runs in: the bench's process (or compare.py's), as whatever user runs it. The loops time a
callable that does one operation and raises if it went wrong; they know nothing of HTTP.
"""

from __future__ import annotations

import math
import resource
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

Operation = Callable[[], object]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of `values`, interpolating between the closest ranks."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Latency:
    """One row of latencies in milliseconds; `skipped` says why a row has none."""

    name: str
    label: str
    samples: list[float] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {"name": self.name, "label": self.label, "n": len(self.samples)}
        if self.skipped is not None or not self.samples:
            return row | {"skipped": self.skipped or "no samples"}
        return row | {
            "p50_ms": round(percentile(self.samples, 50), 3),
            "p90_ms": round(percentile(self.samples, 90), 3),
            "p99_ms": round(percentile(self.samples, 99), 3),
            "mean_ms": round(sum(self.samples) / len(self.samples), 3),
            "min_ms": round(min(self.samples), 3),
            "max_ms": round(max(self.samples), 3),
        }


def timed(operation: Operation) -> float:
    """Milliseconds that one call of `operation` took."""
    start = time.perf_counter_ns()
    operation()
    return (time.perf_counter_ns() - start) / 1e6


def measure(
    name: str,
    label: str,
    operation: Operation,
    count: int,
    warmup: int = 0,
    pause: float = 0.0,
    before: Operation | None = None,
) -> Latency:
    """`warmup` untimed calls, then `count` timed ones, one after another, each after `pause`
    seconds of quiet and `before` (both untimed): some costs show only when calls are spaced
    like real ones, or when the daemon is ready for them."""
    for _ in range(warmup):
        operation()
    samples = []
    for _ in range(count):
        time.sleep(pause)
        if before is not None:
            before()
        samples.append(timed(operation))
    return Latency(name, label, samples)


@dataclass
class Throughput:
    """Operations completed by `concurrency` workers in `seconds`, each on its own."""

    concurrency: int
    operations: int
    seconds: float
    latencies: list[float]
    errors: list[str]
    client_cpu: float  # the measuring process's CPU seconds per second of the run

    def summary(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "concurrency": self.concurrency,
            "operations": self.operations,
            "seconds": round(self.seconds, 3),
            "per_second": round(self.operations / self.seconds, 1) if self.seconds else 0.0,
            "errors": len(self.errors),
            "client_cpu": round(self.client_cpu, 2),
        }
        if self.errors:
            row["first_error"] = self.errors[0]
        if self.latencies:
            row["p50_ms"] = round(percentile(self.latencies, 50), 3)
            row["p99_ms"] = round(percentile(self.latencies, 99), 3)
        return row


def run_concurrently(workers: Sequence[Operation], seconds: float) -> Throughput:
    """Each worker (a thread) calls its operation over and over until `seconds` have passed.

    Every worker holds its own resources (an HTTP connection, a sandbox), so that they
    contend only where the system under test makes them. All start together at a barrier.
    An operation that raises counts as an error, not a completion, and its worker goes on.
    """
    barrier = threading.Barrier(len(workers) + 1)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []
    deadline = 0.0

    def loop(operation: Operation) -> None:
        mine: list[float] = []
        failed: list[str] = []
        barrier.wait()
        while time.perf_counter() < deadline:
            try:
                mine.append(timed(operation))
            except Exception as exc:
                failed.append(f"{type(exc).__name__}: {exc}")
        with lock:
            latencies.extend(mine)
            errors.extend(failed)

    threads = [threading.Thread(target=loop, args=(w,), daemon=True) for w in workers]
    for thread in threads:
        thread.start()
    cpu_before = _cpu_seconds()
    start = time.perf_counter()
    deadline = start + seconds
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - start
    cpu = (_cpu_seconds() - cpu_before) / elapsed
    return Throughput(len(workers), len(latencies), elapsed, latencies, errors, cpu)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table: the first column left-aligned, the others right-aligned."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        parts = [v.ljust(widths[0]) if i == 0 else v.rjust(widths[i]) for i, v in enumerate(values)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line([str(h) for h in headers]), rule, *(line(r) for r in cells)])


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return str(value)
