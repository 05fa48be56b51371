"""daemon/sandbox/hardening.py on the host: a process given the exec child's last two steps, against
the same process without them. As host root, only the filter can make these calls fail with
EPERM, so these tests see the filter itself, apart from the capability checks."""

from __future__ import annotations

import errno
import json
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.linux import seccomp
from daemon.sandbox import hardening

PROBE = Path(__file__).resolve().parent.parent / "syscall_probe.py"
DOCKER_CAPABILITIES = "00000000a80425fb"


def expected_errnos(results: dict[str, Any]) -> dict[str, int]:
    """What the filter answers each probe: EPERM, but ENOSYS for clone3 (libc falls back)."""
    names = [name for name in results if name != "status"]
    return {name: errno.ENOSYS if name == "clone3" else errno.EPERM for name in names}


def native() -> str:
    return hardening.ARCHES[platform.machine()][0]


def run_probe(hardened: bool) -> dict[str, Any]:
    def harden() -> None:  # in the child, between fork and exec, as in daemon/sandbox/spawn.py
        hardening.drop_capabilities()
        hardening.restrict_syscalls()

    result = subprocess.run(
        [sys.executable, str(PROBE)],
        capture_output=True,
        text=True,
        preexec_fn=harden if hardened else None,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def hardened() -> dict[str, Any]:
    hardening.prepare()
    return run_probe(hardened=True)


@pytest.fixture(scope="module")
def unhardened() -> dict[str, Any]:
    return run_probe(hardened=False)


def test_each_denied_call_fails_with_eperm(hardened: dict[str, Any]) -> None:
    status = hardened.pop("status")
    assert hardened == expected_errnos(hardened)
    hardened["status"] = status


def test_without_the_filter_no_probe_gets_that_errno(unhardened: dict[str, Any]) -> None:
    # Else the test above could not fail: each probe succeeds or fails otherwise unfiltered.
    for name, expected in expected_errnos(unhardened).items():
        assert unhardened[name] != expected, (name, errno.errorcode.get(expected))


def test_no_new_privs_seccomp_and_dockers_capabilities(
    hardened: dict[str, Any], unhardened: dict[str, Any]
) -> None:
    assert hardened["status"] == {
        "NoNewPrivs": "1",
        "Seccomp": "2",
        "CapInh": "0000000000000000",
        "CapPrm": DOCKER_CAPABILITIES,
        "CapEff": DOCKER_CAPABILITIES,
        "CapBnd": DOCKER_CAPABILITIES,
        "CapAmb": "0000000000000000",
    }
    assert (unhardened["status"]["NoNewPrivs"], unhardened["status"]["Seccomp"]) == ("0", "0")
    assert f"{hardening.KEPT_MASK:016x}" == DOCKER_CAPABILITIES


def test_the_filter_covers_every_abi_of_the_machine() -> None:
    program = hardening.compile_program()
    assert 0 < len(program) // 8 < 4096  # the kernel's limit of BPF instructions
    assert len(seccomp.compile_filter(hardening.seccomp_rules(), [native()])) < len(program)


def test_an_unknown_syscall_is_an_error_not_a_silent_gap() -> None:
    with pytest.raises(seccomp.LibseccompError, match="no_such_syscall"):
        seccomp.compile_filter([seccomp.Rule("no_such_syscall", errno.EPERM)], [native()])


def test_without_libseccomp_the_daemon_refuses_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    seccomp._library.cache_clear()
    monkeypatch.setattr(seccomp, "LIBRARY", "libseccomp-absent.so.9")
    try:
        with pytest.raises(hardening.HardeningUnavailable, match="apt-get install libseccomp2"):
            hardening.check()
    finally:
        seccomp._library.cache_clear()
