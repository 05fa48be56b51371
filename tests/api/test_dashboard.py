"""The dashboard's HTTP face without a browser: what is open without the token (the page and
its assets) and what is not (its fragments), the fragments drawn from the service, and the
WebSocket token offered as a subprotocol (a browser cannot set headers, and a URL is logged)."""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from api.app import create_app
from tests.api.conftest import TOKEN
from tests.api.fakes import FakeService

ANONYMOUS = {"Authorization": ""}


def subprotocol(token: str) -> str:
    return "bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def test_the_page_and_its_assets_need_no_token(client: TestClient) -> None:
    page = client.get("/ui", headers=ANONYMOUS)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert 'id="token-dialog"' in page.text
    for path in (
        "/ui/static/dashboard.js",
        "/ui/static/dashboard.css",
        "/static/vendor/xterm/lib/xterm.js",
        "/static/vendor/xterm-addon-fit/lib/addon-fit.js",
        "/static/vendor/htmx/dist/htmx.min.js",
        "/static/vendor/uplot/dist/uPlot.iife.min.js",
    ):
        assert client.get(path, headers=ANONYMOUS).status_code == 200, path
        assert path in page.text or path.startswith("/ui/static/"), path


def test_a_slash_after_ui_leads_to_the_page(client: TestClient) -> None:
    answer = client.get("/ui/", headers=ANONYMOUS, follow_redirects=False)
    assert answer.status_code == 308
    assert answer.headers["location"] == "/ui"


def test_every_asset_the_page_names_is_served_from_the_package(client: TestClient) -> None:
    """No CDN: each src and href of the page is a path of the daemon's, and is there."""
    page = client.get("/ui").text
    urls = re.findall(r'(?:src|href)="([^"#]+)"', page)
    assert urls
    for url in urls:
        if url.startswith("data:"):
            continue
        assert url.startswith("/"), f"{url} is not the daemon's"
        assert client.get(url).status_code == 200, url


@pytest.mark.parametrize("path", ["/ui/fragments/sandboxes", "/ui/fragments/sandboxes/x"])
def test_the_fragments_need_the_token(client: TestClient, path: str) -> None:
    assert client.get(path, headers=ANONYMOUS).status_code == 401
    assert client.post("/ui", headers=ANONYMOUS).status_code == 401  # open to reading only


def test_the_fragments_draw_the_sandboxes(client: TestClient) -> None:
    made = client.post("/sandboxes", json={"name": "box", "cmd": ["sleep", "9"]}).json()
    rows = client.get("/ui/fragments/sandboxes")
    assert rows.status_code == 200
    assert f'data-id="{made["id"]}"' in rows.text
    assert "sleep 9" in rows.text
    details = client.get("/ui/fragments/sandboxes/box")
    assert details.status_code == 200
    assert 'data-action="delete"' in details.text
    missing = client.get("/ui/fragments/sandboxes/nope")
    assert missing.status_code == 404


@pytest.fixture
def anonymous(service: FakeService) -> Iterator[TestClient]:
    """A client that sends no token unless told to (TestClient's websocket_connect would add
    the default headers of `client`, and writes into the headers it is given)."""
    with TestClient(create_app(service, token=TOKEN, max_body=1024)) as client:
        yield client


def test_what_a_sandbox_holds_is_drawn_as_text(client: TestClient) -> None:
    """A command is anyone's string: the fragments escape it, it never becomes markup."""
    cmd = ["sh", "-c", "echo '<img src=x onerror=alert(1)>'"]
    made = client.post("/sandboxes", json={"cmd": cmd}).json()
    for path in ("/ui/fragments/sandboxes", f"/ui/fragments/sandboxes/{made['id']}"):
        text = client.get(path).text
        assert "<img" not in text
        assert "&lt;img src=x onerror=alert(1)&gt;" in text


def test_a_websocket_may_offer_the_token_as_a_subprotocol(anonymous: TestClient) -> None:
    path = "/sandboxes/nope/execs/nope/attach"
    protocols = ["sandboxd", subprotocol(TOKEN)]
    with anonymous.websocket_connect(path, subprotocols=protocols) as ws:
        # Accepted, with the protocol named and never the token echoed back.
        assert ws.accepted_subprotocol == "sandboxd"
        assert ws.receive_json()["error"]["status"] == 404
    for wrong in (subprotocol("wrong"), "bearer.%%%", "bearer."):
        with (
            pytest.raises(WebSocketDisconnect) as refused,
            anonymous.websocket_connect(path, subprotocols=["sandboxd", wrong]),
        ):
            pass
        assert refused.value.code == 1008


def test_older_websocket_clients_still_authenticate(anonymous: TestClient) -> None:
    path = "/sandboxes/nope/execs/nope/attach"
    with anonymous.websocket_connect(f"{path}?token={TOKEN}") as ws:
        assert ws.accepted_subprotocol is None
        assert ws.receive_json()["error"]["status"] == 404
    with anonymous.websocket_connect(path, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert ws.receive_json()["error"]["status"] == 404


def test_the_docs_offer_the_bearer_scheme(service: FakeService) -> None:
    """Swagger UI's Authorize button takes the token for this scheme."""
    document = create_app(service, token=TOKEN, max_body=1024).openapi()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The daemon's token.",
    }
    assert document["security"] == [{"bearer": []}]
    assert not [path for path in document["paths"] if path.startswith("/ui")]
