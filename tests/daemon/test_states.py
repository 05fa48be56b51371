"""The lifecycle's one table (daemon/lifecycle/states.py): every state write the code makes is
in it, a write it does not allow raises and changes nothing, and each stored state shows as
one of the contract's four."""

from __future__ import annotations

import ast
import asyncio
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from daemon.errors import InvalidTransition
from daemon.lifecycle.service import RecordSteps
from daemon.lifecycle.states import (
    DYING_STATES,
    TRANSITIONS,
    ExitReason,
    LifecycleState,
    SandboxState,
    check_transition,
    public_state,
    stored_states,
)
from daemon.lifecycle.teardown import Outcome
from daemon.store.database import Store

S = LifecycleState
DAEMON = Path(__file__).resolve().parents[2] / "daemon"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def named_targets() -> set[LifecycleState]:
    """The states the code writes: those named in the target of every `transition(id, …)`
    and `check_transition(…, …)` call, and as a `"state"` of a row written whole (through a
    local name too: what is assigned to it)."""
    found: set[LifecycleState] = set()
    for path in DAEMON.rglob("*.py"):
        if path.name == "states.py":
            continue
        tree = ast.parse(path.read_text())
        assigned: dict[str, list[ast.AST]] = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                for target in node.targets:
                    if isinstance(target, ast.Name):
                        assigned.setdefault(target.id, []).append(node.value)
        for node in ast.walk(tree):
            written: list[ast.AST] = []
            if isinstance(node, ast.Call):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("transition", "check_transition") and len(node.args) >= 2:
                    written.append(node.args[1])
            if isinstance(node, ast.Dict):
                written += [
                    v
                    for k, v in zip(node.keys, node.values, strict=True)
                    if isinstance(k, ast.Constant) and k.value == "state"
                ]
            written += [
                v for e in written if isinstance(e, ast.Name) for v in assigned.get(e.id, [])
            ]
            for expression in written:
                for sub in ast.walk(expression):
                    if isinstance(sub, ast.Attribute) and sub.attr in S.__members__:
                        found.add(LifecycleState[sub.attr])
    return found


def test_every_state_the_code_writes_is_a_target_of_the_table_and_every_target_is_written() -> None:
    targets = {t for edges in TRANSITIONS.values() for t in edges if t is not None}
    written = named_targets()
    assert written, "the scan found no state writes: it is broken"
    assert written == targets


def test_the_table_names_every_state_and_only_the_dying_are_forgotten_with_no_trace() -> None:
    assert set(TRANSITIONS) == {None, *S}
    forgettable = {s for s, edges in TRANSITIONS.items() if None in edges}
    assert forgettable == {S.REMOVING, S.WARMING, S.POOLED}  # the pool's: never shown
    assert not TRANSITIONS[S.EXITED].keys() - {S.DESTROYING}


@pytest.mark.parametrize(
    ("current", "target"),
    [
        (S.EXITED, S.RUNNING),
        (S.FAILED, S.EXITED),
        (S.RUNNING, S.CREATING),
        (S.RUNNING, None),  # forgotten unmarked
        (S.CREATING, S.POOLED),
        (S.WARMING, S.RUNNING),
        (S.DESTROYING, S.RUNNING),
        (S.EXPIRING, S.EXITED),
        (None, S.EXITED),
        (None, S.DESTROYING),
    ],
)
def test_a_disallowed_transition_raises(current: S | None, target: S | None) -> None:
    with pytest.raises(InvalidTransition):
        check_transition(current, target)


def test_the_store_refuses_a_disallowed_write_and_keeps_the_record(tmp_path: Path) -> None:
    store = Store(tmp_path / "db")
    new(store, "a", S.EXITED)
    for target in (S.RUNNING, S.EXPIRING, S.POOLED):
        with pytest.raises(InvalidTransition):
            store.transition("a", target, pid=9)
    with pytest.raises(InvalidTransition):
        store.delete_sandbox("a")
    record = store.get_sandbox("a")
    assert (record.state, record.pid) == (S.EXITED, 1)
    store.close()


