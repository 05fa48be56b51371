"""The warm pool: sandboxes started on the default options before anyone asks, so that a
create asking for no more than a name, host name, labels, env and ttl takes one at once.

The pool is bookkeeping and one refill task. The sandboxes in it are real ones, made and
destroyed by the service like any other and stored as `warming`, then `pooled`
(daemon/lifecycle/states.py), which hides them from the API until a create takes one. A
restart adopts them like any sandbox; a graceful stop destroys them, since nobody else could.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable

from daemon.shapes import SandboxCreate

log = logging.getLogger(__name__)

# What a create may ask of a pooled sandbox: what the daemon can give it after it started.
TAKEN_AS_ASKED = frozenset({"name", "hostname", "labels", "env", "ttl_seconds"})
_DEFAULTS = SandboxCreate().model_dump(mode="json", exclude=set(TAKEN_AS_ASKED))
_RETRY_SECONDS = 1.0
# A refill waits this long after the last take: building a sandbox costs both cores for some
# 20 ms, and the asker's first requests (an exec, say) come right after its create.
_REFILL_PAUSE = 0.05


def poolable(spec: SandboxCreate) -> bool:
    """Whether a pooled sandbox can serve this request: the defaults in all else."""
    return spec.model_dump(mode="json", exclude=set(TAKEN_AS_ASKED)) == _DEFAULTS


class Pool:
    """`size` pooled sandboxes kept ready: `fill` makes one (its id), `drain` destroys one."""

    def __init__(
        self,
        size: int,
        fill: Callable[[], Awaitable[str]],
        drain: Callable[[str], Awaitable[None]],
    ) -> None:
        self.size = size
        self.ready: deque[str] = deque()  # oldest first: the next create takes the oldest
        self.unwanted: deque[str] = deque()  # pooled but unusable: to be destroyed
        self._fill, self._drain = fill, drain
        self._wanted = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._last_taken = 0.0

    def start(self) -> None:
        """Refill in the background (and trim what a restart adopted past `size`)."""
        self._task = asyncio.create_task(self._keep())

    async def stop(self) -> None:
        """Destroy every pooled sandbox; a refill under way finishes first, so that nothing
        is left half made."""
        self._stopping = True
        self._wanted.set()
        if self._task is not None:
            await self._task

    def add(self, sandbox_id: str) -> None:
        """A pooled sandbox this daemon adopted at start."""
        self.ready.append(sandbox_id)

    def next(self) -> str | None:
        return self.ready[0] if self.ready else None

    def taken(self, sandbox_id: str) -> None:
        """It is no longer pooled (a create took it, or it died): make another."""
        with contextlib.suppress(ValueError):
            self.ready.remove(sandbox_id)
        self._last_taken = asyncio.get_running_loop().time()
        self._wanted.set()

    def discard(self, sandbox_id: str) -> None:
        """It cannot serve a create (it could not be configured): destroy it, make another."""
        self.taken(sandbox_id)
        self.unwanted.append(sandbox_id)

    async def _keep(self) -> None:
        while True:
            target = 0 if self._stopping else self.size
            if self.unwanted:
                await self._drain_one(self.unwanted.popleft())
            elif len(self.ready) > target:
                await self._drain_one(self.ready.pop())
            elif self._stopping:
                return
            elif len(self.ready) < target:
                pause = self._last_taken + _REFILL_PAUSE - asyncio.get_running_loop().time()
                if pause > 0:
                    await asyncio.sleep(pause)
                    continue
                await self._fill_one()
            else:
                self._wanted.clear()
                await self._wanted.wait()

    async def _fill_one(self) -> None:
        try:
            self.ready.append(await self._fill())
        except Exception as exc:  # the task must go on, whatever the failure
            log.warning("the pool could not start a sandbox: %s; trying again", exc)
            if not self._stopping:
                self._wanted.clear()
            with contextlib.suppress(TimeoutError):  # a stop need not wait out the pause
                await asyncio.wait_for(self._wanted.wait(), _RETRY_SECONDS)

    async def _drain_one(self, sandbox_id: str) -> None:
        try:
            await self._drain(sandbox_id)
        except Exception as exc:  # the task must go on, and a stop must finish
            log.error("pooled sandbox %s: could not destroy it: %s", sandbox_id, exc)
