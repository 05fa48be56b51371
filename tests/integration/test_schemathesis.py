"""Schemathesis, run from openapi.json against a real daemon, finds no difference between what
the document says and what the server does.

Every check of schemathesis runs, through its coverage, fuzzing (examples) and stateful phases
(the stateful phase follows the document's links: create → get, exec, delete; exec → get,
signal, output). The only 5xx allowed is the documented 503 of a daemon at its sandbox limit,
which this daemon (capped at a few sandboxes) does reach.

Fuzzed creates make real sandboxes, so the document the fuzzer reads is narrowed, never widened,
where a fuzzed value would reach the host: no `mounts` (a bind of a host path, read-write if
the fuzzer so chose), no `rootfs`, no published `ports` (they listen on every host address) and
no `host` network mode; no POST /images/pull (it would reach whatever registry a fuzzed
reference names: test_images.py pulls from one on loopback), no POST /images/import (random
bytes are no image: a 422 for a body the schema, `binary`, allows) and no `image` in a create
(a valid name of an image the daemon does not have is a 422 too); no `Idempotency-Key`, whose
reuse with another body is a 422 by design; and GET /events only with follow=false (a followed
stream never ends). Those are covered by their own tests (test_mount_paths.py,
test_network.py, tests/api/test_schema_rules.py, test_images.py, test_events.py). A sandbox
made outside the stateful phase is deleted at once (a hook), and everything left is destroyed
before the module's leak check.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, Daemon, Daemons

TOKEN = "schemathesis-test-token"
MAX_SANDBOXES = 4
CONFIG = """\
[checks.not_a_server_error]
# A daemon at its limit answers 503, as the document says.
expected-statuses = ["2xx", "3xx", "4xx", "503"]

[phases.stateful]
max-steps = 12

# A 404 of the files operations is the file's (missing in the sandbox), not the sandbox's,
# which the stateful phase (ST302) would take for a sandbox gone: fuzzed, not followed.
[[operations]]
include-path-regex = "/sandboxes/[^/]+/(files|archive)"
phases.stateful.enabled = false
"""
# Loaded by schemathesis (SCHEMATHESIS_HOOKS). A valid TTL under ten minutes is raised to ten
# minutes (still valid), so that no sandbox expires while the links lead to it (expiry has its
# own tests, test_ttl.py); an invalid one is left as it is. A sandbox made outside the stateful
# phase is deleted at once, so that the daemon stays below its limit and later creates go all
# the way through setup; the stateful phase keeps what it made, for the links to lead to.
# GET /events is always asked with follow=false.
HOOKS = """\
import os

import httpx
import schemathesis

LONG_TTL = 600


@schemathesis.hook
def before_call(context, case, kwargs):
    body = case.body
    ttl = body.get("ttl_seconds") if isinstance(body, dict) else None
    number = isinstance(ttl, (int, float)) and not isinstance(ttl, bool)
    if number and 0.001 <= ttl < LONG_TTL:
        body["ttl_seconds"] = LONG_TTL
    if case.path == "/events":  # never the stream: it would end only with the client
        case.query = {**(case.query or {}), "follow": "false"}


@schemathesis.serializer("application/x-tar")
def tar_serializer(ctx, value):
    # The body of PUT …/archive: a tar holding the fuzzed bytes as one file (tars that are not
    # tars, or hostile ones, are 422s that no schema can state: test_files.py has them).
    import io
    import tarfile

    data = value if isinstance(value, bytes) else str(value).encode()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        info = tarfile.TarInfo("fuzzed")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


