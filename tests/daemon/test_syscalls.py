"""daemon/linux/syscalls.py helpers that are more than one call, on the real kernel."""

from __future__ import annotations

import json
import os

from daemon.linux import syscalls


def test_close_all_but_keeps_exactly_what_it_is_told() -> None:
    """In a child: hundreds of fds open (as in a zygote with kept user namespaces), two kept
    among them, one kept below `first`: every other fd from `first` on is closed."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            opened = [os.open("/dev/null", os.O_RDONLY) for _ in range(300)]
            keep = {opened[10], opened[200], write}
            syscalls.close_all_but(keep)
            listing = os.open("/dev/null", os.O_RDONLY)  # the lowest free fd: listdir's own
            os.close(listing)
            left = {int(fd) for fd in os.listdir("/proc/self/fd")} - {listing}
            os.write(write, json.dumps({"left": sorted(left), "keep": sorted(keep)}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        seen = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert seen["left"] == sorted({0, 1, 2, *seen["keep"]})
