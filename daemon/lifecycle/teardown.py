"""The one way a sandbox goes: every path that ends one (DELETE, its ttl, its main cmd's exit, a
create that failed, a restart or `sandboxd recover` removing it, the pool letting one go) runs
`teardown`, which takes the same steps in the same order.

Runs in: the daemon process (or `sandboxd recover`), as root, in the host's namespaces.

The steps, and why in this order:

    1. mark      the record says it is going (destroying, or expiring with its exit fields),
                 if it is to be forgotten: a daemon that dies from here on finds it so at its
                 next start and runs the teardown again, rather than taking it for alive.
    2. kill      the link closed, every process killed at once through its cgroup (which
                 reaches what a pidfd cannot: a supervisor whose pid was never stored, the
                 first fork before it), and PID 1 waited for: nothing of it runs from here on,
                 so nothing re-creates what the next steps remove.
    3. unpublish its published ports closed: no relay to an address about to be released.
    4. unplug    its host link deleted (its eth0 goes with it), and seen to go: before its
                 address is released (step 7), or another sandbox could be given an address
                 whose old link still answers.
    5. end       the record says how it ended (exited or failed, its execs' results), if it is
                 to be kept: read from the mailbox in its run directory, so before step 6.
                 One to be forgotten is removing: gone for the API, its leases still held.
    6. remove    its cgroup2 tree (which kills stragglers and waits), then side by side its v1
                 cgroups, its run directory, and its writable layers' tmpfs with its state
                 directory (both tmpfs: unmounted first, so their pages are freed at once).
    7. release   the record deleted, or its uid range, address and pid let go: last, so that
                 a uid range or address is never handed out while something of its last
                 holder is left (and not at all while its cgroup2 tree stays).

Once step 5 is done nothing of the sandbox runs and its record is final: a DELETE (or the
ttl's expiry) has the record `removing`, which the API shows as gone (404), and a main cmd's
exit has it `exited`. Steps 6 and 7 need not be waited for then: given `removals`, the
teardown hands them to its Removals and returns, and they run in the background, at most
REMOVALS_AT_ONCE at a time, the rest queued in order. Till step 7 the record holds the uid
range and address, so neither is handed to another sandbox while anything of it is left.

Every step is idempotent (what is gone already is skipped), so running the teardown again
after a crash anywhere in it finishes the job: a record left expiring, destroying (step 1)
or removing, or ended but holding its leases (step 5) is torn down again at the next start;
one left running is adopted, found dead and torn down as exited; files without a live record
are strays, swept at start with outcome `removed`. A daemon stopped by SIGTERM waits up to
STOP_DEADLINE for the removals under way and queued, and leaves the rest to its next start.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import functools
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from daemon import logs
from daemon.lifecycle.running import LiveSandbox
from daemon.lifecycle.supervisor_link import wait_readable
from daemon.linux import cgroups, disk, limits
from daemon.network.bridge import BridgeNetwork, NetworkError

log = logging.getLogger(__name__)

_GONE_TIMEOUT = 10.0
# Removals (steps 6 and 7) run side by side: each walks a writable layer and many cgroup
# files, so a burst of DELETEs is bounded rather than let loose on the disk all at once.
REMOVALS_AT_ONCE = 2
# How long a stopping daemon (SIGTERM) waits for the removals left; its next start does the rest.
STOP_DEADLINE = 20.0
# A file that, while another process holds an exclusive flock on it, holds every removal
# before it starts: how the tests catch a sandbox between its answer and its removal.
HOLD_VARIABLE = "SANDBOXD_TEST_HOLD_REMOVALS"


class Outcome(enum.StrEnum):
    """Why a sandbox is torn down; what becomes of its record follows from it (and from
    whether it was the pool's): see RecordSteps in daemon/lifecycle/service.py."""

    DELETED = "deleted"  # DELETE /sandboxes/ID: forgotten
    EXPIRED = "expired"  # its ttl ran out: forgotten (shown exited, ttl_expired, till then)
    EXITED = "exited"  # its main cmd ended, or its supervisor was lost: kept, ended
    FAILED = "failed"  # its create failed: kept as failed (forgotten if the input was bad)
    INTERRUPTED = "interrupted"  # a restart found it half made: kept as failed
    SHUTDOWN = "shutdown"  # the pool let it go (a graceful stop, a trim, unusable): forgotten
    REMOVED = "removed"  # no record: a stray at start, or `sandboxd recover` removing it


class RecordSteps(Protocol):
    """What a teardown does to a sandbox's record (steps 1, 5 and 7); none when it has none."""

    def mark(self) -> None: ...

    def end(self) -> None: ...

    async def release(self) -> None: ...


@dataclass
class Host:
    """What of the host a teardown undoes: where a sandbox's processes, link and files are."""

    tree: cgroups.ProcessTree
    limits: limits.ResourceControl
    network: BridgeNetwork
    runtime_dir: Path  # RUN/sandboxes
    sandboxes_dir: Path  # STATE/sandboxes


async def teardown(
    host: Host,
    sandbox_id: str,
    outcome: Outcome,
    *,
    live: LiveSandbox | None = None,
    record: RecordSteps | None = None,
    bridged: bool = True,
    removals: Removals | None = None,
) -> None:
    """Take sandbox `sandbox_id` down for `outcome`: the steps of the module's docstring.

    `live`: what this daemon holds of it (link, pidfd, ports), if anything. `record`: its
    record's steps, None if it has no record. `bridged`: whether it may have a host link.
    `removals`: where steps 6 and 7 go to run in the background; None: done before return."""
    log.debug("sandbox %s: tearing it down", sandbox_id, extra={"outcome": str(outcome)})
    # 1. mark
    if record is not None:
        record.mark()
    # 2. kill
    await kill(host.tree, sandbox_id, live)
    # 3. unpublish
    if live is not None and live.ports is not None:
        await live.ports.close()
        live.ports = None
    # 4. unplug
    if bridged:
        try:
            await host.network.unplug(sandbox_id)
        except NetworkError as exc:
            log.error("sandbox %s: %s", sandbox_id, exc)
    # 5. end
    if record is not None:
        record.end()
    if live is not None:
        live.release_waiters()
    if removals is None:
        await remove(host, sandbox_id, record)
    else:
        removals.submit(sandbox_id, functools.partial(remove, host, sandbox_id, record))


async def remove(host: Host, sandbox_id: str, record: RecordSteps | None) -> None:
    """Steps 6 and 7, of a sandbox whose processes are dead and whose record is final."""
    # 6. remove
    emptied = await remove_files(host, sandbox_id)
    # 7. release: never while a process of it may live (its cgroup2 tree would not go),
    # or its uid range, and the user namespace kept for it, could be handed to another
    # sandbox beside it. The record keeps its leases; the next start tries again.
    if not emptied:
        log.error("sandbox %s: its uid range and address stay held", sandbox_id)
    elif record is not None:
        await record.release()


class Removals:
    """Steps 6 and 7 of the teardowns that did not wait for them, in the background: at most
    `at_once` at a time, the rest queued in order; one sandbox's after its earlier ones."""

    def __init__(self, at_once: int = REMOVALS_AT_ONCE, hold: Path | None = None) -> None:
        self._slots = asyncio.Semaphore(at_once)
        self._hold = hold
        self._tasks: dict[str, asyncio.Task[None]] = {}

    def __len__(self) -> int:
        """How many sandboxes are being removed or queued."""
        return len(self._tasks)

    def submit(self, sandbox_id: str, steps: Callable[[], Awaitable[None]]) -> None:
        """Run `steps` when there is room, after those submitted before for the same sandbox."""
        earlier = self._tasks.get(sandbox_id)
        task = asyncio.get_running_loop().create_task(
            self._run(sandbox_id, earlier, steps), context=logs.context_of(sandbox_id=sandbox_id)
        )
        self._tasks[sandbox_id] = task

    async def _run(
        self,
        sandbox_id: str,
        earlier: asyncio.Task[None] | None,
        steps: Callable[[], Awaitable[None]],
    ) -> None:
        try:
            if earlier is not None:
                await asyncio.wait([earlier])
            async with self._slots:
                await self._held()
                await steps()
        except Exception:  # its record says what is left: the next start finishes it
            log.exception("sandbox %s: its removal failed", sandbox_id)
        finally:
            if self._tasks.get(sandbox_id) is asyncio.current_task():
                del self._tasks[sandbox_id]

    async def _held(self) -> None:
        """Wait while the hold file (HOLD_VARIABLE) is locked by another process."""
        if self._hold is None:
            return
        while True:
            try:
                fd = os.open(self._hold, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                pass
            finally:
                os.close(fd)
            await asyncio.sleep(0.05)

    async def one_done(self) -> None:
        """Wait till one of the removals under way or queued is done (at once if none is)."""
        if self._tasks:
            await asyncio.wait(set(self._tasks.values()), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self, deadline: float = STOP_DEADLINE) -> int:
        """Wait up to `deadline` seconds for every removal under way or queued; those left
        are cancelled (their records say so: the next start finishes them). How many."""
        tasks = set(self._tasks.values())
        if not tasks:
            return 0
        log.info("waiting up to %gs for %d removals to finish", deadline, len(tasks))
        _done, pending = await asyncio.wait(tasks, timeout=deadline)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)


async def kill(tree: cgroups.ProcessTree, sandbox_id: str, live: LiveSandbox | None) -> None:
    """Step 2: kill every process of the sandbox at once through its cgroup, and wait for
    PID 1 (through its pidfd, which is then closed)."""
    if live is not None and live.link is not None:
        await live.link.aclose()
        live.link = None
    tree.kill(sandbox_id)
    if live is None or live.pidfd is None:
        return
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(live.pidfd, signal.SIGKILL)
    await wait_readable(live.pidfd, _GONE_TIMEOUT)
    os.close(live.pidfd)
    live.pidfd = None


async def remove_files(host: Host, sandbox_id: str) -> bool:
    """Step 6: everything of a sandbox on the host but its record and link. Whether its
    cgroup2 tree is gone: only then is every process of it surely dead."""

    def remove_mounted(path: Path, what: str) -> None:
        # Its tmpfs first: unmounted, its pages are freed at once and nothing is left to
        # walk (should it fail, the walk empties the tmpfs and the directory stays).
        try:
            disk.unmount(path)
        except OSError as exc:
            log.error("sandbox %s: its %s stays mounted: %s", sandbox_id, what, exc)
        shutil.rmtree(path, ignore_errors=True)

    def remove_cgroups(remove: Callable[[str], None]) -> bool:
        try:
            remove(sandbox_id)
        except OSError as exc:
            log.error("sandbox %s: its cgroups stay: %s", sandbox_id, exc)
            return False
        return True

    # First its cgroup2 tree: that kills what is left and waits till it is gone. Then, side
    # by side and off the event loop (a writable layer may hold many files), the rest.
    emptied = await asyncio.to_thread(remove_cgroups, host.tree.remove)
    await asyncio.gather(
        asyncio.to_thread(remove_cgroups, host.limits.remove),
        asyncio.to_thread(remove_mounted, host.runtime_dir / sandbox_id, "run directory"),
        asyncio.to_thread(remove_mounted, host.sandboxes_dir / sandbox_id, "disk"),
    )
    return emptied
