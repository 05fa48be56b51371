"""A pull from an OCI Distribution registry: manifest (an index resolved by platform), config
and layers into the blob store, every blob checked against its digest and size.

Runs in: the daemon's event loop (httpx); blobs are written to tmp/ as they arrive.

    GET /v2/REPO/manifests/TAG|DIGEST    → an index: the platform's entry, fetched by digest
    GET /v2/REPO/blobs/CONFIG            → the config (its diff ids name the layers' tars)
    GET /v2/REPO/blobs/LAYER             → each layer not in the store, streamed to a file
Authentication as Docker does it: a 401 names its scheme in WWW-Authenticate. Bearer: a token
from the realm it names (with the service and scope it gives; anonymous, or with the basic
credentials `registry_auth` has for the registry), then the request again with it. Basic: the
request again with those credentials. HTTPS always, but for loopback registries and those in
`insecure_registries` (Docker's rule). A connection dropped mid-blob is taken up where it
stopped when the registry answers a Range request (else the blob starts over), up to
_ATTEMPTS times; what was received is checked whole, and never kept if it does not match.
Every body is bounded before it is in memory: a Content-Encoding is decoded here a piece at a
time (a 500 KiB gzip can hold 500 MiB), the token service's answer is capped at _MAX_TOKEN and
a manifest at MAX_JSON, and a redirect's body is dropped unread.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx

from daemon.config import Config
from daemon.errors import RegistryError
from daemon.images.manifests import (
    INDEXES,
    MANIFESTS,
    MAX_JSON,
    ManifestError,
    Resolved,
    descriptor,
    is_index,
    load,
    pick_platform,
    resolve,
)
from daemon.images.reference import Reference
from daemon.images.store import BlobWriter, DigestMismatch, ImageFiles

# A pull's progress, as the lines of POST /images/pull's NDJSON answer.
Progress = Callable[[dict[str, Any]], None]
_ACCEPT = ", ".join((*MANIFESTS, *INDEXES))
_ATTEMPTS = 4
_MAX_TOKEN = 64 << 10  # a token service's answer larger than this, decoded, is refused
_PIECE = 256 << 10  # bytes decoded from a compressed body at a time
# The encodings a body is decoded from, by us, a bounded piece at a time (the zlib wbits)
_ENCODINGS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_PROGRESS_STEP = 1 << 20  # a progress line per MiB of a layer, and at its end
_DOCKER_HUB_API = "registry-1.docker.io"
_DOCKER_HUB_AUTH_KEYS = ("https://index.docker.io/v1/", "index.docker.io", "docker.io")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class Client:
    def __init__(self, config: Config) -> None:
        self.insecure = set(config.insecure_registries)
        self.auths = _read_auths(Path(config.registry_auth) if config.registry_auth else None)

    async def pull(
        self, ref: Reference, platform: str, files: ImageFiles, progress: Progress
    ) -> Resolved:
        host = _DOCKER_HUB_API if ref.registry == "docker.io" else ref.registry
        scheme = "http" if _plain_http(ref.registry, self.insecure) else "https"
        credentials = self._credentials(ref.registry)
        timeout = httpx.Timeout(30.0, read=60.0)
        async with httpx.AsyncClient(
            timeout=timeout,
            follow_redirects=True,
            transport=_BodilessRedirects(),
            headers={"Accept-Encoding": "gzip, deflate"},
        ) as http:
            session = _Session(http, f"{scheme}://{host}/v2/{ref.repository}", ref, credentials)
            return await _pull(session, ref, platform, files, progress)

    def _credentials(self, registry: str) -> tuple[str, str] | None:
        keys = _DOCKER_HUB_AUTH_KEYS if registry == "docker.io" else (registry,)
        for key in keys:
            for form in (key, f"https://{key}", f"http://{key}"):
                if form in self.auths:
                    return self.auths[form]
        return None


async def _pull(
    session: _Session, ref: Reference, platform: str, files: ImageFiles, progress: Progress
) -> Resolved:
    progress({"status": "resolving", "reference": ref.name if ref.tag else ref.target})
    data, media_type = await session.manifest(ref.target)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if ref.digest is not None and digest != ref.digest:
        raise DigestMismatch(f"the manifest is {digest}, not {ref.digest}")
    manifest = load(data, f"the manifest of {ref.target}")
    for _depth in range(4):
        if not is_index(manifest, media_type):
            break
        entry = pick_platform(manifest, platform)
        digest, size, _ = descriptor(entry, "the platform's manifest", MAX_JSON)
        data, media_type = await session.manifest(digest)
        if len(data) != size or "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise DigestMismatch(f"the manifest {digest} is not what its digest says")
        manifest = load(data, f"manifest {digest}")
    else:
        raise ManifestError("indexes nested too deep")
    writer = files.writer()
    writer.write(data)
    writer.commit(digest)
    config_digest, config_size, _ = descriptor(manifest.get("config"), "the config", MAX_JSON)
    await _fetch_blob(session, files, config_digest, config_size, None)
    resolved = resolve(manifest, digest, files.read_blob(config_digest), config_digest)
    progress({"status": "resolved", "digest": digest, "layers": len(resolved.layers)})
    for layer in resolved.layers:
        if files.has_blob(layer.digest):
            progress(_layer_event("exists", layer.digest, layer.size, layer.size))
            continue
        await _fetch_blob(session, files, layer.digest, layer.size, progress)
    return resolved


def _layer_event(status: str, digest: str, current: int, total: int) -> dict[str, Any]:
    return {"status": status, "layer": digest, "current": current, "total": total}


async def _fetch_blob(
    session: _Session, files: ImageFiles, digest: str, size: int, progress: Progress | None
) -> None:
    """The blob into the store, checked; resumed (or restarted) after a dropped connection."""
    if files.has_blob(digest):
        return
    writer = files.writer()
    try:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                await _receive(session, writer, digest, size, progress)
                break
            except httpx.TransportError as exc:
                if attempt == _ATTEMPTS:
                    raise RegistryError(
                        f"blob {digest}: the connection failed {attempt} times: {exc}"
                    ) from exc
    except BaseException:
        writer.abort()
        raise
    writer.commit(digest, size)
    if progress is not None:
        progress(_layer_event("done", digest, size, size))


async def _receive(
    session: _Session, writer: BlobWriter, digest: str, size: int, progress: Progress | None
) -> None:
    headers = {"Range": f"bytes={writer.size}-"} if writer.size else {}
    async with session.stream(f"/blobs/{digest}", headers) as response:
        if response.status_code == 200:
            writer.reset()  # the whole blob, from the start
        elif response.status_code != 206 or not writer.size:
            raise RegistryError(f"blob {digest}: the registry answered {response.status_code}")
        reported = writer.size
        async for chunk in _decoded(response, f"blob {digest}"):
            writer.write(chunk)
            if writer.size > size:
                raise DigestMismatch(f"{digest}: more than its {size} bytes")
            if progress is not None and writer.size - reported >= _PROGRESS_STEP:
                reported = writer.size
                progress(_layer_event("downloading", digest, writer.size, size))


class _Session:
    """Requests to one repository of one registry, with the authorization it asked for."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base: str,
        ref: Reference,
        credentials: tuple[str, str] | None,
    ) -> None:
        self.http = http
        self.base = base
        self.ref = ref
        self.credentials = credentials
        self.authorization: str | None = None

    async def manifest(self, target: str) -> tuple[bytes, str | None]:
        async with self.stream(f"/manifests/{target}", {"Accept": _ACCEPT}) as response:
            if response.status_code == 404:
                raise RegistryError(f"{self.ref.registry}/{self.ref.repository}:{target} not found")
            if response.status_code != 200:
                raise RegistryError(
                    f"the manifest {target}: the registry answered {response.status_code}"
                )
            data = bytearray()
            async for chunk in _decoded(response, f"the manifest {target}"):
                data += chunk
                if len(data) > MAX_JSON:
                    raise RegistryError(f"the manifest {target} is too large")
            media_type = response.headers.get("content-type", "").split(";")[0].strip() or None
            return bytes(data), media_type

    def stream(self, path: str, headers: dict[str, str]) -> _Streamed:
        return _Streamed(self, path, headers)

    async def send(self, path: str, headers: dict[str, str]) -> httpx.Response:
        """The response to GET base+path, authorized as the registry asks (one 401 retried)."""
        response = await self._send(path, headers)
        if response.status_code != 401:
            return response
        challenge = response.headers.get("www-authenticate", "")
        await response.aclose()
        await self._authorize(challenge)
        response = await self._send(path, headers)
        if response.status_code == 401:
            await response.aclose()
            raise RegistryError(f"{self.ref.registry} refused the credentials (401)")
        return response

    async def _send(self, path: str, headers: dict[str, str]) -> httpx.Response:
        headers = dict(headers)
        if self.authorization is not None:
            headers["Authorization"] = self.authorization
        request = self.http.build_request("GET", self.base + path, headers=headers)
        try:
            return await self.http.send(request, stream=True)
        except httpx.TransportError:
            raise
        except httpx.HTTPError as exc:
            raise RegistryError(f"{self.ref.registry}: {exc}") from exc

    async def _authorize(self, challenge: str) -> None:
        scheme, _, rest = challenge.partition(" ")
        params = dict(_CHALLENGE_PARAM.findall(rest))
        if scheme.lower() == "basic":
            if self.credentials is None:
                raise RegistryError(f"{self.ref.registry} asks for credentials (registry_auth)")
            self.authorization = _basic(self.credentials)
            return
        if scheme.lower() != "bearer" or "realm" not in params:
            raise RegistryError(f"{self.ref.registry} asks for an unknown authentication: {scheme}")
        query = {"scope": params.get("scope", f"repository:{self.ref.repository}:pull")}
        if "service" in params:
            query["service"] = params["service"]
        headers = {} if self.credentials is None else {"Authorization": _basic(self.credentials)}
        realm = params["realm"]
        try:
            body = await self._token_answer(realm, query, headers)
        except httpx.HTTPError as exc:
            raise RegistryError(f"the token service {realm}: {exc}") from exc
        try:
            document = json.loads(body)
            token = document.get("token") or document.get("access_token")
        except (ValueError, AttributeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"the token service {realm} gave no token")
        self.authorization = f"Bearer {token}"

    async def _token_answer(
        self, realm: str, query: dict[str, str], headers: dict[str, str]
    ) -> bytes:
        """The token service's answer, streamed: a hostile one could be huge once decoded."""
        async with self.http.stream("GET", realm, params=query, headers=headers) as response:
            if response.status_code != 200:
                raise RegistryError(f"the token service {realm} answered {response.status_code}")
            body = bytearray()
            async for chunk in _decoded(response, f"the token service {realm}"):
                body += chunk
                if len(body) > _MAX_TOKEN:
                    raise RegistryError(
                        f"the token service {realm} answered more than {_MAX_TOKEN} bytes"
                    )
            return bytes(body)


