"""Fixtures for the HTTP layer: an app around a FakeService, and a client that speaks to it."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import pytest

# Starlette's TestClient warns that it prefers httpx2; the httpx it has still works.
warnings.filterwarnings("ignore", message=".*httpx.*starlette.testclient")

from fastapi.testclient import TestClient  # noqa: E402

from api.app import create_app  # noqa: E402
from tests.api.fakes import FakeService  # noqa: E402

TOKEN = "s3cret-token"
MAX_BODY = 4096
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def service() -> FakeService:
    return FakeService(max_sandboxes=3)


@pytest.fixture
def client(service: FakeService) -> Iterator[TestClient]:
    app = create_app(service, token=TOKEN, max_body=MAX_BODY)
    with TestClient(app, headers=AUTH, raise_server_exceptions=False) as client:
        yield client
