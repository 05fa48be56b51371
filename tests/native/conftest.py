"""The native PID 1's tests: every daemon here runs `supervisor = "native"`, and the binaries
(the static one, and one with ASan and UBSan for the parser's tests) are built once."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.sandbox import native


@pytest.fixture(scope="module")
def supervisor() -> str:
    return "native"


@pytest.fixture(scope="session")
def sanitized(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """sandboxd-init built with -fsanitize=address,undefined (dynamic, so for the host only)."""
    return native.build(tmp_path_factory.mktemp("asan") / "sandboxd-init", sanitize=True)
