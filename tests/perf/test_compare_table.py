"""compare.py's table: each figure of ours beside each peer's, with how many times we lead."""

from __future__ import annotations

from typing import Any

from tests.perf.compare import TARGETS, comparison, render_comparison, target_rows


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


def full_report(**figures: float) -> dict[str, Any]:
    """A report with a figure for every target's row: `figures` overrides the defaults."""
    f = {
        "create": 4.0, "create_pool": 1.5, "exec": 1.8, "destroy": 3.0, "destroy_p99": 16.0,
        "lifecycle": 11.0, "execs": 900.0, "pss_total": 0.9, "service": 41.0,
    } | figures  # fmt: skip
    base = report(create=f["create"], execs=f["execs"], pss=0.1)
    base["latency"] += [
        {"name": "create_pool", "p50_ms": f["create_pool"], "p99_ms": f["create_pool"]},
        {"name": "exec", "p50_ms": f["exec"], "p99_ms": f["exec"]},
        {"name": "destroy", "p50_ms": f["destroy"], "p99_ms": f["destroy_p99"]},
        {"name": "lifecycle", "p50_ms": f["lifecycle"], "p99_ms": f["lifecycle"]},
    ]
    base["throughput"].append({"concurrency": 16, "per_second": f["execs"], "errors": 0})
    base["memory"].append(
        {
            "sandboxes": 50,
            "pss_mib_per_sandbox": 0.1,
            "pss_total_mib_per_sandbox": f["pss_total"],
            "service_pss_mib": 30.0,
            "service_pss_alive_mib": f["service"],
        }
    )
    return base


def test_memory_rows_count_the_service_share_and_the_service_with_50_alive() -> None:
    ours = full_report(pss_total=0.9, service=41.0)
    crun = full_report(pss_total=0.09, service=0.0)
    rows = {row[0]: row[1:] for row in comparison(ours, {"crun": crun})}
    assert rows["MiB of PSS, with the service's share, per idle sandbox, 50 alive"] == [
        0.9, 0.09, "0.10x"
    ]  # fmt: skip
    assert rows["service PSS MiB, 50 alive"] == [41.0, 0.0, None]  # with them alive
    assert rows["service PSS MiB, before the 50 were made"] == [30.0, 30.0, "1.00x"]
    # A report from before the alive figure: the one measured before stands in.
    assert rows["service PSS MiB, 100 alive"] == [80.0, 80.0, "1.00x"]


def test_each_target_says_whether_it_is_met() -> None:
    ours = full_report(destroy_p99=16.0, service=41.0)  # two just missed, the rest just met
    crun = full_report(create=8.0, execs=400.0)
    rows = {row[0]: row[1:] for row in target_rows(ours, {"crun": crun})}
    assert list(rows) == [t[0] for t in TARGETS] and len(rows) == 9
    met = {label: row[2] for label, row in rows.items()}
    assert [label for label, m in met.items() if m == "no"] == [
        "destroy p99, ms",
        "service MiB (daemon + zygotes PSS), 50 alive",
    ]
    assert all(m == "yes" for label, m in met.items() if label not in {
        "destroy p99, ms", "service MiB (daemon + zygotes PSS), 50 alive"})  # fmt: skip
    assert rows["create (fresh) p50, ms"] == ["<= 5", 4.0, "yes", 8.0, "2.00x"]
    # No pool for a peer: its plain create stands beside our pooled one.
    assert rows["create from the warm pool p50, ms"] == ["<= 2", 1.5, "yes", 8.0, "5.33x"]
    assert rows["execs/s with 16 clients"] == [">= 800", 900.0, "yes", 400.0, "2.25x"]
    assert rows["MiB per idle sandbox, PSS with the service's share, 50 alive"][:3] == [
        "<= 1", 0.9, "yes"
    ]  # fmt: skip


def test_a_target_without_its_figure_is_not_measured() -> None:
    ours = report(create=6.0, execs=800.0, pss=1.0)  # no pool, no 16 clients, 100 alive only
    rows = {row[0]: row[1:] for row in target_rows(ours, {})}
    assert rows["create (fresh) p50, ms"] == ["<= 5", 6.0, "no"]
    assert rows["create from the warm pool p50, ms"] == ["<= 2", None, "not measured"]
    assert rows["execs/s with 16 clients"][2] == "not measured"
    text = render_comparison({"sandboxd": ours, "peers": {"crun": {"skipped": "absent"}}})
    assert "targets met: 0 of 9; not measured: create from the warm pool p50, ms" in text
    block = text[text.index("target  ") :]
    assert block.splitlines()[0].split() == ["target", "aim", "sandboxd", "met", "crun", "x"]
