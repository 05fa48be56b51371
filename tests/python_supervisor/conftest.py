"""The Python supervisor's tests: the default PID 1 is the native one (daemon/sandbox/native/),
so these modules run the integration tests again with `supervisor = "python"`, which stays a
setting."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def supervisor() -> str:
    return "python"