@schemathesis.hook
def after_call(context, case, response):
    created = case.method.upper() == "POST" and case.path == "/sandboxes"
    stateful = case.meta is not None and case.meta.phase.name.value == "stateful"
    if created and response.status_code == 201 and not stateful:
        url = os.environ["SANDBOXD_URL"] + "/sandboxes/" + response.json()["id"]
        headers = {"Authorization": "Bearer " + os.environ["SANDBOXD_TOKEN"]}
        assert httpx.delete(url, headers=headers, timeout=60).status_code == 204
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def narrowed(document: dict[str, Any]) -> dict[str, Any]:
    """The document with the fields that would reach the host left out of what is fuzzed."""
    narrow = copy.deepcopy(document)
    schemas = narrow["components"]["schemas"]
    # Left out, not bounded: a negative case breaking `maxItems: 0` could be a valid bind or port.
    # With additionalProperties false, a negative case may still send them, under random names.
    del schemas["SandboxCreate"]["properties"]["mounts"]
    del schemas["SandboxCreate"]["properties"]["rootfs"]
    del schemas["NetworkSpec"]["properties"]["ports"]
    schemas["NetworkSpec"]["properties"]["mode"] = {"type": "string", "enum": ["none", "bridge"]}
    # The cpus limit is bounded by this host's CPUs, which no document can know.
    cpus = schemas["Limits"]["properties"]["cpus"]["anyOf"][0]
    cpus["maximum"] = os.cpu_count()
    # disk_bytes may not exceed memory_bytes (its files are in memory): a rule between two
    # fields that the schema cannot state (tests/integration/test_disk.py covers it).
    # What a create sends: the Limits without it (a Sandbox still shows the disk it got).
    asked = copy.deepcopy(schemas["Limits"])
    del asked["properties"]["disk_bytes"]
    schemas["LimitsAsked"] = asked
    schemas["SandboxCreate"]["properties"]["limits"] = {"$ref": "#/components/schemas/LimitsAsked"}
    # An Idempotency-Key binds a key to the first body sent with it: the same key with another
    # body is a 422 that no schema can foresee (tests/integration/test_idempotency.py).
    create = narrow["paths"]["/sandboxes"]["post"]
    # A pull reaches the registry its reference names, wherever that is; an import's body must
    # be an image archive, and a create's image one in the store (test_images.py has both).
    del narrow["paths"]["/images/pull"]
    del narrow["paths"]["/images/import"]
    del schemas["SandboxCreate"]["properties"]["image"]
    create["parameters"] = [
        p for p in create.get("parameters", []) if p.get("name", "").lower() != "idempotency-key"
    ]
    # GET /events follows by default: a stream that ends only when the client goes, which a
    # fuzzer would wait on until its timeout. `follow` is left out, and the hook sends
    # follow=false (the stream has its own tests, test_events.py).
    events = narrow["paths"]["/events"]["get"]
    events["parameters"] = [p for p in events["parameters"] if p["name"] != "follow"]
    return narrow


@pytest.fixture(scope="module")
def served(daemons: Daemons) -> tuple[Daemon, str]:
    """A daemon on loopback TCP too (schemathesis speaks TCP), with a token, as TCP needs."""
    port = free_port()
    daemon = daemons.new(
        "--listen", f"tcp://127.0.0.1:{port}", "--token", TOKEN,
        "--max-sandboxes", str(MAX_SANDBOXES),
    )  # fmt: skip
    daemon.client.headers["Authorization"] = f"Bearer {TOKEN}"
    return daemon, f"http://127.0.0.1:{port}"


def test_the_server_does_what_the_document_says(served: tuple[Daemon, str], tmp_path: Path) -> None:
    daemon, url = served
    document = json.loads((ROOT / "openapi.json").read_text())
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(narrowed(document)))
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    (tmp_path / "sandboxd_hooks.py").write_text(HOOKS)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "sandboxd_hooks",
        "PYTHONPATH": str(tmp_path),
        "SANDBOXD_URL": url,
        "SANDBOXD_TOKEN": TOKEN,
    }
    schemathesis = shutil.which("schemathesis") or "schemathesis"
    command = [
        schemathesis, "--config-file", str(config), "--no-color", "run", str(schema),
        "--url", url, "--header", f"Authorization: Bearer {TOKEN}",
        "--phases", "examples,coverage,fuzzing,stateful", "--checks", "all",
        "--max-examples", "12", "--seed", "1", "--workers", "1",
        "--request-timeout", "30", "--generation-database", "none",
        "--suppress-health-check", "all",
    ]  # fmt: skip
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env, check=False
        )
    finally:
        daemon.destroy_all()
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-20000:]
    assert not daemon.leaks()
    sys.stdout.write(output[-3000:])
