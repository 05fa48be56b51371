"""A sandbox's disk is bounded: its writable layer by limits.disk_bytes (or the daemon's
default), its /tmp and /dev/shm by the daemon's caps; a write past them fails with ENOSPC
inside, the host's disk does not fill, and the bound survives a restart and the pool.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from daemon.config import ConfigError, load_config, variable
from tests.conftest import Daemon, Daemons, wait_for

MiB = 1 << 20
ENOSPC = "No space left on device"


pytestmark = pytest.mark.usefixtures("nothing_carries_over")


def sizes(daemon: Daemon, ref: str, *paths: str) -> dict[str, int]:
    """The size in bytes of the filesystem at each path, as df inside the sandbox says."""
    result = daemon.sh(ref, f"df -B1 --output=target,size {' '.join(paths)}")
    assert result["exit_code"] == 0, result
    rows = [line.split() for line in result["stdout"].splitlines()[1:]]
    return {target: int(size) for target, size in rows}


def write(daemon: Daemon, ref: str, path: str, mib: int) -> dict[str, Any]:
    return daemon.sh(ref, f"dd if=/dev/zero of={path} bs=1M count={mib} status=none")


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def mounted_anywhere(path: Path) -> list[str]:
    """The processes whose mount namespace has something mounted on `path`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            mountinfo = Path(f"/proc/{pid}/mountinfo").read_text()
        except OSError:
            continue
        if any(line.split()[4] == str(path) for line in mountinfo.splitlines()):
            found.append(pid)
    return found


def test_a_write_past_disk_bytes_fails_and_spares_the_host(daemon: Daemon) -> None:
    box = daemon.create(limits={"disk_bytes": 64 * MiB})
    assert box["limits"]["disk_bytes"] == 64 * MiB
    assert sizes(daemon, box["id"], "/")["/"] == 64 * MiB

    before = free_bytes(daemon.state_dir)
    result = write(daemon, box["id"], "/root/big", 200)
    after = free_bytes(daemon.state_dir)
    assert result["exit_code"] != 0 and ENOSPC in result["stderr"], result
    assert before - after < 64 * MiB
    # The host's side: the bytes went to the sandbox's tmpfs, not the state directory's disk.
    stat = os.statvfs(daemon.state_dir / "sandboxes" / box["id"])
    assert stat.f_blocks * stat.f_frsize == 64 * MiB

    # The daemon, another sandbox and the full one itself go on working.
    other = daemon.create()
    assert daemon.sh(other["id"], "echo fine > /root/f && cat /root/f")["stdout"] == "fine\n"
    again = daemon.sh(box["id"], "rm /root/big && echo room > /root/small && cat /root/small")
    assert again["stdout"] == "room\n", again


def test_the_default_disk_and_the_caps_of_tmp_and_shm(daemon: Daemon) -> None:
    box = daemon.create()
    assert box["limits"]["disk_bytes"] == 1 << 30  # the default, reported as applied
    found = sizes(daemon, box["id"], "/", "/tmp", "/dev/shm")
    assert found == {"/": 1 << 30, "/tmp": 256 * MiB, "/dev/shm": 64 * MiB}
    result = write(daemon, box["id"], "/dev/shm/big", 80)
    assert result["exit_code"] != 0 and ENOSPC in result["stderr"], result


def test_tmp_and_shm_hold_no_more_than_disk_bytes(daemon: Daemon) -> None:
    box = daemon.create(limits={"disk_bytes": 16 * MiB})
    found = sizes(daemon, box["id"], "/", "/tmp", "/dev/shm")
    assert found == {"/": 16 * MiB, "/tmp": 16 * MiB, "/dev/shm": 16 * MiB}
    for path in ("/tmp/big", "/dev/shm/big", "/big"):
        result = write(daemon, box["id"], path, 20)
        assert result["exit_code"] != 0 and ENOSPC in result["stderr"], (path, result)


def test_the_daemon_settings(daemons: Daemons) -> None:
    other = daemons.new(
        "--default-disk-bytes", str(48 * MiB),
        "--tmp-bytes", str(8 * MiB),
        "--shm-bytes", str(2 * MiB),
    )  # fmt: skip
    try:
        box = other.create()
        assert box["limits"]["disk_bytes"] == 48 * MiB
        found = sizes(other, box["id"], "/", "/tmp", "/dev/shm")
        assert found == {"/": 48 * MiB, "/tmp": 8 * MiB, "/dev/shm": 2 * MiB}
        asked = other.create(limits={"disk_bytes": 128 * MiB})
        found = sizes(other, asked["id"], "/", "/tmp", "/dev/shm")
        assert found == {"/": 128 * MiB, "/tmp": 8 * MiB, "/dev/shm": 2 * MiB}
    finally:
        other.destroy_all()
        other.stop()


