"""tests/perf/steps.py with tiny counts, so that it cannot rot: every step it wraps is still in
daemon/, the steps of create, exec and destroy are each timed, and nothing of its private daemon
stays behind. No figure is judged (that is the bench's part, not the suite's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, find_leaks
from tests.perf.steps import render

# A step of each part of each request: a rename in daemon/ that drops one fails here.
EXPECTED = {
    "create": [
        "SandboxManager.create",
        "build a new sandbox (_create)",
        "store.create_sandbox",
        "4. cgroup2 mkdir (ProcessTree.create)",
        "tmpfs mount (disk.mount_layers_fs)",
        "5. zygote chain: request → fork A, namespaces, fork B → reply (Zygote.spawn)",
        "5. wait for the supervisor's HELLO (_connect)",
        "connect, read HELLO",
        "store.transition",
    ],
    "exec": [
        "SandboxManager.exec",
        "store.insert_exec",
        "send EXEC (SupervisorLink.post)",
        "supervisor: EXEC sent → STARTED read",
        "supervisor: EXEC sent → EXITED read",
        "collect: mailbox → store (Execs.collect)",
        "store.finish_exec",
    ],
    "destroy": [
        "SandboxManager.destroy",
        "1. mark (RecordSteps.mark)",
        "2. kill (teardown.kill)",
        "wait for PID 1 to die (pidfd)",
        "5. end (RecordSteps.end)",
        # Steps 6 and 7 (remove, release) run in the background once DELETE has answered:
        # they show under a request only when they happen to run during one.
    ],
}


def test_steps_times_each_step_and_leaves_nothing() -> None:
    result = subprocess.run(
        [sys.executable, "tests/perf/steps.py", "--count", "2", "--warmup", "1", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)

    assert report["missing"] == [], report["missing"]
    for operation, expected in EXPECTED.items():
        rows = {row["step"]: row for row in report["operations"][operation]}
        assert [step for step in expected if step not in rows] == [], list(rows)
        client = rows["the request, as the client sees it"]
        assert client["n"] == 2 and client["depth"] == 0, client
        for row in rows.values():
            assert row["n"] >= 1 and 0 <= row["p50_ms"] <= row["p90_ms"], row
        # The request's own entry point is below the client's time, each of its steps below it.
        assert rows[expected[0]]["depth"] == 1, rows[expected[0]]
        assert all(rows[step]["depth"] >= 2 for step in expected[1:]), rows

    # The private daemon, its sandboxes and its directory are gone.
    daemon = report["daemon"]
    root = Path(daemon["root"])
    assert not root.exists()
    assert not find_leaks(root, daemon["uid_base"])
    assert not any(Path("/sys/fs/cgroup").glob(f"*/{daemon['cgroup']}"))

    text = render(report)
    assert "create (2 requests): step" in text and "p90 ms" in text, text
