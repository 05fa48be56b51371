"""The main command's log files on a real directory: the writer's two files that take turns,
and the daemon's cursor, which reads them whole and follows them across a turn."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon.lifecycle.cmd_logs import _Cursor
from daemon.sandbox.logfile import HEADER, LogWriter

LIMIT = 1000


@pytest.fixture
def log_dir(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield tmp_path, fd
    os.close(fd)


def data_of(pieces: list[tuple[float, str, bytes]]) -> bytes:
    return b"".join(data for _, _, data in pieces)


def test_the_last_limit_bytes_are_kept_in_two_files(log_dir: tuple[Path, int]) -> None:
    path, fd = log_dir
    writer = LogWriter(fd, "stdout", LIMIT)
    written = b""
    for i in range(500):
        chunk = f"line {i}\n".encode()
        writer.write(chunk, float(i))
        written += chunk
    writer.close()
    assert sorted(p.name for p in path.iterdir()) == ["stdout", "stdout.1"]
    # Each file holds at most LIMIT bytes of output, with a header per record.
    for name in ("stdout", "stdout.1"):
        assert (path / name).stat().st_size <= 2 * LIMIT
    cursor = _Cursor(path, "stdout")
    pieces = cursor.first(LIMIT)
    cursor.close()
    assert data_of(pieces) == written[-LIMIT:]
    assert pieces[-1] == (499.0, "stdout", b"line 499\n")


def test_a_write_larger_than_the_limit_keeps_its_end(log_dir: tuple[Path, int]) -> None:
    path, fd = log_dir
    writer = LogWriter(fd, "stderr", LIMIT)
    writer.write(bytes(range(256)) * 10, 1.0)
    writer.close()
    cursor = _Cursor(path, "stderr")
    assert data_of(cursor.first(LIMIT)) == (bytes(range(256)) * 10)[-LIMIT:]
    cursor.close()


def test_many_tiny_records_are_bounded_by_file_size(log_dir: tuple[Path, int]) -> None:
    path, fd = log_dir
    writer = LogWriter(fd, "stdout", LIMIT)
    for i in range(5000):
        writer.write(b"x", float(i))
    writer.close()
    total = sum(p.stat().st_size for p in path.iterdir())
    assert total <= 2 * (2 * LIMIT)
    assert (path / "stdout").stat().st_size % (HEADER.size + 1) == 0


def test_a_follower_goes_on_across_turns(log_dir: tuple[Path, int]) -> None:
    path, fd = log_dir
    writer = LogWriter(fd, "stdout", LIMIT)
    cursor = _Cursor(path, "stdout")
    assert cursor.first(LIMIT) == []  # before anything was written
    seen, written = b"", b""
    for i in range(300):
        chunk = f"{i:04d}\n".encode()
        writer.write(chunk, float(i))
        written += chunk
        if i % 50 == 0:  # read now and then: the writer turns between some of the reads
            seen += data_of(cursor.more())
    seen += data_of(cursor.more())
    seen += data_of(cursor.more())  # the turn seen at the end of the older file
    writer.close()
    cursor.close()
    assert seen == written


def test_a_record_being_written_is_left_for_later(log_dir: tuple[Path, int]) -> None:
    path, fd = log_dir
    writer = LogWriter(fd, "stdout", LIMIT)
    writer.write(b"whole\n", 1.0)
    writer.close()
    with open(path / "stdout", "ab") as f:
        f.write(HEADER.pack(2.0, 10) + b"half")  # 4 of 10 bytes so far
    cursor = _Cursor(path, "stdout")
    assert cursor.first(LIMIT) == [(1.0, "stdout", b"whole\n")]
    with open(path / "stdout", "ab") as f:
        f.write(b"-done\n")
    assert cursor.more() == [(2.0, "stdout", b"half-done\n")]
    cursor.close()
