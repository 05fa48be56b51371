"""The workloads of the bench, run against a daemon over its HTTP API, and the report.

Runs in: the bench's process, an HTTP client of the daemon (httpx; over a unix socket or TCP).
Every sandbox it makes carries the label `sandboxd-bench=RUN`, and every one of them is
destroyed before it returns, whether the run ends well or not.

What is measured, in this order (latencies over one keep-alive connection, one request at a
time, after a few untimed warm-up rounds):
  pool              with a warm pool (the daemon's pool_size; --pool for a private daemon):
                    create, and the whole lifecycle, each once the pool is full again (untimed)
  create (image)    POST /sandboxes {"image": …} of a busybox image the bench imports first
                    (--image-mb: with a layer of that many MiB more); deleted at
                    the end, as are its sandboxes
  create            POST /sandboxes {} (all namespaces, network none); the sandboxes stay
  create (bridge)   the same with network.mode bridge; skipped when the daemon answers 422
  first exec        POST /sandboxes/ID/exec {"cmd": ["true"]} (wait mode), once into each of them
  exec true         the same, again and again into one of them (warm)
  exec, spaced      the same, 50 ms after the last one (untimed quiet in between)
  exec 1 MiB        the same for a command writing 1 MiB to stdout (all of it kept)
  destroy           DELETE /sandboxes/ID of each, running
  lifecycle         create, exec `true`, destroy, one after another
  throughput        execs of `true` per second by 1, 4, 16 workers, each with its own
                    connection and its own sandbox, for a few seconds each
  idle memory       N idle sandboxes alive: MemAvailable lost, kernel memory, the PSS of the
                    daemon, its zygotes and every supervisor (what the N added, and all of it
                    over N: each one's share of the service too), the service's PSS before
                    and with them alive; /healthz latency meanwhile
  file transfer     PUT then GET /sandboxes/ID/files of N MiB of random bytes (200 by
                    default), MB/s each way (best of a few rounds); the bytes checked
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import httpx

from tests.images_build import build_image, oci_layout_tar
from tests.perf.bench import memory
from tests.perf.bench.daemon import PrivateDaemon
from tests.perf.bench.stats import (
    Latency,
    Throughput,
    format_table,
    measure,
    percentile,
    run_concurrently,
)

LABEL = "sandboxd-bench"
TRUE = ["true"]
OUTPUT_BYTES = 1 << 20
# `yes` never stops: head takes exactly 1 MiB (the default output limit: all of it is kept).
OUTPUT_CMD = ["sh", "-c", f"yes abcdefghijklmnopqrstuvwxyz0123456789 | head -c {OUTPUT_BYTES}"]
# Execs back to back share some kernel costs (a cgroup join is cheap for a few ms after the
# last one): the spaced row shows what a lone exec costs.
SPACED_MS = 50
_HEALTHZ_SAMPLES = 200
_MEMORY_WORKERS = 4
_SETTLE_SECONDS = 1.0
_POOL_TIMEOUT = 30.0


class BenchError(RuntimeError):
    """The daemon answered something a workload did not expect."""


@dataclass
class Options:
    count: int = 200
    warmup: int = 5
    concurrency: list[int] = field(default_factory=lambda: [1, 4, 16])
    duration: float = 5.0
    idle: list[int] = field(default_factory=lambda: [100, 1000])
    pool: int = 0  # a private daemon's pool_size
    pool_only: bool = False  # measure only the rows of the warm pool
    transfer_mib: int = 200  # the file of the transfer row (0: no such row)
    transfer_rounds: int = 3
    image_mb: int = 0  # MiB of random files in the image of the create_image row

    def max_alive(self) -> int:
        """The most sandboxes of this run alive at once (for a private daemon's limit)."""
        return max([self.count, max(self.concurrency, default=0), *self.idle]) + 16


class Api:
    """Connections to the daemon under test: `unix:///path`, `http://HOST:PORT` or `tcp://…`."""

    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url
        parts = urlsplit(url)
        self.socket: str | None = None
        if parts.scheme == "unix":
            self.socket, self.base_url = parts.path, "http://sandboxd"
        elif parts.scheme in ("http", "tcp"):
            self.base_url = f"http://{parts.netloc}"
        else:
            raise ValueError(f"{url!r}: expected unix:///path, http://HOST:PORT or tcp://HOST:PORT")
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    def client(self) -> httpx.Client:
        """A new client: one keep-alive connection, used by one worker at a time."""
        transport = httpx.HTTPTransport(uds=self.socket) if self.socket else httpx.HTTPTransport()
        return httpx.Client(
            transport=transport, base_url=self.base_url, headers=self.headers, timeout=120
        )


class Bench:
    def __init__(self, api: Api, options: Options, progress: TextIO | None = None) -> None:
        self.api = api
        self.options = options
        self.run_id = secrets.token_hex(4)
        self.labels = {LABEL: self.run_id}
        self.progress = progress
        self.client = api.client()

    def say(self, message: str) -> None:
        if self.progress is not None:
            print(f"bench: {message}", file=self.progress, flush=True)

    # -- the API, checked -------------------------------------------------------------------

    def create(self, client: httpx.Client, **body: Any) -> str:
        response = client.post("/sandboxes", json={**body, "labels": self.labels})
        if response.status_code != 201:
            raise BenchError(f"create answered {response.status_code}: {response.text[:300]}")
        return str(response.json()["id"])

    def exec(self, client: httpx.Client, sandbox: str, cmd: list[str]) -> dict[str, Any]:
        response = client.post(f"/sandboxes/{sandbox}/exec", json={"cmd": cmd})
        if response.status_code != 200:
            raise BenchError(f"exec answered {response.status_code}: {response.text[:300]}")
        result: dict[str, Any] = response.json()
        if result["exit_code"] != 0:
            raise BenchError(f"{cmd} ended {result['exit_code']}: {result['stderr'][:300]}")
        return result

    def exec_output(self, client: httpx.Client, sandbox: str) -> None:
        result = self.exec(client, sandbox, OUTPUT_CMD)
        if len(result["stdout"]) != OUTPUT_BYTES or result["stdout_truncated"]:
            raise BenchError(f"expected {OUTPUT_BYTES} bytes, got {len(result['stdout'])}")

    def destroy(self, client: httpx.Client, sandbox: str) -> None:
        response = client.delete(f"/sandboxes/{sandbox}")
        if response.status_code != 204:
            raise BenchError(f"destroy answered {response.status_code}: {response.text[:300]}")

    def lifecycle(self, client: httpx.Client) -> None:
        sandbox = self.create(client)
        self.exec(client, sandbox, TRUE)
        self.destroy(client, sandbox)

    def ours(self) -> list[dict[str, Any]]:
        """This run's sandboxes that still exist."""
        response = self.client.get("/sandboxes", params={"label": f"{LABEL}={self.run_id}"})
        response.raise_for_status()
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    def destroy_ours(self) -> None:
        ids = [s["id"] for s in self.ours()]
        if len(ids) > 50:
            self.say(f"destroying {len(ids)} sandboxes")
        self.in_parallel(ids, lambda client, sandbox: self.destroy(client, sandbox))

    def in_parallel(self, items: list[str], work: Callable[[httpx.Client, str], None]) -> None:
        """`work` on every item, by a few workers with a connection each (not timed)."""
        if not items:
            return
        chunks = [items[i::_MEMORY_WORKERS] for i in range(_MEMORY_WORKERS)]

        def worker(chunk: list[str]) -> None:
            with self.api.client() as client:
                for item in chunk:
                    work(client, item)

        with ThreadPoolExecutor(_MEMORY_WORKERS) as pool:
            list(pool.map(worker, chunks))

    # -- latencies ----------------------------------------------------------------------------

    def latencies(self) -> list[Latency]:
        client, count, warmup = self.client, self.options.count, self.options.warmup
        self.say(f"latencies: {count} of each after {warmup} warm-up rounds")
        for _ in range(warmup):
            self.lifecycle(client)
            self.exec_output(client, sandbox := self.create(client))
            self.destroy(client, sandbox)
        rows = self.from_pool()
        if self.options.pool_only:
            return rows
        ids: list[str] = []

        def create() -> None:
            ids.append(self.create(client))

        # Before the create row, whose sandboxes stay alive for the exec rows: a create costs
        # more with more sandboxes alive (a bigger mount table to copy), so the two compare
        # each with the same number alive.
        rows.append(self.from_image())
        rows.append(measure("create", "create (default options)", create, count))
        rows.append(self.bridge())
        fresh = iter(ids)
        rows.append(
            measure(
                "first_exec",
                "first exec `true` in a new sandbox",
                lambda: self.exec(client, next(fresh), TRUE),
                count,
            )
        )
        # The same sandbox again and again, as a client running commands in one would.
        warm = ids[0]
        rows.append(
            measure("exec", "exec `true` (wait)", lambda: self.exec(client, warm, TRUE), count)
        )
        rows.append(
            measure(
                "exec_spaced",
                f"exec `true`, {SPACED_MS} ms after the last",
                lambda: self.exec(client, warm, TRUE),
                count,
                pause=SPACED_MS / 1000,
            )
        )
        rows.append(
            measure(
                "exec_1mib",
                "exec with 1 MiB of output",
                lambda: self.exec_output(client, warm),
                count,
            )
        )
        rows.append(
            measure(
                "destroy",
                "destroy (a running sandbox)",
                lambda: self.destroy(client, ids.pop()),
                count,
            )
        )
        rows.append(
            measure(
                "lifecycle", "create → exec `true` → destroy", lambda: self.lifecycle(client), count
            )
        )
        return rows

    def from_pool(self) -> list[Latency]:
        """Creates that find a pooled sandbox ready: each once the pool is full again."""
        size = self.client.get("/info").json().get("pool", {}).get("size", 0)
        if not size:
            return []
        client, count, ids = self.client, self.options.count, []

        def refilled() -> None:
            deadline = time.monotonic() + _POOL_TIMEOUT
            while self.client.get("/info").json()["pool"]["ready"] < size:
                if time.monotonic() > deadline:
                    raise BenchError(f"the pool did not refill within {_POOL_TIMEOUT:.0f} s")
                time.sleep(0.005)

        rows = [
            measure(
                "create_pool",
                "create from the warm pool",
                lambda: ids.append(self.create(client)),
                count,
                before=refilled,
            ),
            measure(
                "lifecycle_pool",
                "create → exec → destroy, from the pool",
                lambda: self.lifecycle(client),
                count,
                before=refilled,
            ),
        ]
        self.in_parallel(ids, self.destroy)
        return rows

    def bridge(self) -> Latency:
        name, label = "create_bridge", "create with a bridge"
        bridge = {"network": {"mode": "bridge"}}
        response = self.client.post("/sandboxes", json={**bridge, "labels": self.labels})
        if response.status_code == 422:
            detail = response.json().get("detail", response.text)
            return Latency(
                name, label, skipped=f"the daemon answers 422 for network.mode bridge: {detail}"
            )
        if response.status_code != 201:
            raise BenchError(
                f"create with a bridge answered {response.status_code}: {response.text[:300]}"
            )
        self.destroy(self.client, response.json()["id"])
        ids: list[str] = []
        row = measure(
            name, label, lambda: ids.append(self.create(self.client, **bridge)), self.options.count
        )
        self.in_parallel(ids, self.destroy)
        return row

    def from_image(self) -> Latency:
        """Creates from an imported image (its layers as the overlay's lower layers): the same
        work as a default create but for the layers, whatever the image's size."""
        size = f"{self.options.image_mb} MiB of filler, " if self.options.image_mb else ""
        name, label = "create_image", f"create from an image ({size}busybox)"
        reference = f"sandboxd-bench/{self.run_id}:1"
        with tempfile.TemporaryDirectory() as work:
            archive = Path(work) / "image.tar"
            image = build_image(f"bench-{self.run_id}", filler_mb=self.options.image_mb)
            oci_layout_tar(archive, {"linux/amd64": image})
            del image
            with archive.open("rb") as body:
                response = self.client.post(
                    "/images/import", params={"reference": reference}, content=body
                )
        if response.status_code != 201:
            return Latency(name, label, skipped=f"import answered {response.status_code}")
        ids: list[str] = []
        try:
            row = measure(
                name,
                label,
                lambda: ids.append(self.create(self.client, image=reference)),
                self.options.count,
                warmup=self.options.warmup,
            )
        finally:
            self.in_parallel(ids, self.destroy)
            self.client.delete(f"/images/{reference}")
        return row

    # -- throughput ---------------------------------------------------------------------------

    def throughput(self) -> list[Throughput]:
        levels = self.options.concurrency
        if not levels:
            return []
        workers = max(levels)
        self.say(f"throughput: exec `true` at concurrency {levels}, {self.options.duration} s each")
        clients = [self.api.client() for _ in range(workers)]
        try:
            boxes = [self.create(client) for client in clients]
            results = []
            for level in levels:
                operations = [_bind(self.exec, clients[i], boxes[i], TRUE) for i in range(level)]
                for operation in operations:  # each connection open, each sandbox warm
                    operation()
                results.append(run_concurrently(operations, self.options.duration))
            for client, box in zip(clients, boxes, strict=True):
                self.destroy(client, box)
            return results
        finally:
            for client in clients:
                client.close()

    # -- idle memory --------------------------------------------------------------------------

    def idle_memory(self, count: int) -> dict[str, Any]:
        """`count` idle sandboxes alive at once: what they cost, and how /healthz answers."""
        self.say(f"memory: {count} idle sandboxes")
        row: dict[str, Any] = {"sandboxes": count}
        daemon_pid = int(self.client.get("/info").json()["pid"])
        local = memory.is_local(daemon_pid)
        time.sleep(_SETTLE_SECONDS)
        available_before = memory.mem_available_kib()
        kernel_before = memory.kernel_kib()
        service_before = memory.pss_kib([daemon_pid, *memory.descendants(daemon_pid)])[0]
        daemon_before = memory.pss_kib([daemon_pid])[0]
        ids: list[str] = []
        started = time.perf_counter()
        try:
            self.in_parallel(
                [str(i) for i in range(count)], lambda c, _: ids.append(self.create(c))
            )
        except BenchError as exc:
            self.destroy_ours()
            return row | {"skipped": f"after {len(ids)} sandboxes: {exc}"}
        row["create_seconds"] = round(time.perf_counter() - started, 2)
        time.sleep(_SETTLE_SECONDS)
        available_after = memory.mem_available_kib()
        kernel_after = memory.kernel_kib()
        supervisors = [int(s["pid"]) for s in self.ours() if s["pid"] is not None]
        # Each process once: the service (daemon, zygotes) and the sandboxes' own, apart.
        sandboxes = {p for pid in supervisors for p in (pid, *memory.descendants(pid))}
        service = {daemon_pid, *memory.descendants(daemon_pid)} - sandboxes
        pss_after, readable = memory.pss_kib(service | sandboxes)
        service_alive = memory.pss_kib(service)[0]
        daemon_after = memory.pss_kib([daemon_pid])[0]
        healthz = measure("healthz", "/healthz", self._healthz, _HEALTHZ_SAMPLES).samples
        row |= {
            "supervisors": len(supervisors),
            "mem_available_mib_per_sandbox": _mib((available_before - available_after) / count),
            "kernel_mib_per_sandbox": _mib((kernel_after - kernel_before) / count),
            "pss_mib_per_sandbox": _mib((pss_after - service_before) / count) if local else None,
            # The whole cost of each: the service's PSS too, shared among the N alive.
            "pss_total_mib_per_sandbox": _mib(pss_after / count) if local else None,
            "service_pss_mib": _mib(service_before) if local else None,  # before they were made
            "service_pss_alive_mib": _mib(service_alive) if local else None,
            # The daemon alone (the rest are its zygotes), before the sandboxes and with them
            # alive: what each costs the daemon's own memory.
            "daemon_pss_mib": _mib(daemon_before) if local else None,
            "daemon_pss_mib_after": _mib(daemon_after) if local else None,
            "processes_counted": readable,
            "healthz_p50_ms": round(percentile(healthz, 50), 3),
            "healthz_p99_ms": round(percentile(healthz, 99), 3),
        }
        self.in_parallel(ids, self.destroy)
        return row

    def _healthz(self) -> None:
        self.client.get("/healthz").raise_for_status()

    # -- file transfer ------------------------------------------------------------------------

    def transfer(self) -> dict[str, Any] | None:
        """A file of random bytes up and down through the files API: MB/s each way."""
        size = self.options.transfer_mib * (1 << 20)
        if not size:
            return None
        self.say(f"file transfer: {self.options.transfer_mib} MiB each way")
        data = os.urandom(size)
        digest = hashlib.sha256(data).hexdigest()
        box = self.create(self.client, limits={"disk_bytes": 2 * size + (64 << 20)})
        url = f"/sandboxes/{box}/files"
        params = {"path": "/srv/bench.bin"}
        up: list[float] = []
        down: list[float] = []
        for _ in range(self.options.transfer_rounds):
            started = time.perf_counter()
            # In pieces: httpx sends one bytes body by slicing it again and again (quadratic).
            pieces = (data[i : i + (1 << 20)] for i in range(0, size, 1 << 20))
            length = {"Content-Length": str(size)}
            response = self.client.put(url, params=params, content=pieces, headers=length)
            up.append(time.perf_counter() - started)
            if response.status_code not in (200, 201):
                raise BenchError(f"upload answered {response.status_code}: {response.text[:300]}")
            got = hashlib.sha256()
            started = time.perf_counter()
            with self.client.stream("GET", url, params=params) as download:
                for chunk in download.iter_raw():
                    got.update(chunk)
            down.append(time.perf_counter() - started)
            if download.status_code != 200 or got.hexdigest() != digest:
                raise BenchError(f"download answered {download.status_code} or other bytes")
        self.destroy(self.client, box)
        return {
            "mib": self.options.transfer_mib,
            "rounds": len(up),
            "upload_mb_s": round(size / min(up) / 1e6, 1),
            "download_mb_s": round(size / min(down) / 1e6, 1),
            "upload_mb_s_median": round(size / sorted(up)[len(up) // 2] / 1e6, 1),
            "download_mb_s_median": round(size / sorted(down)[len(down) // 2] / 1e6, 1),
        }

    # -- all of it ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        load_before = os.getloadavg()
        try:
            latencies = [row.summary() for row in self.latencies()]
            throughput = [row.summary() for row in self.throughput()]
            idle = [self.idle_memory(count) for count in self.options.idle]
            transfer = self.transfer()
        finally:
            self.destroy_ours()
        info = self.client.get("/info").json()
        return {
            "meta": meta(self.api.url, info, self.options, load_before),
            "latency": latencies,
            "throughput": throughput,
            "memory": idle,
            "transfer": transfer,
        }

    def close(self) -> None:
        self.client.close()


def _bind(
    function: Callable[[httpx.Client, str, list[str]], object],
    client: httpx.Client,
    sandbox: str,
    cmd: list[str],
) -> Callable[[], object]:
    return lambda: function(client, sandbox, cmd)


def _mib(kib: float) -> float:
    return round(kib / memory.KIB_PER_MIB, 3)


def meta(
    url: str, info: dict[str, Any], options: Options, load_before: tuple[float, ...]
) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "memory_gib": round(memory.meminfo()["MemTotal"] / (1 << 20), 1),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "daemon": {"url": url, "version": info.get("version"), "pid": info.get("pid")},
        "options": {
            "count": options.count,
            "warmup": options.warmup,
            "concurrency": options.concurrency,
            "duration": options.duration,
            "idle": options.idle,
            "pool": options.pool,
            "transfer_mib": options.transfer_mib,
        },
    }


@contextmanager
def daemon_under_test(
    url: str | None, token: str | None, options: Options
) -> Iterator[tuple[Api, PrivateDaemon | None]]:
    """The daemon at `url`, or a private one that is removed, with all it made, at the end."""
    if url is not None:
        yield Api(url, token), None
        return
    daemon = PrivateDaemon(max(1000, options.max_alive()), pool=options.pool)
    try:
        daemon.start()
        yield Api(daemon.url), daemon
    finally:
        left = daemon.remove()
        if left:
            raise BenchError(
                f"the private daemon left behind (kept in {daemon.root}):\n" + "\n".join(left)
            )


def run_bench(
    url: str | None, token: str | None, options: Options, progress: TextIO | None = sys.stderr
) -> dict[str, Any]:
    with daemon_under_test(url, token, options) as (api, private):
        bench = Bench(api, options, progress)
        try:
            report = bench.run()
        finally:
            bench.close()
        if private is not None:
            report["meta"]["daemon"] |= {
                "private": True,
                "root": str(private.root),
                "uid_base": private.uid_base,
                "cgroup_name": private.cgroup_name,
            }
        return report


# -- the report -----------------------------------------------------------------------------


def heading(report: dict[str, Any]) -> list[str]:
    """Where and when the report was made, and on what: the lines above its tables."""
    m = report["meta"]
    return [
        f"sandboxd bench, {m['date']}, {m['host']}: Linux {m['kernel']}, {m['cpus']} CPUs, "
        f"{m['memory_gib']} GiB; load {_load(m['load_before'])} before, "
        f"{_load(m['load_after'])} after",
        f"daemon {m['daemon']['url']} (sandboxd {m['daemon']['version']}); {m['options']['count']} "
        f"samples a row after {m['options']['warmup']} warm-up rounds",
    ]


def render(report: dict[str, Any]) -> str:
    lines = [*heading(report), ""]
    notes = []
    rows = []
    for row in report["latency"]:
        if "skipped" in row:
            notes.append(f"{row['label']}: skipped, {row['skipped']}")
            rows.append([row["label"], None, None, None, None, "skipped"])
        else:
            rows.append(
                [row["label"], row["n"], row["p50_ms"], row["p90_ms"], row["p99_ms"], row["max_ms"]]
            )
    lines += [format_table(["latency (ms)", "n", "p50", "p90", "p99", "max"], rows), ""]
    if report["throughput"]:
        rows = [
            [
                t["concurrency"],
                t["operations"],
                t["per_second"],
                t.get("p50_ms"),
                t.get("p99_ms"),
                t["errors"],
                t["client_cpu"],
            ]
            for t in report["throughput"]
        ]
        headers = [
            "exec `true`: concurrency",
            "execs",
            "execs/s",
            "p50 ms",
            "p99 ms",
            "errors",
            "bench CPU",
        ]
        lines += [format_table(headers, rows), ""]
    if report["memory"]:
        rows = []
        for r in report["memory"]:
            if "skipped" in r:
                notes.append(f"{r['sandboxes']} idle sandboxes: skipped, {r['skipped']}")
                continue
            rows.append([
                r["sandboxes"], r["mem_available_mib_per_sandbox"], r["kernel_mib_per_sandbox"],
                r["pss_mib_per_sandbox"], r.get("pss_total_mib_per_sandbox"),
                r["service_pss_mib"], r.get("service_pss_alive_mib"), r.get("daemon_pss_mib"),
                r.get("daemon_pss_mib_after"), r["healthz_p50_ms"], r["healthz_p99_ms"],
                r["create_seconds"],
            ])  # fmt: skip
        headers = [
            "idle sandboxes", "MemAvailable MiB each", "kernel MiB each", "PSS MiB each",
            "with the service's share", "service PSS MiB before", "with them alive",
            "daemon PSS MiB", "… with them", "/healthz p50 ms", "p99 ms", "created in s",
        ]  # fmt: skip
        lines += [format_table(headers, rows), ""]
    if report.get("transfer"):
        t = report["transfer"]
        headers = [f"file transfer, {t['mib']} MiB random", "MB/s best", "MB/s median"]
        rows = [
            ["upload (PUT …/files)", t["upload_mb_s"], t["upload_mb_s_median"]],
            ["download (GET …/files)", t["download_mb_s"], t["download_mb_s_median"]],
        ]
        lines += [format_table(headers, rows), ""]
    lines += notes
    return "\n".join(lines).rstrip() + "\n"


def _load(values: list[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def main(url: str | None, token: str | None, options: Options, as_json: bool) -> int:
    report = run_bench(url, token, options)
    sys.stdout.write(json.dumps(report, indent=2) + "\n" if as_json else render(report))
    return 0
