"""Every error status of the contract, as problem+json, and that bad input changes nothing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.problems import PROBLEM_MEDIA_TYPE, PROBLEM_TYPE_BASE
from daemon.errors import SandboxError
from tests.api.conftest import MAX_BODY, TOKEN
from tests.api.fakes import FakeService


def assert_problem(response: Any, status: int, slug: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM_MEDIA_TYPE
    problem: dict[str, Any] = response.json()
    assert problem["status"] == status
    assert problem["type"].startswith(PROBLEM_TYPE_BASE)
    assert problem["title"]
    assert problem["detail"]
    if slug is not None:
        assert problem["type"] == PROBLEM_TYPE_BASE + slug
    return problem


@pytest.fixture
def running(client: TestClient, service: FakeService) -> Iterator[str]:
    """A running sandbox named `box` with a running exec `ex1`, made before the calls are reset."""
    assert client.post("/sandboxes", json={"name": "box"}).status_code == 201
    body = {"cmd": ["sleep", "60"], "wait": False}
    assert client.post("/sandboxes/box/exec", json=body).status_code == 202
    service.calls.clear()
    yield "box"
    assert service.mutations == [], "a refused request reached a mutating service method"


# 400


@pytest.mark.parametrize("body", [b"{", b'{"name": "x",}', b"\xff\xfe", b"nul\x00"])
def test_a_body_that_is_not_json_is_400(client: TestClient, running: str, body: bytes) -> None:
    headers = {"Content-Type": "application/json"}
    problem = assert_problem(client.post("/sandboxes", content=body, headers=headers), 400)
    assert problem["errors"][0]["type"] == "json_invalid"
    response = client.post("/sandboxes/box/exec", content=body, headers=headers)
    assert_problem(response, 400, "invalid-json")


def test_an_empty_body_where_one_is_required_is_400(client: TestClient, running: str) -> None:
    response = client.post("/sandboxes/box/exec", headers={"Content-Type": "application/json"})
    assert "empty" in assert_problem(response, 400, "invalid-json")["detail"]


def test_a_body_not_sent_as_json_is_415(client: TestClient, running: str) -> None:
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/sandboxes", content=b'{"name": "x"}', headers=headers)
    assert_problem(response, 415)


# 401


def test_a_missing_token_is_401_with_a_bearer_challenge(client: TestClient, running: str) -> None:
    for method, path in [("GET", "/sandboxes"), ("POST", "/sandboxes"), ("GET", "/nowhere")]:
        response = client.request(method, path, headers={"Authorization": ""})
        assert_problem(response, 401, "unauthorized")
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header", [f"Bearer {TOKEN}x", f"Bearer {TOKEN[:-1]}", "Bearer", f"Basic {TOKEN}", TOKEN]
)
def test_a_wrong_token_is_401(client: TestClient, running: str, header: str) -> None:
    response = client.post("/sandboxes", json={}, headers={"Authorization": header})
    assert_problem(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


def test_the_scheme_is_case_insensitive(client: TestClient) -> None:
    assert client.get("/sandboxes", headers={"Authorization": f"bearer {TOKEN}"}).is_success


def test_healthz_and_the_docs_need_no_token_but_the_rest_does(client: TestClient) -> None:
    assert client.get("/healthz", headers={"Authorization": ""}).status_code == 200
    assert client.get("/healthz", headers={"Authorization": "Bearer wrong"}).status_code == 200
    for path in ("/docs", "/openapi.json", "/static/vendor/swagger-ui/swagger-ui.css"):
        assert client.get(path, headers={"Authorization": ""}).status_code == 200, path
    for path in ("/info", "/sandboxes", "/static/../sandboxes", "/docs/", "/redoc"):
        assert_problem(client.get(path, headers={"Authorization": ""}), 401)
    # Open to reading only.
    assert_problem(client.post("/docs", headers={"Authorization": ""}), 401)
    assert client.get("/openapi.json").status_code == 200


def test_without_a_token_configured_no_header_is_needed() -> None:
    with TestClient(create_app(FakeService(), token=None, max_body=MAX_BODY)) as client:
        assert client.get("/sandboxes").status_code == 200


# 404 and 405


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/sandboxes/nope"),
        ("DELETE", "/sandboxes/nope"),
        ("GET", "/sandboxes/nope/execs"),
        ("GET", "/sandboxes/box/execs/nope"),
        ("GET", "/sandboxes/nope/execs/ex1"),
        ("POST", "/sandboxes/box/execs/nope/signal"),
        ("GET", "/sandboxes/nope/stats"),
        ("POST", "/sandboxes/nope/ttl"),
    ],
)
def test_no_such_sandbox_or_exec_is_404(
    client: TestClient, running: str, service: FakeService, method: str, path: str
) -> None:
    json: dict[str, object] | None = None
    if path.endswith("signal"):
        json = {"signal": "SIGTERM"}
    elif path.endswith("ttl"):
        json = {"ttl_seconds": 5}
    assert_problem(client.request(method, path, json=json), 404, "not-found")
    service.calls.clear()  # the service looked and found nothing: that is not a change


def test_an_exec_into_no_such_sandbox_is_404(client: TestClient, service: FakeService) -> None:
    response = client.post("/sandboxes/nope/exec", json={"cmd": ["true"]})
    assert_problem(response, 404, "not-found")


def test_an_unknown_route_is_404_and_a_wrong_method_405(client: TestClient) -> None:
    assert_problem(client.get("/nowhere"), 404)
    response = client.put("/sandboxes")
    assert_problem(response, 405)
    assert response.headers["allow"] == "GET, POST"


# 409


def test_a_name_in_use_is_409(client: TestClient, running: str, service: FakeService) -> None:
    assert_problem(client.post("/sandboxes", json={"name": "box"}), 409, "conflict")
    service.calls.clear()  # the service refused it itself: nothing changed


def test_an_exec_into_a_sandbox_not_running_is_409(
    client: TestClient, running: str, service: FakeService
) -> None:
    service.stop_sandbox("box")
    response = client.post("/sandboxes/box/exec", json={"cmd": ["true"]})
    assert_problem(response, 409)
    service.calls.clear()


def test_signalling_an_ended_exec_is_409(client: TestClient, service: FakeService) -> None:
    client.post("/sandboxes", json={"name": "box"})
    exec_id = client.post("/sandboxes/box/exec", json={"cmd": ["true"]}).json()["id"]
    response = client.post(f"/sandboxes/box/execs/{exec_id}/signal", json={"signal": "TERM"})
    assert_problem(response, 409)


# 413


def test_a_declared_length_over_the_limit_is_413(client: TestClient, running: str) -> None:
    body = b'{"name": "' + b"x" * MAX_BODY + b'"}'
    response = client.post("/sandboxes", content=body, headers={"Content-Type": "application/json"})
    assert response.request.headers["content-length"] == str(len(body))
    assert_problem(response, 413, "payload-too-large")


def test_a_chunked_body_growing_over_the_limit_is_413(client: TestClient, running: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"cmd": ["echo", "'
        for _ in range(MAX_BODY // 512 + 1):
            yield b"y" * 512
        yield b'"]}'

    response = client.post(
        "/sandboxes/box/exec", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert_problem(response, 413)


def test_a_body_at_the_limit_is_accepted(client: TestClient) -> None:
    prefix, suffix = b'{"labels": {"k": "', b'"}}'
    body = prefix + b"v" * (MAX_BODY - len(prefix) - len(suffix)) + suffix
    assert len(body) == MAX_BODY
    response = client.post("/sandboxes", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 201


# 422


@pytest.mark.parametrize(
    ("body", "where"),
    [
        ({"nmae": "typo"}, "nmae"),
        ({"name": "-starts-with-dash"}, "name"),
        ({"name": "x" * 64}, "name"),
        ({"name": "has space"}, "name"),
        ({"namespaces": ["mnt", "net", "user"]}, "namespaces"),
        ({"namespaces": ["pid", "mnt", "net"], "network": {"mode": "host"}}, "body"),
        ({"namespaces": ["pid", "mnt"], "network": {"mode": "none"}}, "body"),
        ({"network": {"mode": "bridge", "ports": [{"host_port": 0, "sandbox_port": 80}]}}, "ports"),
        ({"rootfs": "relative/path"}, "rootfs"),
        ({"limits": {"memory_bytes": -1}}, "memory_bytes"),
        ({"limits": {"memory_bytes": 1 << 20}}, "memory_bytes"),
        ({"limits": {"pids": 1}}, "pids"),
        ({"limits": {"cpus": 0}}, "cpus"),
        ({"limits": {"swap": 0}}, "swap"),
        ({"labels": {"a": 1}}, "labels"),
        ([], "body"),
        ("a string", "body"),
    ],
)
def test_a_body_breaking_the_schema_is_422(
    client: TestClient, running: str, body: object, where: str
) -> None:
    problem = assert_problem(client.post("/sandboxes", json=body), 422, "validation")
    assert any(where in [str(p) for p in issue["loc"]] for issue in problem["errors"]), problem


@pytest.mark.parametrize(
    "body",
    [{}, {"ttl_seconds": 0}, {"ttl_seconds": -5}, {"ttl_seconds": "soon"}, {"ttl": 5}],
)
def test_a_ttl_body_breaking_the_schema_is_422(
    client: TestClient, running: str, body: object
) -> None:
    assert_problem(client.post("/sandboxes/box/ttl", json=body), 422)


def test_stats_of_a_sandbox_not_running_is_409(client: TestClient, service: FakeService) -> None:
    client.post("/sandboxes", json={"name": "ended"})
    service.stop_sandbox("ended")
    assert_problem(client.get("/sandboxes/ended/stats"), 409, "conflict")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"cmd": []},
        {"cmd": ["true"], "user": "root"},
        {"cmd": ["true"], "cwd": "tmp"},
        {"cmd": ["true"], "timeout_seconds": 0},
        {"cmd": ["true"], "stdn": "typo"},
    ],
)
def test_an_exec_body_breaking_the_schema_is_422(
    client: TestClient, running: str, body: object
) -> None:
    assert_problem(client.post("/sandboxes/box/exec", json=body), 422)


@pytest.mark.parametrize(
    "query", ["state=bogus", "state=running&state=RUNNING", "label=novalue", "label==x"]
)
def test_a_bad_list_filter_is_422(client: TestClient, running: str, query: str) -> None:
    problem = assert_problem(client.get(f"/sandboxes?{query}"), 422)
    assert problem["errors"][0]["loc"][0] == "query"


@pytest.mark.parametrize("sig", ["SIGBOGUS", "BOGUS", 0, 999, -9, "", "9x"])
def test_a_signal_that_does_not_exist_is_422(client: TestClient, running: str, sig: object) -> None:
    response = client.post("/sandboxes/box/execs/ex1/signal", json={"signal": sig})
    problem = assert_problem(response, 422)
    assert problem["errors"][0]["loc"] == ["body", "signal"]


def test_a_signal_body_with_unknown_fields_is_422(client: TestClient, running: str) -> None:
    body = {"signal": "TERM", "force": True}
    assert_problem(client.post("/sandboxes/box/execs/ex1/signal", json=body), 422)


# 503 and 500


def test_the_sandbox_limit_is_503(client: TestClient, service: FakeService) -> None:
    for _ in range(service.max_sandboxes):
        assert client.post("/sandboxes").status_code == 201
    assert_problem(client.post("/sandboxes"), 503, "limit-reached")


class BrokenService(FakeService):
    async def info(self) -> Any:
        raise RuntimeError("secret internals /var/lib/sandboxd")

    async def get(self, ref: str) -> Any:
        raise SandboxError("the store is unreadable")


def test_an_unexpected_error_is_500_without_a_traceback() -> None:
    app = create_app(BrokenService(), token=None, max_body=MAX_BODY)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/info")
        problem = assert_problem(response, 500, "internal")
        assert "secret" not in response.text
        assert "Traceback" not in response.text
        assert "RuntimeError" not in response.text
        assert problem["title"] == "Internal Server Error"
        assert_problem(client.get("/sandboxes/x"), 500, "internal")
