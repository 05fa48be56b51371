"""openapi.json is the app's document, current, and makes a usable generated client."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from api.app import create_app
from tests.api.fakes import FakeService

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "openapi.json"
REGENERATE = "sandboxd openapi > openapi.json"


def current() -> dict[str, Any]:
    document = create_app(FakeService(), token="t", max_body=1024).openapi()
    round_tripped: dict[str, Any] = json.loads(json.dumps(document))
    return round_tripped


def test_the_committed_document_is_current() -> None:
    committed = json.loads(COMMITTED.read_text())
    assert committed == current(), f"openapi.json has drifted from the app: run `{REGENERATE}`"


def test_the_openapi_command_prints_the_committed_file() -> None:
    command = [sys.executable, "-c", "from api.cli import main; raise SystemExit(main())"]
    result = subprocess.run(
        [*command, "openapi"], cwd=REPO, capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == COMMITTED.read_text()


def test_errors_are_documented_as_problem_json() -> None:
    document = current()
    for path, item in document["paths"].items():
        for method, operation in item.items():
            for status, response in operation["responses"].items():
                if int(status) >= 400:
                    content = response["content"]
                    assert list(content) == ["application/problem+json"], (method, path, status)
                    assert content["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"
                    }
            needs_token = path != "/healthz"
            assert ("401" in operation["responses"]) == needs_token, (method, path)
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert document["paths"]["/healthz"]["get"]["security"] == []


def test_a_generated_client_has_the_stable_names(tmp_path: Path) -> None:
    generator = shutil.which("openapi-python-client")
    assert generator is not None, "openapi-python-client is a test extra"
    out = tmp_path / "client"
    config = COMMITTED.parent / "deploy" / "openapi-python-client.yaml"
    result = subprocess.run(
        [
            generator,
            "generate",
            "--meta",
            "none",
            "--path",
            str(COMMITTED),
            "--output-path",
            out,
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Warning" not in result.stdout + result.stderr, result.stdout + result.stderr
    modules = {p.stem for p in (out / "api").glob("*/*.py") if p.stem != "__init__"}
    assert modules == {
        "system_healthz",
        "system_info",
        "sandboxes_create",
        "execs_output",
        "sandboxes_list",
        "sandboxes_get",
        "sandboxes_delete",
        "execs_create",
        "execs_list",
        "execs_get",
        "execs_signal",
        "sandboxes_stats",
        "sandboxes_set_ttl",
        "sandboxes_logs",
        "execs_stdout",
        "execs_stderr",
        "events_stream",
        "system_metrics",
        "files_read",
        "files_write",
        "files_stat",
        "files_list",
        "files_mkdir",
        "files_move",
        "files_delete",
        "files_archive_read",
        "files_archive_write",
        "images_pull",
        "images_import",
        "images_list",
        "images_get",
        "images_delete",
    }
    problem = (out / "api" / "sandboxes" / "sandboxes_get.py").read_text()
    assert "Problem.from_dict" in problem
