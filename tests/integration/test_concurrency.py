"""Many clients at once: 16 of them create, exec in and destroy 48 sandboxes between them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Daemon


def test_sixteen_clients_forty_eight_sandboxes(daemon: Daemon) -> None:
    def lifecycle(index: int) -> list[int]:
        transport = httpx.HTTPTransport(uds=str(daemon.socket))
        with httpx.Client(transport=transport, base_url="http://localhost", timeout=120) as client:
            created = client.post("/sandboxes", json={"name": f"many-{index}"})
            box = created.json()
            ran = client.post(f"/sandboxes/{box['id']}/exec", json={"cmd": ["hostname"]})
            assert ran.json()["stdout"] == f"many-{index}\n", ran.text
            listed = client.get("/sandboxes")
            deleted = client.delete(f"/sandboxes/{box['id']}")
            return [created.status_code, ran.status_code, listed.status_code, deleted.status_code]

    with ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lifecycle, range(48)))
    assert statuses == [[201, 200, 200, 204]] * 48
    assert daemon.client.get("/sandboxes").json()["items"] == []
    assert not daemon.leaks()