def test_every_stored_state_shows_as_one_of_the_four() -> None:
    assert [s.value for s in SandboxState] == ["creating", "running", "exited", "failed"]
    for state in S:
        for reason in [None, *ExitReason]:
            for started in (False, True):
                assert public_state(state, reason, started) in SandboxState
    assert public_state(S.EXPIRING, ExitReason.TTL_EXPIRED, True) == SandboxState.EXITED
    assert public_state(S.DESTROYING, None, True) == SandboxState.RUNNING
    assert public_state(S.DESTROYING, ExitReason.SUPERVISOR_LOST, True) == SandboxState.FAILED
    assert stored_states(SandboxState.RUNNING) == {S.RUNNING, *DYING_STATES} - {S.REMOVING}


# The record steps of every teardown (RecordSteps, daemon/lifecycle/service.py), on a real
# store: each (state, outcome) the code can meet takes only transitions of the table.


def new(store: Store, id: str, state: S) -> None:
    """A record in `state`, reached the way the code reaches it."""
    pooled = state in (S.WARMING, S.POOLED)
    store.create_sandbox(
        id=id, name=None, hostname=id, spec={}, max_live=9, now=T0, expires_at=None,
        pooled=pooled,
    )  # fmt: skip
    path = {
        S.CREATING: [],
        S.WARMING: [],
        S.POOLED: [S.POOLED],
        S.RUNNING: [S.RUNNING],
        S.EXITED: [S.RUNNING, S.EXITED],
        S.FAILED: [S.FAILED],
        S.EXPIRING: [S.RUNNING, S.EXPIRING],
        S.DESTROYING: [S.RUNNING, S.DESTROYING],
        S.REMOVING: [S.RUNNING, S.DESTROYING],
    }[state]
    for step in path:
        store.transition(id, step, pid=1)
    if state == S.REMOVING:
        store.remove_sandbox(id)


MET = [
    (S.RUNNING, Outcome.DELETED, None),
    (S.EXITED, Outcome.DELETED, None),
    (S.FAILED, Outcome.DELETED, None),
    (S.DESTROYING, Outcome.DELETED, None),
    (S.EXPIRING, Outcome.DELETED, None),
    (S.RUNNING, Outcome.EXPIRED, None),
    (S.EXITED, Outcome.EXPIRED, None),
    (S.FAILED, Outcome.EXPIRED, None),
    (S.EXPIRING, Outcome.EXPIRED, None),
    (S.REMOVING, Outcome.DELETED, None),  # a removal finished at start
    (S.CREATING, Outcome.EXITED, S.FAILED),  # no mailbox here: its supervisor was lost
    (S.RUNNING, Outcome.EXITED, S.FAILED),
    (S.POOLED, Outcome.EXITED, None),
    (S.EXITED, Outcome.EXITED, S.EXITED),  # a teardown finished at start
    (S.CREATING, Outcome.FAILED, S.FAILED),
    (S.WARMING, Outcome.FAILED, None),
    (S.FAILED, Outcome.FAILED, S.FAILED),  # a teardown finished at start
    (S.CREATING, Outcome.INTERRUPTED, S.FAILED),
    (S.WARMING, Outcome.INTERRUPTED, None),
    (S.POOLED, Outcome.SHUTDOWN, None),
    (S.RUNNING, Outcome.SHUTDOWN, None),  # taken while the pool let it go
]


@pytest.mark.parametrize(("state", "outcome", "end"), MET, ids=[f"{s}-{o}" for s, o, _ in MET])
def test_record_steps_take_only_transitions_of_the_table(
    tmp_path: Path, state: S, outcome: Outcome, end: S | None
) -> None:
    store = Store(tmp_path / "db")
    new(store, "a", state)
    store.update_sandbox("a", uid_slot=3)
    manager: Any = SimpleNamespace(
        store=store,
        live={},
        pool=SimpleNamespace(taken=lambda _id: None),
        runtime_dir=tmp_path / "run",
        _cancel_expiry=lambda _id: None,
        main_logs=SimpleNamespace(remove=_nothing),
    )
    (record,) = store.list_sandboxes(pooled_too=True)  # a removing one too, as at start
    steps = RecordSteps(manager, record, outcome, None)
    steps.mark()
    steps.end()
    asyncio.run(steps.release())
    if end is None:
        assert store.list_sandboxes(pooled_too=True) == []
    else:
        record = store.get_sandbox("a")
        assert (record.state, record.uid_slot, record.ip, record.pid) == (end, None, None, None)
    store.close()


async def _nothing(_id: str) -> None:
    pass
