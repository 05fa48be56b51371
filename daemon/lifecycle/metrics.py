"""The daemon's Prometheus metrics: counters and histograms the lifecycle moves, and the gauges
of sandboxes read at scrape time.

Runs in: the daemon, on its event loop (a scrape reads the store and a few cgroup files).

A registry of the daemon's own (not prometheus_client's global one), so that two services in
one process (the tests) never share series. Label values come from a fixed set (states,
outcomes, event types) except a running sandbox's `id` and `name`, which exist once per live
sandbox and go with it: nothing a client sends can grow the series without bound.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from daemon.errors import SandboxError
from daemon.lifecycle.events import Event, EventHub, EventType
from daemon.lifecycle.states import SandboxState
from daemon.linux.limits import Usage

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Creating takes milliseconds (tens with a network), an exec from a millisecond to minutes.
CREATE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
EXEC_BUCKETS = (
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
CREATE_OUTCOMES = ("created", "pooled", "rejected", "failed")
EXEC_OUTCOMES = ("ok", "error", "signaled", "timed_out", "oom")


@dataclass(frozen=True)
class Sources:
    """Where the scrape-time gauges read from (the service's store, pool and cgroups)."""

    states: Callable[[], dict[SandboxState, int]]
    pool_ready: Callable[[], int]
    running: Callable[[], list[tuple[str, str]]]  # (id, name or "")
    usage: Callable[[str], Usage]


class Metrics:
    def __init__(self, sources: Sources, hub: EventHub) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.creates = Counter(
            "sandboxd_sandbox_creates",
            "Creates answered, by outcome: created, pooled (taken from the warm pool), "
            "rejected (bad input, a name in use, at the limit), failed (setup failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.create_seconds = Histogram(
            "sandboxd_create_seconds",
            "How long a create that made a sandbox took, pooled ones too.",
            buckets=CREATE_BUCKETS,
            registry=self.registry,
        )
        self.execs = Counter(
            "sandboxd_execs",
            "Execs ended, by outcome: ok (exit 0), error (another exit code), signaled, "
            "timed_out, oom.",
            ["outcome"],
            registry=self.registry,
        )
        self.exec_seconds = Histogram(
            "sandboxd_exec_seconds",
            "How long an exec ran, from its record to its end.",
            buckets=EXEC_BUCKETS,
            registry=self.registry,
        )
        self.events = Counter(
            "sandboxd_events", "Events recorded, by type.", ["type"], registry=self.registry
        )
        for outcome in CREATE_OUTCOMES:  # every series from the start, at 0
            self.creates.labels(outcome)
        for outcome in EXEC_OUTCOMES:
            self.execs.labels(outcome)
        for kind in EventType:
            self.events.labels(str(kind))
        self.registry.register(_Gauges(sources, hub))
        ProcessCollector(registry=self.registry)
        hub.listeners.append(self.on_event)

    @contextlib.contextmanager
    def creating(self) -> Iterator[list[str]]:
        """Time and count one create; the caller puts "pooled" in the list for a take."""
        said: list[str] = []
        started = time.perf_counter()
        try:
            yield said
        except SandboxError as exc:
            self.creates.labels("rejected" if exc.status < 500 else "failed").inc()
            raise
        except BaseException:
            self.creates.labels("failed").inc()
            raise
        self.create_seconds.observe(time.perf_counter() - started)
        self.creates.labels(said[0] if said else "created").inc()

    def on_event(self, event: Event) -> None:
        self.events.labels(str(event.type)).inc()
        if event.type != EventType.EXEC_EXITED:
            return
        data = event.data
        if data.get("timed_out"):
            outcome = "timed_out"
        elif data.get("oom_killed"):
            outcome = "oom"
        elif data.get("signal"):
            outcome = "signaled"
        else:
            outcome = "ok" if data.get("exit_code") == 0 else "error"
        self.execs.labels(outcome).inc()
        if isinstance(seconds := data.get("duration_seconds"), int | float):
            self.exec_seconds.observe(max(0.0, seconds))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _Gauges(Collector):
    """What is read at each scrape: sandboxes by state, the pool, each running sandbox."""

    def __init__(self, sources: Sources, hub: EventHub) -> None:
        self.sources = sources
        self.hub = hub

    def describe(self) -> Iterable[Metric]:
        return []  # the families are built at collect: nothing to check at registration

    def collect(self) -> Iterable[Metric]:
        states = GaugeMetricFamily(
            "sandboxd_sandboxes", "Sandboxes by state (pooled ones aside).", labels=["state"]
        )
        counts = self.sources.states()
        for state in SandboxState:
            states.add_metric([str(state)], counts.get(state, 0))
        yield states
        yield GaugeMetricFamily(
            "sandboxd_pool_ready", "Pooled sandboxes ready to be taken.", self.sources.pool_ready()
        )
        yield GaugeMetricFamily(
            "sandboxd_event_followers", "Clients following /events.", len(self.hub.followers)
        )
        yield CounterMetricFamily(
            "sandboxd_event_followers_dropped",
            "Clients following /events dropped for reading too slowly.",
            self.hub.dropped,
        )
        memory = GaugeMetricFamily(
            "sandboxd_sandbox_memory_bytes",
            "Memory a running sandbox's cgroup uses.",
            labels=["id", "name"],
        )
        cpu = CounterMetricFamily(
            "sandboxd_sandbox_cpu_seconds",
            "CPU time a running sandbox's processes have used.",
            labels=["id", "name"],
        )
        pids = GaugeMetricFamily(
            "sandboxd_sandbox_pids", "Processes in a running sandbox.", labels=["id", "name"]
        )
        for sandbox_id, name in self.sources.running():
            try:
                usage = self.sources.usage(sandbox_id)
            except OSError:  # it ended meanwhile
                continue
            labels = [sandbox_id, name]
            if usage.memory_current is not None:
                memory.add_metric(labels, usage.memory_current)
            if usage.cpu_usec is not None:
                cpu.add_metric(labels, usage.cpu_usec / 1e6)
            if usage.pids_current is not None:
                pids.add_metric(labels, usage.pids_current)
        yield from (memory, cpu, pids)
