"""POST /sandboxes/{ref}/exec answers the same whether api/fast_exec.py takes it or the
FastAPI route does: a query string sends a request to the route (the route ignores it)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import fast_exec
from tests.api.fakes import FakeService
from tests.api.test_routes import create

JSON = "application/json"
# Fields that differ between two execs of the same request.
_OWN = ("id", "started_at", "finished_at")


def _both(client: TestClient, path: str, **request: Any) -> tuple[Any, Any]:
    fast = client.post(path, **request)
    routed = client.post(f"{path}?through=route", **request)
    return fast, routed


def _comparable(response: Any) -> tuple[int, str, Any]:
    body = response.json()
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in _OWN}
    return response.status_code, response.headers["content-type"], body


CASES: list[tuple[str, str, dict[str, Any]]] = [
    ("waits", "box", {"json": {"cmd": ["echo", "hi"]}}),
    ("detached", "box", {"json": {"cmd": ["sleep", "9"], "wait": False}}),
    ("no content type", "box", {"content": b'{"cmd": ["true"]}'}),
    ("json with charset", "box", {
        "content": b'{"cmd": ["true"]}',
        "headers": {"Content-Type": "application/json; charset=utf-8"},
    }),
    ("unknown sandbox", "nobody", {"json": {"cmd": ["true"]}}),
    ("stopped sandbox", "stopped", {"json": {"cmd": ["true"]}}),
    ("invalid body", "box", {"json": {"cmd": []}}),
    ("unknown field", "box", {"json": {"cmd": ["true"], "bogus": 1}}),
    ("malformed json", "box", {"content": b'{"cmd": [', "headers": {"Content-Type": JSON}}),
    ("empty body", "box", {"content": b""}),
    ("json null", "box", {"json": None}),
    ("form body", "box", {"content": b"cmd=true", "headers": {"Content-Type": "text/plain"}}),
]  # fmt: skip


@pytest.mark.parametrize(("case", "ref", "request_"), CASES, ids=[c[0] for c in CASES])
def test_the_fast_path_answers_as_the_route(
    client: TestClient, service: FakeService, case: str, ref: str, request_: dict[str, Any]
) -> None:
    create(client, name="box")
    create(client, name="stopped")
    service.stop_sandbox("stopped")
    fast, routed = _both(client, f"/sandboxes/{ref}/exec", **request_)
    assert _comparable(fast) == _comparable(routed), case
    assert fast.headers.get("x-request-id")


def test_the_fast_path_takes_what_it_should_and_nothing_else() -> None:
    def scope(path: str = "/sandboxes/box/exec", **over: Any) -> dict[str, Any]:
        return {"type": "http", "method": "POST", "path": path, "query_string": b"",
                "headers": [(b"content-type", b"application/json")], **over}  # fmt: skip

    assert fast_exec._taken(scope()) == "box"
    assert fast_exec._taken(scope("/sandboxes/a%2Fb/exec")) == "a%2Fb"
    assert fast_exec._taken(scope(query_string=b"x=1")) is None
    assert fast_exec._taken(scope(method="GET")) is None
    assert fast_exec._taken(scope("/sandboxes/box/exec/")) is None
    assert fast_exec._taken(scope("/sandboxes/box/execs")) is None
    assert fast_exec._taken(scope("/sandboxes/a/b/exec")) is None
    assert fast_exec._taken(scope(headers=[(b"accept", b"application/x-ndjson")])) is None
    assert fast_exec._taken(scope(headers=[(b"content-type", b"text/plain")])) is None
    assert fast_exec._taken(scope(type="websocket")) is None


def test_the_fast_path_answers_and_calls_the_service_once(
    client: TestClient, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[int] = []
    send_json = fast_exec._send_json

    async def spy(send: Any, status: int, execution: Any) -> None:
        answered.append(status)
        await send_json(send, status, execution)

    monkeypatch.setattr(fast_exec, "_send_json", spy)
    create(client, name="box")
    service.calls.clear()
    assert client.post("/sandboxes/box/exec", json={"cmd": ["true"]}).status_code == 200
    assert client.post("/sandboxes/box/exec?x", json={"cmd": ["true"]}).status_code == 200
    assert answered == [200]
    assert service.calls == ["exec", "exec"]
