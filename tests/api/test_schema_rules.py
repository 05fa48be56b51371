"""openapi.json and the request models agree: a body the document admits the server takes, and a
body it refuses the server refuses; paths are stored in their normal form.

Each case is judged twice, by a JSON Schema validator over the committed document and by the
pydantic model the route uses. Hypothesis adds strings around the path rules, which are the
subtle ones (normalisation, '..', the kernel trees, control characters).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from daemon.shapes import (
    PATH_PATTERN,
    SIGNAL_PATTERN,
    TARGET_PATTERN,
    USER_PATTERN,
    ExecCreate,
    MountSpec,
    SandboxCreate,
    SignalRequest,
    TtlUpdate,
    normal_path,
    signal_number,
    stored_spec,
)

DOCUMENT = json.loads((Path(__file__).resolve().parents[2] / "openapi.json").read_text())


def validator(name: str) -> jsonschema.Draft202012Validator:
    schemas = DOCUMENT["components"]["schemas"]
    text = json.dumps({**schemas[name], "$defs": schemas})
    schema = json.loads(text.replace("#/components/schemas/", "#/$defs/"))
    return jsonschema.Draft202012Validator(schema)


MODELS = (SandboxCreate, ExecCreate, SignalRequest, TtlUpdate)
VALIDATORS = {model: validator(model.__name__) for model in MODELS}


def server_takes(model: type[BaseModel], body: Any) -> bool:
    try:
        parsed = model.model_validate_json(json.dumps(body))
        if isinstance(parsed, SignalRequest):
            parsed.number()  # the route's own check, at body.signal
    except (ValidationError, ValueError):
        return False
    return True


def assert_agree(model: type[BaseModel], body: Any) -> None:
    admitted = VALIDATORS[model].is_valid(body)
    assert admitted == server_takes(model, body), (
        f"{model.__name__} {body!r}: the document {'admits' if admitted else 'refuses'} it"
    )


MOUNT_TARGETS = [
    "/./proc/sys", "/./dev/shm", "/./sys/kernel", "/./proc", "//proc", "/proc/", "/dev/../dev/shm",
    "/", "//", "/.", "/./", "/..", "/proc", "/procx", "/.proc", "/proc.d", "/a/proc", "/tmp/x",
    "/tmp/x/", "/tmp//x/./", "/.../x", "/..x", "/x/..", "/x/../y", "relative", "", "/tmp/\n",
    "/tmp/\x00", "/tmp/\x1f", "/tmp/\x7f", "/tmp/\u2028/..", "/tmp/\u00e9", "/PROC", "/sys/",
    "/dev", "/devices",
]  # fmt: skip


@pytest.mark.parametrize("target", MOUNT_TARGETS)
def test_a_mount_target_is_judged_alike(target: str) -> None:
    assert_agree(SandboxCreate, {"mounts": [{"source": "/tmp", "target": target}]})
    assert_agree(SandboxCreate, {"mounts": [{"source": target, "target": "/opt/x"}]})
    assert_agree(SandboxCreate, {"rootfs": target})
    assert_agree(ExecCreate, {"cmd": ["true"], "cwd": target})


_PARTS = ["", ".", "..", "proc", "sys", "dev", "tmp", "...", ".x", "p\n", "\x00", "\u2028"]
_PATHS = st.lists(st.sampled_from(_PARTS), max_size=5).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=400, deadline=None, database=None)
@given(_PATHS)
def test_generated_paths_are_judged_alike(path: str) -> None:
    assert_agree(SandboxCreate, {"mounts": [{"source": "/tmp", "target": path}]})
    assert_agree(ExecCreate, {"cmd": ["true"], "cwd": path})


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(TARGET_PATTERN, fullmatch=True))
def test_every_target_the_pattern_admits_is_taken(target: str) -> None:
    mount = MountSpec(source="/tmp", target=target)
    assert mount.target == normal_path(target)
    assert mount.target.split("/")[1] not in ("proc", "sys", "dev", "")


@pytest.mark.parametrize(
    ("spelled", "normal"),
    [("//opt/./data/", "/opt/data"), ("/opt", "/opt"), ("/./", "/"), ("/a//b/.", "/a/b")],
)
def test_paths_are_stored_in_their_normal_form(spelled: str, normal: str) -> None:
    exec_spec = ExecCreate.model_validate({"cmd": ["true"], "cwd": spelled})
    assert exec_spec.cwd == normal
    create = SandboxCreate.model_validate({"rootfs": spelled})
    assert create.rootfs == normal
    if normal != "/":
        create = SandboxCreate.model_validate({"mounts": [{"source": spelled, "target": spelled}]})
        assert (create.mounts[0].source, create.mounts[0].target) == (normal, normal)


@pytest.mark.parametrize(
    "body",
    [
        {}, {"namespaces": []}, {"namespaces": ["pid", "mnt"]},
        {"namespaces": ["pid", "mnt", "net"]},
        {"namespaces": ["pid", "mnt", "net", "net"]},
        {"namespaces": ["pid", "mnt"], "network": {"mode": "host"}},
        {"network": {"mode": "host"}}, {"network": {"mode": "bridge"}},
        {"network": {"mode": "bridge", "ports": [{"host_port": 1, "sandbox_port": 2}]}},
        {"network": {"mode": "none", "ports": [{"host_port": 1, "sandbox_port": 2}]}},
        {"network": {"ports": [{"host_port": 1, "sandbox_port": 2}]}},
        {"network": {"ports": [{"host_port": 1.0, "sandbox_port": 2}], "mode": "bridge"}},
        {"network": {"ports": [{"host_port": "1", "sandbox_port": 2}], "mode": "bridge"}},
        {"cmd": []}, {"cmd": [""]}, {"cmd": ["x", ""]}, {"cmd": [None]}, {"cmd": ["a\x00"]},
        {"ttl_seconds": 5e-324}, {"ttl_seconds": 0.001}, {"ttl_seconds": 0}, {"ttl_seconds": "5"},
        {"ttl_seconds": True}, {"ttl_seconds": 5},
        {"limits": {"pids": 5.0}}, {"limits": {"pids": 5.5}}, {"limits": {"pids": True}},
        {"limits": {"memory_bytes": 1}}, {"limits": {"cpus": 0.001}},
        {"env": {"": "x"}}, {"env": {"a=b": "x"}}, {"env": {"A": 1}}, {"env": {"A": "\x00"}},
        {"labels": {"k": "v"}}, {"labels": {"k": False}},
        {"name": "box"}, {"name": "sb_0123456789abcdef"}, {"name": "sb_0123456789abcdeg"},
        {"name": "box\n"}, {"name": "-box"}, {"name": "b" * 64},
        {"hostname": "a.b"}, {"hostname": "a..b"}, {"hostname": "a\n"}, {"hostname": "-a"},
        {"hostname": "a" * 64}, {"hostname": ("a" * 30 + ".") * 2 + "a"},
        {"mounts": [{"source": "/tmp", "target": "/a"}, {"source": "/tmp", "target": "/b"}]},
        {"mounts": [{"source": "/tmp", "target": "/a", "read_only": 0}]},
        {"nonsense": 1},
    ],
)  # fmt: skip
def test_a_create_body_is_judged_alike(body: dict[str, Any]) -> None:
    assert_agree(SandboxCreate, body)


@pytest.mark.parametrize(
    "body",
    [
        {"cmd": ["true"]}, {"cmd": [""]}, {"cmd": []}, {"cmd": "true"},
        {"cmd": ["true"], "user": "0"}, {"cmd": ["true"], "user": "4294967294"},
        {"cmd": ["true"], "user": "4294967295"}, {"cmd": ["true"], "user": "0000000001"},
        {"cmd": ["true"], "user": "00000000001"}, {"cmd": ["true"], "user": "1:2"},
        {"cmd": ["true"], "user": "1:4294967295"}, {"cmd": ["true"], "user": "1:"},
        {"cmd": ["true"], "user": "\u0661"}, {"cmd": ["true"], "user": "1\n"},
        {"cmd": ["true"], "tty_size": {"rows": 1, "cols": 1}},
        {"cmd": ["true"], "tty": True, "tty_size": {"rows": 1, "cols": 1}},
        {"cmd": ["true"], "tty": False, "tty_size": None},
        {"cmd": ["true"], "tty": True, "tty_size": {"rows": 1.0, "cols": 2}},
        {"cmd": ["true"], "timeout_seconds": 5e-324}, {"cmd": ["true"], "wait": "yes"},
    ],
)  # fmt: skip
def test_an_exec_body_is_judged_alike(body: dict[str, Any]) -> None:
    assert_agree(ExecCreate, body)


SIGNALS = [
    "SIGTERM", "TERM", "term", "sigTerm", "hup", "SIGRTMIN", "rtmax", "iot", "cld", "15", "015",
    "0", "32", "33", "34", "64", "65", "", "9x", "SIG", "SIGSIGTERM", "\u017figterm",
    "\u0661\u0665", "TERM\n", " TERM", 0, 1, 15, 31, 32, 33, 34, 64, 65, -9, 15.0, 15.5, True, None,
]  # fmt: skip


@pytest.mark.parametrize("sig", SIGNALS)
def test_a_signal_is_judged_alike(sig: object) -> None:
    assert_agree(SignalRequest, {"signal": sig})


@settings(max_examples=300, deadline=None, database=None)
@given(st.from_regex(SIGNAL_PATTERN, fullmatch=True))
def test_every_signal_the_pattern_admits_is_one(name: str) -> None:
    assert signal_number(name) > 0


@pytest.mark.parametrize("pattern", [PATH_PATTERN, TARGET_PATTERN, USER_PATTERN, SIGNAL_PATTERN])
def test_the_patterns_need_no_python_only_syntax(pattern: str) -> None:
    """ECMA-262 (the document's dialect) reads them as Python does: no `.`, `\\d`, `\\w`,
    `\\Z`, inline flags or named groups; and none ends in `$` (see daemon.shapes.END)."""
    assert not re.search(r"(?<!\\)\.(?![^\[]*\])|\\[dwZAb]|\(\?[a-zP]", pattern)
    assert not pattern.endswith("$")


@pytest.mark.parametrize(
    "target", ["/./proc/sys", "//proc", "/proc/", "/dev/../dev/shm", "/./sys/kernel", "/"]
)
def test_a_kernel_tree_in_any_spelling_is_refused_with_a_reason(target: str) -> None:
    with pytest.raises(ValidationError) as caught:
        MountSpec(source="/tmp", target=target)
    message = str(caught.value)
    assert (
        "proc" in message
        or "sys" in message
        or "dev" in message
        or "'..'" in message
        or ("cannot be /" in message)
    )


def test_a_spec_stored_by_an_older_version_still_reads() -> None:
    """Older versions took '/./proc' as a target (and stored a failed record of it), an empty
    program and TTLs under a millisecond: such a record must still be shown, as it was."""
    old = {
        "mounts": [{"source": "/tmp", "target": "/./proc", "read_only": True}],
        "cmd": [""],
        "ttl_seconds": 1e-9,
        "hostname": "box\n",
    }
    with pytest.raises(ValidationError):
        SandboxCreate.model_validate(old)
    spec = stored_spec(old)
    assert (spec.mounts[0].target, spec.cmd, spec.hostname) == ("/./proc", [""], "box\n")