class _Streamed:
    """`async with session.stream(path, headers) as response`: closed however it ends."""

    def __init__(self, session: _Session, path: str, headers: dict[str, str]) -> None:
        self.session, self.path, self.headers = session, path, headers
        self.response: httpx.Response | None = None

    async def __aenter__(self) -> httpx.Response:
        self.response = await self.session.send(self.path, self.headers)
        return self.response

    async def __aexit__(self, *_exc: object) -> None:
        if self.response is not None:
            await self.response.aclose()


class _BodilessRedirects(httpx.AsyncBaseTransport):
    """The HTTP transport, but a redirect's body is dropped unread: httpx reads (and decodes)
    the whole body of each redirect it follows, which a hostile registry could make huge."""

    def __init__(self) -> None:
        self.transport = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        if not (300 <= response.status_code < 400 and "location" in response.headers):
            return response
        await response.aclose()
        headers = [
            (key, value)
            for key, value in response.headers.multi_items()
            if key.lower() not in ("content-encoding", "content-length", "transfer-encoding")
        ]
        return httpx.Response(response.status_code, headers=headers, request=request)

    async def aclose(self) -> None:
        await self.transport.aclose()


async def _decoded(response: httpx.Response, what: str) -> AsyncIterator[bytes]:
    """The body of `response` decoded from its Content-Encoding by us, at most _PIECE bytes
    at a time (httpx would decode a whole network read at once: a 64 KiB gzip of zeros is
    64 MiB), so that a caller's size limit binds before the memory is spent."""
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("", "identity"):
        async for chunk in response.aiter_raw():
            yield chunk
        return
    if encoding not in _ENCODINGS:
        raise RegistryError(f"{what}: an encoding not asked for: {encoding}")
    decoder = zlib.decompressobj(_ENCODINGS[encoding])
    async for chunk in response.aiter_raw():
        while not decoder.eof:
            try:
                piece = decoder.decompress(chunk, _PIECE)
            except zlib.error as exc:
                raise RegistryError(f"{what}: not {encoding}: {exc}") from exc
            chunk = decoder.unconsumed_tail
            if piece:
                yield piece
            if not chunk and len(piece) < _PIECE:  # a full piece may leave output in zlib
                break
    if not decoder.eof:
        raise RegistryError(f"{what}: the {encoding} body ends early")


def _basic(credentials: tuple[str, str]) -> str:
    user, password = credentials
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _plain_http(registry: str, insecure: set[str]) -> bool:
    """Loopback registries and those named insecure are spoken to over plain HTTP."""
    if registry in insecure:
        return True
    host = registry.rsplit(":", 1)[0] if not registry.endswith("]") else registry
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_auths(path: Path | None) -> dict[str, tuple[str, str]]:
    """Registry → (user, password) from a Docker config.json's `auths` (`auth` is base64 of
    user:password, or `username` and `password` are given)."""
    if path is None:
        return {}
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"registry_auth {path} cannot be read: {exc}") from exc
    auths: dict[str, tuple[str, str]] = {}
    for key, entry in (document.get("auths") or {}).items():
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str):
            try:
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                continue
        else:
            user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if user:
            auths[str(key)] = (user, password)
    return auths