@pytest.mark.parametrize("disk_bytes", [0, MiB - 1, 1 << 45, "1G", MiB + 0.5])
def test_a_disk_out_of_bounds_is_refused(daemon: Daemon, disk_bytes: object) -> None:
    response = daemon.client.post("/sandboxes", json={"limits": {"disk_bytes": disk_bytes}})
    assert response.status_code == 422, response.text
    assert "disk_bytes" in response.text
    assert daemon.client.get("/sandboxes").json()["items"] == []


def test_a_disk_larger_than_memory_is_refused_and_the_default_fits(daemon: Daemon) -> None:
    limits = {"memory_bytes": 64 * MiB, "disk_bytes": 65 * MiB}
    response = daemon.client.post("/sandboxes", json={"limits": limits})
    assert response.status_code == 422 and "disk_bytes" in response.text, response.text
    box = daemon.create(limits={"memory_bytes": 64 * MiB})
    assert box["limits"]["disk_bytes"] == 32 * MiB
    assert sizes(daemon, box["id"], "/")["/"] == 32 * MiB
    # Its files fail with ENOSPC before they fill its memory, and it lives on.
    result = write(daemon, box["id"], "/root/big", 40)
    assert result["exit_code"] != 0 and ENOSPC in result["stderr"], result
    assert daemon.sh(box["id"], "rm /root/big; echo alive")["stdout"] == "alive\n"


def test_destroy_leaves_no_mount(daemon: Daemon) -> None:
    """Its disk and its run directory (the mailbox) are each a tmpfs on the host while it
    runs, and neither is left mounted anywhere once it is destroyed."""
    box = daemon.create(limits={"disk_bytes": 32 * MiB})
    path = daemon.state_dir / "sandboxes" / box["id"]
    run = daemon.run_dir / "sandboxes" / box["id"]
    assert mounted_anywhere(path), "its tmpfs is mounted on the host"
    host = Path("/proc/self/mountinfo").read_text().splitlines()
    assert [line.split(" - ")[1].split()[0] for line in host if line.split()[4] == str(run)] == [
        "tmpfs"
    ]
    write(daemon, box["id"], "/root/data", 8)
    assert daemon.sh(box["id"], "true")["exit_code"] == 0  # an exec, through the mailbox
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    daemon.settled()  # its removal comes after the answer
    assert not path.exists() and not run.exists()
    assert mounted_anywhere(path) == [] and mounted_anywhere(run) == []


def test_the_disk_and_its_files_survive_a_restart(daemon: Daemon) -> None:
    box = daemon.create(limits={"disk_bytes": 32 * MiB})
    assert write(daemon, box["id"], "/root/kept", 4)["exit_code"] == 0
    daemon.stop(signal.SIGKILL)
    daemon.start()
    assert daemon.sh(box["id"], "wc -c < /root/kept")["stdout"] == f"{4 * MiB}\n"
    assert sizes(daemon, box["id"], "/")["/"] == 32 * MiB
    result = write(daemon, box["id"], "/root/more", 40)
    assert result["exit_code"] != 0 and ENOSPC in result["stderr"], result
    record = daemon.client.get(f"/sandboxes/{box['id']}").json()
    assert record["limits"]["disk_bytes"] == 32 * MiB
    path = daemon.state_dir / "sandboxes" / box["id"]
    assert daemon.client.delete(f"/sandboxes/{box['id']}").status_code == 204
    daemon.settled()
    assert mounted_anywhere(path) == []


def test_a_pooled_sandbox_has_the_default_disk(daemons: Daemons) -> None:
    pooled = daemons.new("--pool-size", "1", "--default-disk-bytes", str(40 * MiB))
    try:
        assert wait_for(lambda: pooled.client.get("/info").json()["pool"]["ready"] == 1, 20)
        box = pooled.create(hostname="taken")
        assert box["limits"]["disk_bytes"] == 40 * MiB
        assert sizes(pooled, box["id"], "/")["/"] == 40 * MiB
        # The take wrote its identity files into the pooled sandbox's tmpfs.
        assert pooled.sh(box["id"], "cat /etc/hostname")["stdout"] == "taken\n"
    finally:
        pooled.destroy_all()
        pooled.stop()


@pytest.mark.parametrize("name", ["default_disk_bytes", "tmp_bytes", "shm_bytes"])
def test_the_settings_are_bounded(name: str) -> None:
    env_name = variable(name)
    assert getattr(load_config({}, {env_name: str(8 * MiB)}), name) == 8 * MiB
    for bad in ("0", str(MiB - 1), str(1 << 45), "1G"):
        with pytest.raises(ConfigError, match=env_name):
            load_config({}, {env_name: bad})
