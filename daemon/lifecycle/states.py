"""The sandbox lifecycle as a state machine: its states, the one table of allowed transitions,
and the check that the store runs on every write of a state.

    (new) ──► creating ──► running ──► exited   (the main cmd ended)
      │          │            │  └───► failed   (the supervisor was lost)
      │          └────────────┼──────► failed   (setup failed, or the daemon stopped meanwhile)
      │                       └──────► expiring (its ttl ran out)
      └─────► warming ──► pooled ──► running    (made for the warm pool; a create takes it)

    creating, running, exited, failed ──► destroying ──► removing ──► (gone)
    expiring ──► removing ──► (gone);  warming, pooled ──► (gone)    (daemon/lifecycle/teardown.py)

The stored state (LifecycleState) is richer than the public one (SandboxState, the API's
`state`): warming, pooled and removing are hidden from the API, and expiring and destroying
show as the state the sandbox had, which its exit fields tell (public_state). A record the API
showed is deleted only from removing (reached once its processes are dead: the API has
forgotten it, its files and leases are still being let go), so that a daemon that dies while
tearing a sandbox down finds the record saying so, and finishes the teardown at its next start.
"""

from __future__ import annotations

import enum

from daemon.errors import InvalidTransition


# A sandbox's state as the API shows it: the contract's four values. (No docstring: it would
# become the description of the published schema.)
class SandboxState(enum.StrEnum):
    CREATING = "creating"
    RUNNING = "running"
    EXITED = "exited"
    FAILED = "failed"


class LifecycleState(enum.StrEnum):
    """A sandbox's state as the store keeps it."""

    CREATING = "creating"  # being built for a create
    WARMING = "warming"  # being built for the warm pool
    POOLED = "pooled"  # built, in the pool, waiting for a create to take it
    RUNNING = "running"  # a create's, its supervisor running
    EXITED = "exited"  # its main cmd ended (or it was killed): kept for its results
    FAILED = "failed"  # its setup failed, or its supervisor was lost
    EXPIRING = "expiring"  # its ttl ran out while it ran: being torn down, then forgotten
    DESTROYING = "destroying"  # being torn down, then forgotten
    REMOVING = "removing"  # dead and forgotten by the API: its files and leases being let go


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


S = LifecycleState
# The one table. None stands for no record: as a source, a record being inserted; as a
# target, a record being deleted. Each edge says which step of the code takes it.
TRANSITIONS: dict[LifecycleState | None, dict[LifecycleState | None, str]] = {
    None: {
        S.CREATING: "a create starts",
        S.WARMING: "the pool starts one",
        S.RUNNING: "`sandboxd recover --adopt` restores a running one",
        S.POOLED: "`sandboxd recover --adopt` restores a pooled one",
    },
    S.CREATING: {
        S.RUNNING: "its supervisor answered",
        S.FAILED: "its setup failed, its supervisor was lost, or a restart found it half made",
        S.DESTROYING: "its setup found bad input (422): it is forgotten",
    },
    # The pool's are forgotten without being marked: nobody sees them, and a restart that
    # finds one whose supervisor is gone forgets it anyway.
    S.WARMING: {
        S.POOLED: "its supervisor answered",
        None: "its setup failed, or a restart found it half made",
    },
    S.POOLED: {
        S.RUNNING: "a create took it",
        None: "the pool let it go (a stop, a trim, unusable), or it died",
    },
    S.RUNNING: {
        S.EXITED: "its main cmd ended",
        S.FAILED: "its supervisor was lost",
        S.EXPIRING: "its ttl ran out",
        S.DESTROYING: "DELETE",
    },
    S.EXITED: {S.DESTROYING: "DELETE, or its ttl ran out"},
    S.FAILED: {S.DESTROYING: "DELETE, or its ttl ran out"},
    S.EXPIRING: {S.REMOVING: "its processes are dead and its link gone (DELETE answers)"},
    S.DESTROYING: {S.REMOVING: "its processes are dead and its link gone (DELETE answers)"},
    S.REMOVING: {None: "its files removed, its uid range and address let go"},
}

# Sandboxes a restart must adopt (creating, warming: to fail or forget them), or whose
# teardown it must finish (expiring, destroying, removing).
LIVE_STATES = frozenset({S.CREATING, S.WARMING, S.POOLED, S.RUNNING})
UNFINISHED_STATES = LIVE_STATES | {S.EXPIRING, S.DESTROYING, S.REMOVING}
# The warm pool's: hidden from the API, not counted towards the daemon's limit.
POOL_STATES = frozenset({S.WARMING, S.POOLED})
# Being torn down: no ttl to set, nothing to start in it.
DYING_STATES = frozenset({S.EXPIRING, S.DESTROYING, S.REMOVING})
# What the API never shows (404): the pool's, and the deleted whose removal is not done.
HIDDEN_STATES = POOL_STATES | {S.REMOVING}

_FAILED_REASONS = frozenset({ExitReason.SETUP_FAILED, ExitReason.SUPERVISOR_LOST})


def check_transition(current: LifecycleState | None, target: LifecycleState | None) -> None:
    """Raise InvalidTransition unless the table allows going from `current` to `target`
    (None: no record, before an insert or after a delete)."""
    if target not in TRANSITIONS[current]:
        what = "be created in" if current is None else f"go from {current} to"
        if target is None:
            raise InvalidTransition(f"a sandbox cannot be forgotten while {current}")
        raise InvalidTransition(f"a sandbox cannot {what} {target}")


def public_state(
    state: LifecycleState, exit_reason: ExitReason | None, started: bool
) -> SandboxState:
    """The state the API shows for a stored one. Being torn down, a sandbox shows what it was:
    its exit fields say whether it had ended, and how."""
    if state in (S.CREATING, S.WARMING):
        return SandboxState.CREATING
    if state in (S.RUNNING, S.POOLED):
        return SandboxState.RUNNING
    if state in (S.EXITED, S.FAILED):
        return SandboxState(state.value)
    if exit_reason is None:
        return SandboxState.RUNNING if started else SandboxState.CREATING
    return SandboxState.FAILED if exit_reason in _FAILED_REASONS else SandboxState.EXITED


def stored_states(wanted: SandboxState) -> frozenset[LifecycleState]:
    """The stored states that may show as `wanted` (public_state decides among them)."""
    return frozenset(
        s
        for s in LifecycleState
        if s not in HIDDEN_STATES
        and (s in DYING_STATES or public_state(s, None, True).value == wanted.value)
    )


def table_markdown() -> str:
    """The transition table as markdown (docs/architecture.md, "The lifecycle")."""
    lines = ["| from | to | when |", "| --- | --- | --- |"]
    for source, targets in TRANSITIONS.items():
        for target, when in targets.items():
            left = "(no record)" if source is None else f"`{source}`"
            right = "(forgotten)" if target is None else f"`{target}`"
            lines.append(f"| {left} | {right} | {when} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # python3 -m daemon.lifecycle.states: the table for the docs
    print(table_markdown(), end="")
