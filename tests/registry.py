"""A real registry for the image tests: Debian's docker-registry (the CNCF distribution
registry) on 127.0.0.1, images pushed to it with skopeo; and a small HTTP proxy in front of it
that demands Bearer tokens from its own token service (as Docker Hub and GHCR do), and can
drop or corrupt a blob on its way."""

from __future__ import annotations

import base64
import http.client
import json
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "test-token-9f3c"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Registry:
    """`docker-registry serve CONFIG` with its storage in `root`; stopped by stop()."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.host = f"127.0.0.1:{self.port}"
        config = root / "config.yml"
        config.write_text(
            "version: 0.1\n"
            "log:\n  level: error\n"
            f"storage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            "  delete:\n    enabled: true\n"
            f"http:\n  addr: {self.host}\n"
        )
        self.log = (root / "registry.log").open("wb")
        self.proc = subprocess.Popen(
            ["/usr/bin/docker-registry", "serve", str(config)],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"docker-registry did not start: {(root / 'registry.log').read_text()}")

    def push(self, archive: Path, repository: str, *, all_platforms: bool = False) -> None:
        """skopeo copy oci-archive:ARCHIVE docker://HOST/REPOSITORY (plain HTTP)."""
        command = ["skopeo", "--insecure-policy", "copy", "--dest-tls-verify=false", "-q"]
        if all_platforms:
            command.append("--all")
        command += [f"oci-archive:{archive}", f"docker://{self.host}/{repository}"]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.root / "data", ignore_errors=True)


class BearerProxy:
    """An HTTP proxy to `upstream` that answers 401 with a Bearer challenge to any request
    without the token, and hands the token out at /token (only for `credentials`, if set).
    `drop_blobs`: the first GET of each blob sends half the blob and closes the connection.
    `corrupt_blobs`: every blob is sent with a byte changed. `token_bomb`: a gzip body the token
    service answers with (Content-Encoding: gzip), after a redirect if `token_redirect`."""

    def __init__(self, upstream: str, credentials: tuple[str, str] | None = None) -> None:
        self.upstream = upstream
        self.credentials = credentials
        self.drop_blobs = False
        self.corrupt_blobs = False
        self.token_bomb: bytes | None = None
        self.token_redirect = False
        self.dropped: set[str] = set()
        self.token_requests: list[dict[str, Any]] = []
        self.ranges: list[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_args: Any) -> None:
                pass

            def do_GET(self) -> None:
                url = urlsplit(self.path)
                if url.path in ("/token", "/token-moved"):
                    self._token(url.path, url.query)
                elif self.headers.get("Authorization") != f"Bearer {TOKEN}":
                    realm = f"http://{proxy.host}/token"
                    challenge = f'Bearer realm="{realm}",service="test-registry"'
                    self._answer(401, b"{}", {"WWW-Authenticate": challenge})
                else:
                    self._forward()

            def do_HEAD(self) -> None:
                self._answer(405, b"")

            def _token(self, path: str, query: str) -> None:
                params = {k: v[0] for k, v in parse_qs(query).items()}
                params["authorization"] = self.headers.get("Authorization")
                proxy.token_requests.append(params)
                if proxy.token_bomb is not None:
                    gzip = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
                    if proxy.token_redirect and path == "/token":
                        moved = f"http://{proxy.host}/token-moved?{query}"
                        self._answer(302, proxy.token_bomb, {**gzip, "Location": moved})
                    else:
                        self._answer(200, proxy.token_bomb, gzip)
                    return
                if proxy.credentials is not None:
                    user, password = proxy.credentials
                    expected = base64.b64encode(f"{user}:{password}".encode()).decode()
                    if params["authorization"] != f"Basic {expected}":
                        self._answer(401, b'{"errors": []}')
                        return
                self._answer(200, json.dumps({"token": TOKEN}).encode())

            def _forward(self) -> None:
                connection = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {
                    k: v for k, v in self.headers.items() if k.lower() in ("accept", "range")
                }
                if "Range" in headers:
                    proxy.ranges.append(headers["Range"])
                connection.request("GET", self.path, headers=headers)
                response = connection.getresponse()
                body = response.read()
                connection.close()
                passed = {
                    k: v
                    for k, v in response.getheaders()
                    if k.lower() in ("content-type", "docker-content-digest", "content-range")
                }
                is_blob = "/blobs/" in self.path and response.status in (200, 206)
                if is_blob and proxy.corrupt_blobs and body:
                    body = bytes([body[0] ^ 1]) + body[1:]
                if is_blob and proxy.drop_blobs and self.path not in proxy.dropped:
                    proxy.dropped.add(self.path)
                    self.send_response(response.status)
                    for key, value in passed.items():
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                self._answer(response.status, body, passed)

            def _answer(
                self, status: int, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(status)
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler
