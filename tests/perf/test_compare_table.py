"""compare.py's table: each figure of ours beside each peer's, with how many times we lead."""

from __future__ import annotations

from typing import Any

from tests.perf.compare import comparison, render_comparison


def report(create: float, execs: float, pss: float) -> dict[str, Any]:
    return {
        "meta": {
            "date": "2026-11-29T10:00:00Z", "host": "vm", "kernel": "6.18", "cpus": 2,
            "memory_gib": 23.5, "load_before": [1.0, 1.0, 1.0], "load_after": [1.0, 1.0, 1.0],
            "daemon": {"url": "unix:///x", "version": "0.1.0"},
            "options": {"count": 3, "warmup": 1},
        },
        "latency": [
            {"name": "create", "label": "create", "n": 3, "p50_ms": create, "p99_ms": create * 2},
            {"name": "create_bridge", "label": "create with a bridge", "n": 0, "skipped": "422"},
        ],
        "throughput": [{"concurrency": 4, "per_second": execs, "errors": 0}],
        "memory": [{"sandboxes": 100, "pss_mib_per_sandbox": pss, "service_pss_mib": 80.0}],
    }  # fmt: skip


def test_ratios_say_how_many_times_sandboxd_leads() -> None:
    ours = report(create=5.0, execs=800.0, pss=1.0)
    peers = {"podman": report(create=60.0, execs=20.0, pss=0.5), "bwrap": {"skipped": "absent"}}
    rows = {row[0]: row[1:] for row in comparison(ours, peers)}
    assert rows["create, p50 ms"] == [5.0, 60.0, "12.0x", None, None]
    assert rows["create, p99 ms"] == [10.0, 120.0, "12.0x", None, None]
    assert rows["create with a bridge, p50 ms"] == [None, None, None, None, None]
    assert rows["exec `true` per second, 4 at once"] == [800.0, 20.0, "40.0x", None, None]
    assert rows["MiB of PSS per idle sandbox, 100 alive"] == [1.0, 0.5, "0.50x", None, None]
    assert rows["service PSS MiB, 100 alive"] == [80.0, 80.0, "1.00x", None, None]


def test_the_table_names_each_peer_and_why_one_is_missing() -> None:
    ours = report(create=5.0, execs=800.0, pss=1.0)
    peers = {"podman": report(create=60.0, execs=20.0, pss=0.5) | {"note": "REST API"}}
    peers["crun"] = {"skipped": "crun is not installed (apt-get install crun)"}
    text = render_comparison({"sandboxd": ours, "peers": peers})
    header = next(line for line in text.splitlines() if line.startswith("figure"))
    assert header.split() == ["figure", "sandboxd", "podman", "x", "crun", "x"]
    assert "create, p50 ms" in text and "12.0x" in text
    assert "podman: REST API" in text
    assert "crun: not measured: crun is not installed (apt-get install crun)" in text
