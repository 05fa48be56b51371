"""Rows to public shapes: what a stored sandbox or exec looks like to a client."""

from __future__ import annotations

import base64

from daemon.lifecycle.states import (
    ExecState,
    ExitReason,
    LifecycleState,
    SandboxState,
    public_state,
)
from daemon.shapes import Exec, ExitInfo, NetworkView, Sandbox, SandboxImage, stored_spec
from daemon.store.database import ExecRecord, SandboxRecord


def sandbox_view(record: SandboxRecord) -> Sandbox:
    """A stored sandbox as the API shows it: its stored state mapped to a public one
    (daemon/lifecycle/states.py), and no address once it has ended (it is being let go)."""
    spec = stored_spec(record.spec)
    state = public_state(record.state, record.exit_reason, record.started_at is not None)
    ended = record.state in (LifecycleState.EXITED, LifecycleState.FAILED)
    exit_info = None
    if record.exit_reason is not None:
        exit_info = ExitInfo(
            exit_code=record.exit_code,
            signal=record.exit_signal,
            reason=ExitReason(record.exit_reason),
            message=record.exit_message,
        )
    return Sandbox(
        id=record.id,
        name=record.name,
        state=state,
        hostname=record.hostname,
        namespaces=spec.namespaces,
        rootfs=spec.rootfs,
        image=None
        if record.image_id is None or spec.image is None
        else SandboxImage(id=record.image_id, reference=spec.image),
        mounts=spec.mounts,
        cmd=spec.cmd,
        env=spec.env,
        network=NetworkView(
            mode=spec.network.mode, ip=None if ended else record.ip, ports=spec.network.ports
        ),
        limits=spec.limits,
        labels=spec.labels,
        pid=record.pid if state == SandboxState.RUNNING else None,
        created_at=record.created_at,
        started_at=record.started_at,
        finished_at=record.finished_at,
        expires_at=record.expires_at,
        exit=exit_info,
    )


def exec_view(record: ExecRecord) -> Exec:
    return Exec(
        id=record.id,
        sandbox_id=record.sandbox_id,
        cmd=list(record.cmd),
        state=ExecState(record.state),
        pid=record.pid,
        exit_code=record.exit_code,
        signal=record.signal,
        timed_out=record.timed_out,
        stdout=as_text(record.stdout, record.encoding),
        stderr=as_text(record.stderr, record.encoding),
        encoding="base64" if record.encoding == "base64" else "utf-8",
        stdout_truncated=record.stdout_truncated,
        stderr_truncated=record.stderr_truncated,
        oom_killed=record.oom_killed,
        started_at=record.started_at,
        finished_at=record.finished_at,
    )


def as_text(data: bytes, encoding: str) -> str:
    """Output bytes as a JSON string: base64 of them exactly, or UTF-8 with replacement."""
    if encoding == "base64":
        return base64.b64encode(data).decode()
    return data.decode(errors="replace")
