"""The sandbox lifecycle as a state machine: states, the allowed transitions, and the check.

    creating ──► running ──► exited      (the main cmd ended)
        │           │
        └───────────┴──────► failed      (setup failed, or the supervisor was lost)

Every transition goes through `check_transition` and is persisted by the store in the same
step (runc's state_linux.go keeps the same discipline).
"""

from __future__ import annotations

import enum

from daemon.errors import InvalidTransition


class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


class ExecState(enum.StrEnum):
    RUNNING = "running"
    EXITED = "exited"


class ExitReason(enum.StrEnum):
    EXITED = "exited"
    SIGNALED = "signaled"
    OOM = "oom"
    SUPERVISOR_LOST = "supervisor_lost"
    TTL_EXPIRED = "ttl_expired"
    SETUP_FAILED = "setup_failed"


TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset(
        {SandboxState.RUNNING, SandboxState.EXITED, SandboxState.FAILED}
    ),
    SandboxState.RUNNING: frozenset({SandboxState.EXITED, SandboxState.FAILED}),
    SandboxState.EXITED: frozenset(),
    SandboxState.FAILED: frozenset(),
}

LIVE_STATES = frozenset({SandboxState.CREATING, SandboxState.RUNNING})


def check_transition(current: SandboxState, target: SandboxState) -> None:
    """Raise InvalidTransition unless the lifecycle allows going from `current` to `target`."""
    if target not in TRANSITIONS[current]:
        raise InvalidTransition(f"a sandbox cannot go from {current} to {target}")
