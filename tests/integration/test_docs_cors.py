"""/docs on a daemon with a token: it loads with no token and no internet (every asset from the
daemon itself), Authorize takes the bearer token, and the rest of the API stays guarded. CORS:
off unless origins are configured, and then for those origins only."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from daemon.config import ConfigError, load_config
from tests.conftest import Daemon, Daemons

TOKEN = "docs-s3cret"
ORIGIN = "http://app.example:5173"
OTHER = "http://evil.example"


@pytest.fixture(scope="module")
def guarded(daemons: Daemons) -> Daemon:
    daemon = daemons.new("--token", TOKEN, "--cors-origin", ORIGIN)
    daemon.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return daemon


@pytest.fixture(scope="module")
def plain(daemons: Daemons, guarded: Daemon) -> Daemon:
    """A daemon with neither a token nor CORS origins (after `guarded`, which is the first)."""
    return daemons.new()


@pytest.fixture
def anonymous(guarded: Daemon) -> Iterator[httpx.Client]:
    """A client of the guarded daemon that sends no token."""
    with httpx.Client(
        transport=httpx.HTTPTransport(uds=str(guarded.socket)), base_url="http://localhost"
    ) as client:
        yield client


def referenced(html: str) -> list[str]:
    """The URLs a page loads: src and href attributes, and Swagger UI's `url:` (the document)."""
    return re.findall(r'(?:src|href)="([^"]*)"', html) + re.findall(r"\burl: '([^']*)'", html)


def test_docs_load_without_a_token_and_from_the_daemon_only(anonymous: httpx.Client) -> None:
    page = anonymous.get("/docs")
    assert page.status_code == 200, page.text
    assert page.headers["content-type"].startswith("text/html")
    assert not re.search(r"https?://", page.text), "the page names another host"
    urls = referenced(page.text)
    assert len(urls) == 4, urls  # the stylesheet, the icon, the script and the document
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = anonymous.get(url)
        assert asset.status_code == 200, (url, asset.text[:200])
        assert len(asset.content) > 0, url
    script = anonymous.get("/static/vendor/swagger-ui/swagger-ui-bundle.js")
    assert script.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "SwaggerUIBundle" in script.text
    css = anonymous.get("/static/vendor/swagger-ui/swagger-ui.css").text
    assert not re.search(r"url\(\s*['\"]?(https?:)?//", css), "the stylesheet loads from elsewhere"


def test_everything_else_still_needs_the_token(anonymous: httpx.Client, guarded: Daemon) -> None:
    for path in ("/sandboxes", "/info", "/redoc", "/docs/oauth2-redirect", "/static"):
        answer = anonymous.get(path)
        assert answer.status_code == 401, (path, answer.status_code)
        assert answer.headers["content-type"] == "application/problem+json"
    assert anonymous.post("/sandboxes", json={}).status_code == 401
    assert anonymous.get("/static/no-such-file").status_code == 404  # open, but nothing there
    assert guarded.client.get("/sandboxes").status_code == 200


def test_a_path_climbing_out_of_static_is_not_open(guarded: Daemon) -> None:
    """Sent as is (an HTTP client would remove the dot segments first)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(30)
        sock.connect(str(guarded.socket))
        sock.sendall(b"GET /static/../sandboxes HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]


def test_the_document_declares_the_bearer_scheme_and_authorize_works(
    anonymous: httpx.Client,
) -> None:
    document = anonymous.get("/openapi.json")
    assert document.status_code == 200
    schema = document.json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "The daemon's token.",
    }
    assert schema["security"] == [{"bearer": []}]
    # What "Try it out" sends once the token is given to Authorize.
    assert "get" in schema["paths"]["/sandboxes"]
    authorized = anonymous.get("/sandboxes", headers={"Authorization": f"Bearer {TOKEN}"})
    assert authorized.status_code == 200, authorized.text


def preflight(daemon: Daemon, origin: str) -> httpx.Response:
    return daemon.client.options(
        "/sandboxes",
        headers={
            "Authorization": "",  # a browser's preflight carries no credentials
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, idempotency-key",
        },
    )


def test_cors_is_off_by_default(plain: Daemon) -> None:
    assert "access-control-allow-origin" not in preflight(plain, ORIGIN).headers
    answer = plain.client.get("/sandboxes", headers={"Origin": ORIGIN})
    assert answer.status_code == 200
    assert not any(name.startswith("access-control-") for name in answer.headers)


def test_cors_for_a_configured_origin_only(guarded: Daemon, anonymous: httpx.Client) -> None:
    allowed = preflight(guarded, ORIGIN)
    assert allowed.status_code == 200, allowed.text
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    asked = {h.strip().lower() for h in allowed.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "idempotency-key", "x-request-id"} <= asked
    assert "POST" in allowed.headers["access-control-allow-methods"]

    refused = preflight(guarded, OTHER)
    assert "access-control-allow-origin" not in refused.headers
    answer = guarded.client.get("/sandboxes", headers={"Origin": OTHER})
    assert "access-control-allow-origin" not in answer.headers

    answer = guarded.client.get("/sandboxes", headers={"Origin": ORIGIN})
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    # A page of the origin can read why it was refused, too.
    unauthorized = anonymous.get("/sandboxes", headers={"Origin": ORIGIN})
    assert unauthorized.status_code == 401
    assert unauthorized.headers["access-control-allow-origin"] == ORIGIN


def test_cors_origins_from_flags_environment_and_file(tmp_path: Path) -> None:
    file = tmp_path / "config.toml"
    file.write_text('cors_origins = ["http://from-file:8000"]\n')
    assert load_config({"config": str(file)}, {}).cors_origins == ["http://from-file:8000"]
    flag_wins = {"config": str(file), "cors_origins": ["http://flag"]}
    assert load_config(flag_wins, {}).cors_origins == ["http://flag"]
    flags = load_config({"cors_origins": ["HTTPS://App.Example:443", "http://[::1]:3000/"]}, {})
    assert flags.cors_origins == ["https://app.example", "http://[::1]:3000"]
    env = load_config({}, {"SANDBOXD_CORS_ORIGINS": "http://a:8080, http://b"})
    assert env.cors_origins == ["http://a:8080", "http://b"]
    assert load_config({}, {}).cors_origins == []
    for bad in ("http://a/path", "ftp://a", "a.example", "http://u@a"):
        with pytest.raises(ConfigError, match="--cors-origin"):
            load_config({"cors_origins": [bad]}, {})
