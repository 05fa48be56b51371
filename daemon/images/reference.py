"""Image references as Docker reads them: `[registry/]repository[:tag][@digest]`.

Runs in: the daemon; pure functions.

Without a registry (a first component with no `.` or `:` and not `localhost`) the registry is
docker.io, and a one-component repository there is under `library/`; without a tag or digest
the tag is `latest`. Names are stored in that full form (`docker.io/library/busybox:latest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_REGISTRY = "docker.io"
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"^{_COMPONENT}(?:/{_COMPONENT})*\Z")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}\Z")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_HOST = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?\Z")


class ReferenceError(ValueError):
    """Not a reference an image can be named or pulled by."""


@dataclass(frozen=True)
class Reference:
    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """registry/repository:tag, the form names are stored in (None: a digest only)."""
        return f"{self.registry}/{self.repository}:{self.tag or 'latest'}"

    @property
    def target(self) -> str:
        """What to ask the registry's manifests endpoint for."""
        return self.digest or self.tag or "latest"


def parse(value: str) -> Reference:
    rest, _, digest = value.partition("@")
    if digest and not _DIGEST.match(digest):
        raise ReferenceError(f"{value!r}: the digest is not sha256:<64 hex digits>")
    registry = DEFAULT_REGISTRY
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        if not _HOST.match(first):
            raise ReferenceError(f"{value!r}: {first!r} is not a registry host")
        registry, rest = first, remainder
    repository, tag = rest, None
    last_slash = rest.rfind("/")
    colon = rest.rfind(":")
    if colon > last_slash:
        repository, tag = rest[:colon], rest[colon + 1 :]
        if not _TAG.match(tag):
            raise ReferenceError(f"{value!r}: {tag!r} is not a tag")
    if registry in ("docker.io", "index.docker.io"):
        registry = DEFAULT_REGISTRY
        if "/" not in repository:
            repository = f"library/{repository}"
    if not _REPOSITORY.match(repository):
        raise ReferenceError(f"{value!r}: {repository!r} is not a repository name")
    return Reference(registry, repository, tag if tag or not digest else None, digest or None)


def normal_name(value: str) -> str | None:
    """`value` in the form names are stored in, or None if it is no name:tag."""
    try:
        ref = parse(value)
    except ReferenceError:
        return None
    return None if ref.digest else ref.name
