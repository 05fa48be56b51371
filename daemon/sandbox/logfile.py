"""The main command's log: each of its streams kept as timed records in two files that take
turns, so that the last `limit` bytes are always there and never much more.

Runs in: B, the supervisor (the writer), which holds the log directory open from before
pivot_root: it lies in the daemon's state directory, out of the sandbox's reach. The daemon
reads the same files (daemon/lifecycle/cmd_logs.py), while the command runs and after.

  LOG_DIR/stdout     the newer records: [time f64][length u32][bytes] ...
  LOG_DIR/stdout.1   the older ones; when `stdout` would pass `limit` bytes of output it
                     becomes `stdout.1` (the older one goes) and a new `stdout` is begun
  (and the same for stderr)

A reader that finds a record cut short (being written) stops before it and tries again later.
"""

from __future__ import annotations

import os
import struct
from typing import BinaryIO

HEADER = struct.Struct("<dI")  # when the bytes were read (seconds since the epoch), how many
OLDER = ".1"

Record = tuple[float, bytes]


class LogWriter:
    """One stream of the main command, into its two files in `dir_fd`."""

    def __init__(self, dir_fd: int, name: str, limit: int) -> None:
        self.dir_fd, self.name, self.limit = dir_fd, name, limit
        self.fd = self._begin()
        self.kept = 0  # bytes of output in the newer file
        self.size = 0  # its size: output and headers

    def write(self, data: bytes, now: float) -> None:
        data = data[-self.limit :]
        record = HEADER.pack(now, len(data)) + data
        # Past `limit` bytes of output, or (for many tiny records) twice that of file.
        if self.kept + len(data) > self.limit or self.size + len(record) > 2 * self.limit:
            self._turn()
        written = 0
        while written < len(record):
            written += os.write(self.fd, record[written:])
        self.kept += len(data)
        self.size += len(record)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _turn(self) -> None:
        """The newer file becomes the older, and a new one begins."""
        os.rename(self.name, self.name + OLDER, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        os.close(self.fd)
        self.fd = self._begin()
        self.kept = self.size = 0

    def _begin(self) -> int:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC
        return os.open(self.name, flags, 0o600, dir_fd=self.dir_fd)


def read_records(file: BinaryIO, offset: int) -> tuple[list[Record], int]:
    """The whole records in `file` from `offset`, and the offset after the last of them."""
    file.seek(offset)
    data = file.read()
    records, at = [], 0
    while at + HEADER.size <= len(data):
        when, length = HEADER.unpack_from(data, at)
        end = at + HEADER.size + length
        if end > len(data):
            break  # being written: the rest comes later
        records.append((when, data[at + HEADER.size : end]))
        at = end
    return records, offset + at
