"""Create, exec and delete answer the same whether api/fast_paths.py takes them or their
FastAPI routes do: a query string sends a request to the route (the routes ignore it)."""

from __future__ import annotations

import re
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api import fast_paths
from tests.api.fakes import FakeService
from tests.api.test_routes import create

JSON = "application/json"
# What differs between two sandboxes or execs made by the same request.
_OWN = ("id", "name", "hostname", "started_at", "finished_at", "created_at", "expires_at")


def _comparable(response: Any) -> tuple[int, str | None, Any, str | None]:
    body = response.json() if response.content else None
    if isinstance(body, dict):
        body = {k: v for k, v in body.items() if k not in _OWN}
    location = response.headers.get("location")
    return (
        response.status_code,
        response.headers.get("content-type"),
        body,
        location and re.sub(r"/sandboxes/[^/]+$", "/sandboxes/ID", location),
    )


def _both(client: TestClient, method: str, path: str, **request: Any) -> tuple[Any, Any]:
    fast = client.request(method, path, **request)
    routed = client.request(method, f"{path}?through=route", **request)
    return fast, routed


EXECS: list[tuple[str, str, dict[str, Any]]] = [
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


@pytest.mark.parametrize(("case", "ref", "request_"), EXECS, ids=[c[0] for c in EXECS])
def test_an_exec_is_answered_as_the_route_answers(
    client: TestClient, service: FakeService, case: str, ref: str, request_: dict[str, Any]
) -> None:
    create(client, name="box")
    create(client, name="stopped")
    service.stop_sandbox("stopped")
    fast, routed = _both(client, "POST", f"/sandboxes/{ref}/exec", **request_)
    assert _comparable(fast) == _comparable(routed), case
    assert fast.headers.get("x-request-id")


CREATES: list[tuple[str, dict[str, Any]]] = [
    ("no body", {}),
    ("empty object", {"json": {}}),
    ("labels and env", {"json": {"labels": {"a": "b"}, "env": {"X": "1"}}}),
    ("invalid field", {"json": {"ttl_seconds": -1}}),
    ("unknown field", {"json": {"bogus": 1}}),
    ("malformed json", {"content": b"{", "headers": {"Content-Type": JSON}}),
    ("json null", {"json": None}),
    ("a list", {"json": []}),
    ("form body", {"content": b"x=1", "headers": {"Content-Type": "text/plain"}}),
    ("idempotency key", {"json": {}, "headers": {"Idempotency-Key": "k1"}}),
    ("bad idempotency key", {"json": {}, "headers": {"Idempotency-Key": "k" * 300}}),
]


@pytest.mark.parametrize(("case", "request_"), CREATES, ids=[c[0] for c in CREATES])
def test_a_create_is_answered_as_the_route_answers(
    client: TestClient, service: FakeService, case: str, request_: dict[str, Any]
) -> None:
    service.max_sandboxes = 10
    fast, routed = _both(client, "POST", "/sandboxes", **request_)
    assert _comparable(fast) == _comparable(routed), case


def test_a_create_over_the_limit_is_answered_as_the_route_answers(
    client: TestClient, service: FakeService
) -> None:
    for _ in range(service.max_sandboxes):
        create(client)
    fast, routed = _both(client, "POST", "/sandboxes", json={})
    assert fast.status_code >= 400
    assert _comparable(fast) == _comparable(routed)


def test_a_delete_is_answered_as_the_route_answers(client: TestClient) -> None:
    for name in ("one", "two"):
        create(client, name=name)
    assert _comparable(client.delete("/sandboxes/one")) == _comparable(
        client.delete("/sandboxes/two?through=route")
    )
    fast, routed = _both(client, "DELETE", "/sandboxes/nobody")
    assert _comparable(fast) == _comparable(routed)
    assert fast.status_code == 404


def test_what_the_fast_paths_take_and_nothing_else() -> None:
    def taken(method: str, path: str, **over: Any) -> str | None:
        scope = {"type": "http", "method": method, "path": path, "query_string": b"",
                 "headers": [(b"content-type", b"application/json")], **over}  # fmt: skip
        found = fast_paths._taken(scope)
        return None if found is None else f"{found[0].__name__} {found[1]}"

    assert taken("POST", "/sandboxes/box/exec") == "_exec box"
    assert taken("POST", "/sandboxes") == "_create None"
    assert taken("DELETE", "/sandboxes/box") == "_delete box"
    assert taken("POST", "/sandboxes/a%2Fb/exec") == "_exec a%2Fb"  # as the route takes it
    assert taken("POST", "/sandboxes/box/exec", query_string=b"x=1") is None
    assert taken("GET", "/sandboxes/box/exec") is None
    assert taken("GET", "/sandboxes") is None
    assert taken("POST", "/sandboxes/box/exec/") is None
    assert taken("POST", "/sandboxes/box/execs") is None
    assert taken("POST", "/sandboxes/a/b/exec") is None
    assert taken("DELETE", "/sandboxes/box/files") is None
    assert (
        taken("POST", "/sandboxes/box/exec", headers=[(b"accept", b"application/x-ndjson")]) is None
    )
    assert (
        taken("POST", "/sandboxes", headers=[(b"accept", b"application/x-ndjson")])
        == "_create None"
    )
    assert taken("POST", "/sandboxes", headers=[(b"idempotency-key", b"k")]) is None
    assert taken("POST", "/sandboxes/box/exec", headers=[(b"content-type", b"text/plain")]) is None
    assert taken("POST", "/sandboxes/box/exec", type="websocket") is None


def test_the_fast_paths_answer_and_call_the_service_once(
    client: TestClient, service: FakeService, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered: list[int] = []
    response = fast_paths._response

    def spy(answer: fast_paths.Answer) -> Any:
        answered.append(answer.status)
        return response(answer)

    monkeypatch.setattr(fast_paths, "_response", spy)
    create(client, name="box")
    assert client.post("/sandboxes/box/exec", json={"cmd": ["true"]}).status_code == 200
    assert client.post("/sandboxes?x", json={"name": "other"}).status_code == 201
    assert client.delete("/sandboxes/other").status_code == 204
    assert answered == [201, 200, 204]
    assert service.calls.count("exec") == 1 and service.calls.count("create") == 2
