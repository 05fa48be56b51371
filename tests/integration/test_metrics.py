"""GET /metrics against the real daemon: the families of the contract, that they move, that
the exposition parses, that what a client sends shows only as a running sandbox's `name`, and
who may read it (the token, or none with --metrics-public)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.conftest import Daemon, Daemons

pytestmark = pytest.mark.usefixtures("nothing_carries_over")

TOKEN = "metrics-s3cret"
FAMILIES = {
    "sandboxd_sandboxes": "gauge",
    "sandboxd_sandbox_creates": "counter",
    "sandboxd_create_seconds": "histogram",
    "sandboxd_exec_seconds": "histogram",
    "sandboxd_execs": "counter",
    "sandboxd_pool_ready": "gauge",
    "sandboxd_sandbox_memory_bytes": "gauge",
    "sandboxd_sandbox_cpu_seconds": "counter",
    "sandboxd_sandbox_pids": "gauge",
    "process_resident_memory_bytes": "gauge",
    "process_cpu_seconds": "counter",
}


def scrape(daemon: Daemon) -> dict[str, list[Sample]]:
    response = daemon.client.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {family.name: family.samples for family in families}


def value(samples: list[Sample], sample: str, **labels: str) -> float:
    found = [s.value for s in samples if s.name == sample and labels.items() <= s.labels.items()]
    assert len(found) == 1, (sample, labels, found)
    return found[0]


def test_the_families_are_there_and_move(daemon: Daemon) -> None:
    before = scrape(daemon)
    for family in FAMILIES:
        assert family in before, family
    box = daemon.create(name="metered")
    daemon.exec(box["id"], ["true"])
    daemon.exec(box["id"], ["sh", "-c", "exit 3"])
    daemon.sh(box["id"], "kill -KILL $$")
    conflict = daemon.client.post("/sandboxes", json={"name": "metered"})
    assert conflict.status_code == 409
    after = scrape(daemon)

    def moved(family: str, sample: str, **labels: str) -> float:
        return value(after[family], sample, **labels) - value(before[family], sample, **labels)

    creates = "sandboxd_sandbox_creates"
    assert moved(creates, f"{creates}_total", outcome="created") == 1
    assert moved(creates, f"{creates}_total", outcome="rejected") == 1
    assert moved("sandboxd_create_seconds", "sandboxd_create_seconds_count") == 1
    for outcome in ("ok", "error", "signaled"):
        assert moved("sandboxd_execs", "sandboxd_execs_total", outcome=outcome) == 1
    assert moved("sandboxd_exec_seconds", "sandboxd_exec_seconds_count") == 3
    # Buckets fit milliseconds: the first is a millisecond, and a `true` lands well below 10 s.
    buckets = [s for s in after["sandboxd_exec_seconds"] if s.name.endswith("_bucket")]
    assert float(buckets[0].labels["le"]) == 0.001
    assert value(after["sandboxd_exec_seconds"], "sandboxd_exec_seconds_bucket", le="10.0") >= 3
    assert value(after["sandboxd_sandboxes"], "sandboxd_sandboxes", state="running") >= 1
    # The running sandbox's usage, under its id and name.
    mine = {"id": box["id"], "name": "metered"}
    assert (
        value(after["sandboxd_sandbox_memory_bytes"], "sandboxd_sandbox_memory_bytes", **mine) > 0
    )
    assert value(after["sandboxd_sandbox_pids"], "sandboxd_sandbox_pids", **mine) >= 1
    cpu = "sandboxd_sandbox_cpu_seconds"
    assert value(after[cpu], f"{cpu}_total", **mine) >= 0
    assert value(after["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0
    # Gone with it.
    daemon.client.delete(f"/sandboxes/{box['id']}")
    gone = scrape(daemon)
    assert not [s for s in gone["sandboxd_sandbox_memory_bytes"] if s.labels["id"] == box["id"]]


def test_what_a_client_sends_shows_only_as_a_running_sandboxs_name(daemon: Daemon) -> None:
    marker = "zq-user-input-7"
    box = daemon.create(
        name=f"{marker}-name",
        labels={f"{marker}-key": f"{marker}-value"},
        env={f"{marker.upper().replace('-', '_')}": marker},
    )
    daemon.exec(box["id"], ["echo", marker])
    daemon.client.get(f"/sandboxes/{marker}-missing")
    daemon.client.get(f"/{marker}")
    text = daemon.client.get("/metrics").text
    families = list(text_string_to_metric_families(text))
    label_names = {name for f in families for s in f.samples for name in s.labels}
    assert label_names <= {"state", "outcome", "type", "id", "name", "le"}, label_names
    for family in families:
        for sample in family.samples:
            for label, label_value in sample.labels.items():
                if marker in label_value:
                    assert label == "name" and family.name.startswith("sandboxd_sandbox_")
                    assert label_value == f"{marker}-name"
    assert text.count(marker) == 3  # memory, cpu, pids: one series each
    daemon.client.delete(f"/sandboxes/{box['id']}")
    assert marker not in daemon.client.get("/metrics").text


# -- who may read it ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(daemons: Daemons, daemon: Daemon) -> Daemon:
    """A daemon with a token (after `daemon`, the module's first)."""
    guarded = daemons.new("--token", TOKEN)
    guarded.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return guarded


@pytest.fixture(scope="module")
def public(daemons: Daemons, guarded: Daemon) -> Daemon:
    public = daemons.new("--token", TOKEN, "--metrics-public")
    public.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return public


def anonymous(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(daemon.socket)), base_url="http://localhost"
    ) as client:
        yield client


def test_metrics_need_the_token_unless_public(guarded: Daemon, public: Daemon) -> None:
    assert guarded.client.get("/metrics").status_code == 200
    for stranger in anonymous(guarded):
        assert stranger.get("/metrics").status_code == 401
        assert stranger.get("/events?follow=false").status_code == 401
    for stranger in anonymous(public):
        response = stranger.get("/metrics")
        assert response.status_code == 200
        assert "sandboxd_sandboxes" in response.text
        # Only /metrics is opened: the events and the rest still need the token.
        assert stranger.get("/events?follow=false").status_code == 401
        assert stranger.post("/metrics").status_code in (401, 405)
        assert stranger.get("/info").status_code == 401
    assert public.client.get("/events?follow=false").status_code == 200
