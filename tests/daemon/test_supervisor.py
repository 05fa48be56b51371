"""The supervisor's loop on the host, without a sandbox: events that a round made stale."""

from __future__ import annotations

import os
import selectors

from daemon.sandbox.supervisor import RunningExec, Stream, Supervisor


def bare_supervisor() -> Supervisor:
    supervisor = Supervisor.__new__(Supervisor)
    supervisor.selector = selectors.DefaultSelector()
    supervisor.streams, supervisor.running, supervisor.deadlines = {}, {}, []
    supervisor.conn = None
    return supervisor


def test_a_stream_closed_earlier_in_the_round_is_skipped() -> None:
    # One select() can return both the SIGCHLD wakeup and the exec's pipe: handling the reap
    # closes the stream, and its own event must not then end the supervisor (a KeyError did).
    supervisor = bare_supervisor()
    read_end, write_end = os.pipe()
    os.close(write_end)
    stream = Stream("stdout", read_end, -1, 100)
    supervisor.streams[read_end] = (RunningExec("ex_1", 2, [stream]), stream)
    supervisor.selector.register(read_end, selectors.EVENT_READ, supervisor.on_output)
    stale = supervisor.selector.get_map()[read_end]
    supervisor.close_stream(read_end)  # as finish() does for a reaped exec
    supervisor.handle_round([(stale, selectors.EVENT_READ)])
    assert supervisor.streams == {}


def test_an_fd_number_reused_in_the_round_gets_its_new_handler() -> None:
    supervisor = bare_supervisor()
    first, first_w = os.pipe()
    supervisor.selector.register(first, selectors.EVENT_READ, supervisor.on_output)
    stale = supervisor.selector.get_map()[first]
    supervisor.selector.unregister(first)
    os.close(first)
    os.close(first_w)
    again, again_w = os.pipe()  # the lowest free number: most likely the same
    calls: list[int] = []
    supervisor.selector.register(again, selectors.EVENT_READ, lambda fd, ev: calls.append(fd))
    supervisor.handle_round([(stale, selectors.EVENT_READ)])
    assert calls == []  # the stale key is not the registered one, whatever its number
    for fd in (again, again_w):
        os.close(fd)
    supervisor.selector.close()
