"""A client generated from openapi.json by openapi-python-client drives the real daemon.

This is what users of generated clients get: readable, stable method names
(`sandboxes_create`, not `create_sandbox_sandboxes_post`) and models that parse our answers.
"""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from tests.conftest import Daemon

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Any:
    out = tmp_path_factory.mktemp("client")
    generator = shutil.which("openapi-python-client") or "openapi-python-client"
    command = [generator, "generate", "--path", str(ROOT / "openapi.json")]
    command += ["--output-path", str(out / "sandboxd_client"), "--meta", "none"]
    command += ["--config", str(ROOT / "deploy" / "openapi-python-client.yaml")]
    result = subprocess.run(command, cwd=out, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(out))
    try:
        yield importlib.import_module("sandboxd_client")
    finally:
        sys.path.remove(str(out))
        for name in [m for m in sys.modules if m.startswith("sandboxd_client")]:
            del sys.modules[name]


def load(package: ModuleType, name: str) -> Any:
    return importlib.import_module(f"{package.__name__}.{name}")


def test_generated_client_drives_a_sandbox(daemon: Daemon, generated: ModuleType) -> None:
    client = generated.Client(
        base_url="http://localhost",
        httpx_args={"transport": httpx.HTTPTransport(uds=str(daemon.socket))},
    )
    models = load(generated, "models")
    create = load(generated, "api.sandboxes.sandboxes_create")
    get = load(generated, "api.sandboxes.sandboxes_get")
    delete = load(generated, "api.sandboxes.sandboxes_delete")
    exec_create = load(generated, "api.execs.execs_create")
    execs_list = load(generated, "api.execs.execs_list")

    sandbox = create.sync(client=client, body=models.SandboxCreate(name="generated"))
    assert isinstance(sandbox, models.Sandbox) and sandbox.state == models.SandboxState.RUNNING
    result = exec_create.sync(
        ref=sandbox.id, client=client, body=models.ExecCreate(cmd=["sh", "-c", "echo hi; exit 3"])
    )
    assert isinstance(result, models.Exec)
    assert (result.stdout, result.exit_code) == ("hi\n", 3)
    assert [e.id for e in execs_list.sync(ref="generated", client=client).items] == [result.id]

    missing = get.sync_detailed(ref="nope", client=client)
    assert missing.status_code == 404 and isinstance(missing.parsed, models.Problem)
    assert delete.sync_detailed(ref=sandbox.id, client=client).status_code == 204
    assert get.sync_detailed(ref=sandbox.id, client=client).status_code == 404
