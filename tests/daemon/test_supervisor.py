"""The supervisor's loop on the host, without a sandbox: events that a batch made stale."""

from __future__ import annotations

import os
import selectors

from daemon.supervisor import Stream, Supervisor


def test_a_stream_closed_earlier_in_the_batch_is_skipped() -> None:
    # One select() can return both the SIGCHLD wakeup and the exec's pipe: handling the reap
    # closes the stream, and its own event must not then end the supervisor (a KeyError did).
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.selector = selectors.DefaultSelector()
    read_end, write_end = os.pipe()
    os.close(write_end)
    supervisor.streams = {read_end: Stream(read_end, -1, 100)}
    supervisor.selector.register(read_end, selectors.EVENT_READ, "stream")
    supervisor.close_stream(read_end)  # as finish() does for a reaped exec
    supervisor.pump(read_end)
    assert supervisor.streams == {}
    supervisor.selector.close()
