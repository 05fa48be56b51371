"""A running sandbox's files over HTTP: every endpoint and status, paths resolved in the
sandbox's root (a hostile sandbox's symlinks, `..` and racing swaps never reach a host path),
owners and modes as seen inside, hostile tars refused with nothing written, the disk limit,
and large transfers streamed with the daemon's memory flat.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Daemon

MiB = 1 << 20
GiB = 1 << 30

pytestmark = pytest.mark.usefixtures("nothing_carries_over")


@pytest.fixture
def box(daemon: Daemon) -> Iterator[str]:
    sandbox = daemon.create()
    yield sandbox["id"]
    daemon.client.delete(f"/sandboxes/{sandbox['id']}")


def put(daemon: Daemon, ref: str, path: str, data: bytes, **params: Any) -> Any:
    # In pieces: httpx sends one large bytes body by slicing it again and again (quadratic).
    pieces = (data[i : i + MiB] for i in range(0, len(data), MiB)) if data else iter([b""])
    return daemon.client.put(
        f"/sandboxes/{ref}/files",
        params={"path": path, **params},
        content=pieces,
        headers={"Content-Length": str(len(data))},
    )


def get(daemon: Daemon, ref: str, path: str) -> Any:
    return daemon.client.get(f"/sandboxes/{ref}/files", params={"path": path})


def stat(daemon: Daemon, ref: str, path: str) -> Any:
    return daemon.client.get(f"/sandboxes/{ref}/files/stat", params={"path": path})


def inside(daemon: Daemon, ref: str, script: str) -> str:
    result = daemon.sh(ref, script)
    assert result["exit_code"] == 0, result
    return str(result["stdout"])


def tar_of(*members: tuple[tarfile.TarInfo, bytes | None]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


# -- the endpoints ------------------------------------------------------------------------------


def test_a_binary_file_goes_in_and_out_byte_exact(daemon: Daemon, box: str) -> None:
    data = bytes(range(256)) * 1000 + os.urandom(100_000)
    created = put(daemon, box, "/tmp/a/b/blob.bin", data, mode="0640")
    assert created.status_code == 201, created.text
    entry = created.json()
    assert entry | {"mtime": None} == {
        "path": "/tmp/a/b/blob.bin", "name": "blob.bin", "type": "file", "size": len(data),
        "mode": "0640", "uid": 0, "gid": 0, "mtime": None, "target": None,
    }  # fmt: skip
    back = get(daemon, box, "/tmp/a/b/blob.bin")
    assert back.status_code == 200
    assert back.headers["content-type"] == "application/octet-stream"
    assert back.headers["content-length"] == str(len(data))
    assert back.content == data
    # Seen inside: the same bytes, owned by root, the mode asked for; parents made.
    digest = inside(
        daemon, box, "sha256sum /tmp/a/b/blob.bin; stat -c '%u %g %a' /tmp/a/b/blob.bin /tmp/a"
    )
    assert digest.split()[0] == hashlib.sha256(data).hexdigest()
    assert digest.splitlines()[1:] == ["0 0 640", "0 0 755"]

    replaced = put(daemon, box, "/tmp/a/b/blob.bin", b"new")
    assert replaced.status_code == 200 and replaced.json()["size"] == 3
    assert replaced.json()["mode"] == "0644"  # the default
    assert get(daemon, box, "/tmp/a/b/blob.bin").content == b"new"
    assert inside(daemon, box, "ls -a /tmp/a/b") == ".\n..\nblob.bin\n"  # no temp file left


def test_owners_and_modes_as_asked_as_seen_inside(daemon: Daemon, box: str) -> None:
    entry = put(daemon, box, "/home/x.sh", b"#!/bin/sh\n", mode="4755", uid=1000, gid=50).json()
    assert (entry["uid"], entry["gid"], entry["mode"]) == (1000, 50, "4755")
    assert inside(daemon, box, "stat -c '%u %g %a' /home/x.sh") == "1000 50 4755\n"
    # On the host: the sandbox's range, never a host id.
    assert put(daemon, box, "/tmp/y", b"", uid=70000).status_code == 422
    made = daemon.client.post(
        f"/sandboxes/{box}/files/mkdir", json={"path": "/srv/d", "mode": "0700", "uid": 7}
    )
    assert made.status_code == 201 and made.json()["mode"] == "0700" and made.json()["uid"] == 7
    assert inside(daemon, box, "stat -c '%u %g %a' /srv/d") == "7 0 700\n"


def test_stat_list_mkdir_move_delete(daemon: Daemon, box: str) -> None:
    base = f"/sandboxes/{box}/files"
    inside(daemon, box, "mkdir -p /w/d/e && echo hi > /w/d/f && ln -s d/f /w/link")
    link = stat(daemon, box, "/w/link").json()
    assert link["type"] == "symlink" and link["target"] == "d/f"
    assert stat(daemon, box, "/w/d").json()["type"] == "dir"
    assert stat(daemon, box, "/").json()["path"] == "/"

    listed = daemon.client.get(f"{base}/list", params={"path": "/w"}).json()["items"]
    assert [e["path"] for e in listed] == ["/w/d", "/w/link"]
    deep = daemon.client.get(f"{base}/list", params={"path": "/w", "depth": 2}).json()["items"]
    assert [e["path"] for e in deep] == ["/w/d", "/w/d/e", "/w/d/f", "/w/link"]

    mkdir = daemon.client.post(f"{base}/mkdir", json={"path": "/w/n/m"})
    assert mkdir.status_code == 201
    assert daemon.client.post(f"{base}/mkdir", json={"path": "/w/n/m"}).status_code == 200
    again = daemon.client.post(f"{base}/mkdir", json={"path": "/w/n/m", "parents": False})
    assert again.status_code == 409
    orphan = daemon.client.post(f"{base}/mkdir", json={"path": "/w/no/m", "parents": False})
    assert orphan.status_code == 404

    moved = daemon.client.post(f"{base}/move", json={"from": "/w/d/f", "to": "/w/n/g"})
    assert moved.status_code == 200 and moved.json()["path"] == "/w/n/g"
    assert inside(daemon, box, "cat /w/n/g") == "hi\n"
    gone = daemon.client.post(f"{base}/move", json={"from": "/w/d/f", "to": "/w/x"})
    assert gone.status_code == 404

    assert daemon.client.delete(base, params={"path": "/w/n"}).status_code == 409  # not empty
    assert daemon.client.delete(base, params={"path": "/w/link"}).status_code == 204
    assert daemon.client.delete(base, params={"path": "/w/n", "recursive": True}).status_code == 204
    assert inside(daemon, box, "ls /w") == "d\n"
    assert daemon.client.delete(base, params={"path": "/w/n"}).status_code == 404


def test_bad_paths_and_wrong_kinds(daemon: Daemon, box: str) -> None:
    base = f"/sandboxes/{box}/files"
    assert get(daemon, box, "relative/path").status_code == 422
    assert get(daemon, box, "/etc/\0passwd").status_code == 422
    assert get(daemon, box, "/no/such/file").status_code == 404
    assert get(daemon, box, "/etc").status_code == 409  # a directory
    assert get(daemon, box, "/dev/zero").status_code == 409  # not a regular file
    assert put(daemon, box, "/etc", b"x").status_code == 409
    assert put(daemon, box, "/etc/hostname/x", b"x").status_code == 409  # a file as a dir
    assert daemon.client.get(f"{base}/list", params={"path": "/etc/hostname"}).status_code == 409
    assert put(daemon, box, "/tmp/m", b"x", mode="999").status_code == 422
    assert daemon.client.delete(base, params={"path": "/"}).status_code == 409
    assert get(daemon, "sb_0000000000000000", "/etc/hostname").status_code == 404


def test_a_sandbox_not_running_is_a_409(daemon: Daemon) -> None:
    ended = daemon.create(cmd=["true"])
    daemon.await_state(f"/sandboxes/{ended['id']}", "exited")
    assert get(daemon, ended["id"], "/etc/hostname").status_code == 409
    assert put(daemon, ended["id"], "/tmp/x", b"x").status_code == 409


def test_read_only_places_are_409_and_untouched(daemon: Daemon, tmp_path: Path) -> None:
    source = tmp_path / "ro"
    source.mkdir()
    (source / "kept").write_text("host")
    ref = daemon.create(mounts=[{"source": str(source), "target": "/ro"}])["id"]
    assert put(daemon, ref, "/ro/kept", b"changed").status_code == 409
    assert put(daemon, ref, "/ro/new", b"new").status_code == 409
    assert (
        daemon.client.delete(f"/sandboxes/{ref}/files", params={"path": "/ro/kept"}).status_code
        == 409
    )
    assert put(daemon, ref, "/proc/sys/kernel/hostname", b"x").status_code == 409
    tar = tar_of((member("new"), b"new"))
    refused = daemon.client.put(f"/sandboxes/{ref}/archive", params={"path": "/ro"}, content=tar)
    assert refused.status_code == 409
    assert sorted(os.listdir(source)) == ["kept"] and (source / "kept").read_text() == "host"


def test_a_full_disk_is_507_with_nothing_partial(daemon: Daemon) -> None:
    ref = daemon.create(limits={"disk_bytes": 32 * MiB})["id"]
    before = inside(daemon, ref, "ls -a /srv /tmp")
    response = put(daemon, ref, "/srv/big", b"\1" * (64 * MiB))
    assert response.status_code == 507, response.text
    assert response.headers["content-type"] == "application/problem+json"
    tmp = put(daemon, ref, "/tmp/big", b"\1" * (64 * MiB))
    assert tmp.status_code == 507
    assert inside(daemon, ref, "ls -a /srv /tmp") == before
    # The space is back: a file that fits goes in.
    assert put(daemon, ref, "/srv/small", b"\1" * (8 * MiB)).status_code == 201


# -- a hostile sandbox --------------------------------------------------------------------------


def test_symlinks_and_dotdot_stay_in_the_sandbox(daemon: Daemon, box: str) -> None:
    host_dir = daemon.root / "host-only"
    host_dir.mkdir()
    (host_dir / "secret").write_text("HOST")
    assert Path("/etc/shadow").exists()  # on the host; the sandbox's /etc has none
    inside(
        daemon,
        box,
        f"ln -s /etc/shadow /tmp/x; ln -s {host_dir} /tmp/h; "
        f"ln -s ../../../../../../..{host_dir} /tmp/rel; ln -s /proc/1/root /tmp/magic",
    )
    for path in ("/tmp/x", "/tmp/h/secret", "/tmp/rel/secret", f"/../../..{host_dir}/secret"):
        assert get(daemon, box, path).status_code == 404, path
    assert get(daemon, box, "/tmp/magic/etc/hostname").status_code in (404, 409)
    # A write through a dangling link makes nothing; once the sandbox has a directory of
    # that name, writes through the links land there.
    assert put(daemon, box, "/tmp/h/pwned", b"x").status_code in (404, 409)
    inside(daemon, box, f"mkdir -p {host_dir}")
    assert put(daemon, box, "/tmp/h/pwned", b"x").status_code == 201
    assert put(daemon, box, "/tmp/rel/pwned2", b"x").status_code == 201
    archive = daemon.client.get(f"/sandboxes/{box}/archive", params={"path": "/tmp/h/secret"})
    assert archive.status_code == 404
    assert sorted(os.listdir(host_dir)) == ["secret"]
    assert inside(daemon, box, f"cat {host_dir}/pwned {host_dir}/pwned2") == "xx"


def test_a_directory_swapped_for_a_symlink_in_a_loop_never_leads_out(
    daemon: Daemon, box: str
) -> None:
    host_dir = daemon.root / "host-race"
    host_dir.mkdir()
    (host_dir / "secret").write_text("HOST")
    # A process inside swaps /tmp/r/d between a directory (holding its own `secret`) and a
    # symlink to the host's directory's path, as fast as it can.
    swap = (
        "mkdir -p /tmp/r; while true; do mkdir /tmp/r/d 2>/dev/null; "
        "echo sandbox > /tmp/r/d/secret 2>/dev/null; rm -rf /tmp/r/d; "
        f"ln -s {host_dir} /tmp/r/d; rm -f /tmp/r/d; done"
    )
    daemon.exec(box, ["sh", "-c", swap], wait=False)
    seen: set[bytes] = set()
    upload = tar_of((member("d/untarred"), b"T"))
    deadline = time.monotonic() + 4
    rounds = 0
    while time.monotonic() < deadline:
        rounds += 1
        put(daemon, box, "/tmp/r/d/uploaded", b"U" * 1000)
        got = get(daemon, box, "/tmp/r/d/secret")
        if got.status_code == 200:
            seen.add(got.content)
        daemon.client.put(f"/sandboxes/{box}/archive", params={"path": "/tmp/r"}, content=upload)
        tar = daemon.client.get(f"/sandboxes/{box}/archive", params={"path": "/tmp/r/d"})
        assert b"HOST" not in tar.content
        listed = daemon.client.get(f"/sandboxes/{box}/files/list", params={"path": "/tmp/r/d"})
        if listed.status_code == 200:  # the host's secret is 4 bytes, the sandbox's 8
            assert all(e["size"] != 4 for e in listed.json()["items"] if e["name"] == "secret")
    assert rounds > 5
    assert seen <= {b"sandbox\n", b""}
    assert sorted(os.listdir(host_dir)) == ["secret"]
    assert (host_dir / "secret").read_text() == "HOST"


# -- tar ----------------------------------------------------------------------------------------


def test_a_tree_goes_out_and_in_as_tar(daemon: Daemon, box: str) -> None:
    inside(
        daemon,
        box,
        "mkdir -p /src/tree/empty /src/tree/sub && printf abc > /src/tree/sub/f && "
        "chmod 0600 /src/tree/sub/f && chown 1000:1001 /src/tree/sub/f && "
        "ln -s sub/f /src/tree/link && chmod 0700 /src/tree/empty",
    )
    out = daemon.client.get(f"/sandboxes/{box}/archive", params={"path": "/src/tree"})
    assert out.status_code == 200 and out.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(out.content)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert sorted(members) == ["tree", "tree/empty", "tree/link", "tree/sub", "tree/sub/f"]
        f = members["tree/sub/f"]
        assert (f.uid, f.gid, f.mode, f.size) == (1000, 1001, 0o600, 3)
        assert members["tree/empty"].isdir() and members["tree/empty"].mode == 0o700
        assert members["tree/link"].issym() and members["tree/link"].linkname == "sub/f"
        extracted = tar.extractfile(f)
        assert extracted is not None and extracted.read() == b"abc"

    inside(daemon, box, "mkdir /dst")
    put_in = daemon.client.put(
        f"/sandboxes/{box}/archive", params={"path": "/dst"}, content=gzip.compress(out.content)
    )
    assert put_in.status_code == 204, put_in.text
    seen = inside(
        daemon,
        box,
        "cd /dst/tree && stat -c '%n %u %g %a %F' empty sub/f link && readlink link && cat link",
    )
    assert seen.splitlines() == [
        "empty 0 0 700 directory", "sub/f 1000 1001 600 regular file",
        "link 0 0 777 symbolic link", "sub/f", "abc",
    ]  # fmt: skip
    single = daemon.client.get(f"/sandboxes/{box}/archive", params={"path": "/src/tree/sub/f"})
    with tarfile.open(fileobj=io.BytesIO(single.content)) as tar:
        assert tar.getnames() == ["f"]
    assert (
        daemon.client.get(f"/sandboxes/{box}/archive", params={"path": "/nope"}).status_code == 404
    )
    missing = daemon.client.put(f"/sandboxes/{box}/archive", params={"path": "/nope"}, content=b"")
    assert missing.status_code == 404


@pytest.mark.parametrize(
    "hostile",
    [
        member("/abs"),
        member("../up"),
        member("a/../../up"),
        member("link", tarfile.SYMTYPE, linkname="../../etc"),
        member("link", tarfile.SYMTYPE, linkname="/etc/passwd"),
        member("hard", tarfile.LNKTYPE, linkname="../outside"),
        member("hard", tarfile.LNKTYPE, linkname="/etc/passwd"),
        member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3),
        member("blk", tarfile.BLKTYPE, devmajor=8, devminor=0),
        member("big-uid", uid=1 << 20),
    ],
    ids=[
        "absolute",
        "dotdot",
        "dotdot-inner",
        "symlink-out",
        "symlink-abs",
        "hardlink-out",
        "hardlink-abs",
        "char-device",
        "block-device",
        "unmapped-uid",
    ],
)
def test_hostile_tars_are_refused_with_nothing_written(
    daemon: Daemon, box: str, hostile: tarfile.TarInfo
) -> None:
    inside(daemon, box, "mkdir -p /in/dir")
    data = b"x" if hostile.isreg() else None
    # A harmless member first: it too must not be written.
    body = tar_of((member("first"), b"first"), (hostile, data))
    response = daemon.client.put(
        f"/sandboxes/{box}/archive", params={"path": "/in/dir"}, content=body
    )
    assert response.status_code == 422, response.text
    assert inside(daemon, box, "ls -a /in /in/dir; ls /etc/passwd") == (
        "/in:\n.\n..\ndir\n\n/in/dir:\n.\n..\n/etc/passwd\n"
    )
    garbage = daemon.client.put(
        f"/sandboxes/{box}/archive", params={"path": "/in/dir"}, content=b"not a tar" * 100
    )
    assert garbage.status_code == 422


def test_an_archive_past_the_disk_limit_is_507_with_nothing_left(daemon: Daemon) -> None:
    ref = daemon.create(limits={"disk_bytes": 32 * MiB})["id"]
    inside(daemon, ref, "mkdir /in")
    body = tar_of((member("small"), b"s"), (member("big"), b"\1" * (20 * MiB)))
    response = daemon.client.put(f"/sandboxes/{ref}/archive", params={"path": "/in"}, content=body)
    assert response.status_code == 507, response.text
    assert inside(daemon, ref, "ls -a /in") == ".\n..\n"


# -- size and memory ----------------------------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


def test_a_gib_up_and_down_keeps_the_daemon_flat(daemon: Daemon, tmp_path: Path) -> None:
    """1 GiB each way through a writable bind (on the host's disk, not in memory); the
    daemon's peak resident memory grows by less than 64 MiB, and the bytes are exact."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    # A bind maps host uid N to N inside: root's directory is root's inside.
    ref = daemon.create(mounts=[{"source": str(data_dir), "target": "/data", "read_only": False}])
    assert daemon.proc is not None
    pid = daemon.proc.pid
    block = os.urandom(MiB)
    expected = hashlib.sha256()

    def body() -> Iterator[bytes]:
        for i in range(GiB // MiB):
            chunk = block[i % 997 :] + block[: i % 997]
            expected.update(chunk)
            yield chunk

    rss_before = memory_kib(pid, "VmRSS")
    response = daemon.client.put(
        f"/sandboxes/{ref['id']}/files", params={"path": "/data/big"}, content=body(), timeout=600
    )
    assert response.status_code == 201, response.text
    assert (data_dir / "big").stat().st_size == GiB
    got = hashlib.sha256()
    size = 0
    with daemon.client.stream(
        "GET", f"/sandboxes/{ref['id']}/files", params={"path": "/data/big"}, timeout=600
    ) as download:
        assert download.status_code == 200
        for chunk in download.iter_bytes():
            got.update(chunk)
            size += len(chunk)
    assert size == GiB and got.hexdigest() == expected.hexdigest()
    growth_kib = memory_kib(pid, "VmHWM") - rss_before
    assert growth_kib < 64 * 1024, f"the daemon's peak RSS grew by {growth_kib} KiB"
    os.unlink(data_dir / "big")


def test_a_writable_bind_takes_every_operation_with_ids_as_inside(
    daemon: Daemon, tmp_path: Path
) -> None:
    source = tmp_path / "rw"
    source.mkdir()
    ref = daemon.create(mounts=[{"source": str(source), "target": "/rw", "read_only": False}])["id"]
    base = f"/sandboxes/{ref}/files"
    assert put(daemon, ref, "/rw/a/f", b"data", uid=1000, gid=1000).status_code == 201
    assert daemon.client.post(f"{base}/mkdir", json={"path": "/rw/d"}).status_code == 201
    moved = daemon.client.post(f"{base}/move", json={"from": "/rw/a/f", "to": "/rw/d/g"})
    assert moved.status_code == 200
    tar = tar_of((member("t/x", uid=5, gid=6), b"x"))
    assert (
        daemon.client.put(
            "/sandboxes/" + ref + "/archive", params={"path": "/rw"}, content=tar
        ).status_code
        == 204
    )
    # On the host, a bind's ids are the ids inside (uid N inside is uid N on the host's disk).
    owners = {
        p.relative_to(source).as_posix(): (p.lstat().st_uid, p.lstat().st_gid)
        for p in source.rglob("*")
    }
    assert owners == {"a": (0, 0), "d": (0, 0), "d/g": (1000, 1000), "t": (0, 0), "t/x": (5, 6)}
    assert (
        daemon.client.delete(base, params={"path": "/rw/d", "recursive": True}).status_code == 204
    )
    assert daemon.client.delete(base, params={"path": "/rw/t/x"}).status_code == 204
    assert sorted(p.name for p in source.rglob("*")) == ["a", "t"]


# -- a hostile sandbox racing the temp names ----------------------------------------------------

# Runs inside, as root inside: over every entry of TARGET that KIND picks ("temp": the
# daemon's `.NAME.sandboxd-HEX` names; "src": the names starting with src), renames a new
# symlink to the host path CANARY, as fast as it can, until STOP exists. Counts its swaps in
# COUNT.
SWAPPER = r"""
import os, sys, time
target, kind, canary, stop, count = sys.argv[1:6]
swaps = 0
open(count, "w").write("ready")
end = time.monotonic() + 300
while time.monotonic() < end and not os.path.exists(stop):
    for name in os.listdir(target):
        picked = name.startswith("src") if kind == "src" else (
            name.startswith(".") and ".sandboxd-" in name)
        path = os.path.join(target, name)
        if not picked or os.path.islink(path):
            continue
        link = os.path.join(target, f"..swap{swaps}")
        try:
            os.symlink(canary, link)
            os.rename(link, path)
            swaps += 1
        except OSError:
            pass
    open(count, "w").write(str(swaps))
"""


@pytest.fixture
def canary(daemon: Daemon) -> Iterator[Path]:
    """A host file no sandbox may change: mode 0600, root's, old times."""
    path = daemon.root / "canary"
    path.write_bytes(b"HOST")
    os.chmod(path, 0o600)
    os.chown(path, 0, 0)
    os.utime(path, (1_000_000, 1_000_000))
    yield path
    path.unlink()


def as_found(path: Path) -> tuple[int, int, int, int, int, bytes]:
    """Mode, owner, mtime and ctime (which any chmod, chown or utime moves; a read does not),
    and the contents."""
    st = path.lstat()
    return st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_ctime_ns, path.read_bytes()


def start_swapper(daemon: Daemon, box: str, target: str, kind: str, canary: Path) -> None:
    inside(daemon, box, f"mkdir -p {target}")
    args = [target, kind, str(canary), "/tmp/stop-swapper", "/tmp/swaps"]
    daemon.exec(box, ["python3", "-c", SWAPPER, *args], wait=False)
    wait_until(lambda: inside(daemon, box, "cat /tmp/swaps 2>/dev/null || true") != "")


def wait_until(predicate: Any) -> None:
    for _ in range(600):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("never came to be")


def put_archive(daemon: Daemon, ref: str, path: str, body: bytes) -> Any:
    pieces = (body[i : i + MiB] for i in range(0, len(body), MiB))
    return daemon.client.put(
        f"/sandboxes/{ref}/archive",
        params={"path": path},
        content=pieces,
        headers={"Content-Length": str(len(body))},
        timeout=300,
    )


def test_a_symlink_renamed_over_a_members_temp_name_changes_no_host_file(
    daemon: Daemon, box: str, canary: Path
) -> None:
    """The temp name of a member being copied is the sandbox's to see: a symlink to a host
    file renamed over it must not lead the member's chmod (as host root) to that file."""
    before = as_found(canary)
    start_swapper(daemon, box, "/up", "temp", canary)
    body = tar_of((member("big", mode=0o777, uid=0, gid=0, mtime=5), b"\1" * (64 * MiB)))
    replaced = 0
    for _ in range(3):
        response = put_archive(daemon, box, "/up", body)
        assert response.status_code == 204, response.text
        assert as_found(canary) == before
        # The symlink swapped in is what the rename put in place: the race was run.
        replaced += inside(daemon, box, "test -L /up/big && echo y; rm -f /up/big") == "y\n"
    inside(daemon, box, "touch /tmp/stop-swapper")
    assert replaced > 0
    assert as_found(canary) == before


def test_a_hard_links_source_swapped_for_a_symlink_is_refused(
    daemon: Daemon, box: str, canary: Path
) -> None:
    """A hard link's source is swapped for a symlink to a host file while a filler member is
    copied: the link is refused (422), never made to the symlink, and no host file changes."""
    before = as_found(canary)
    start_swapper(daemon, box, "/hl", "src", canary)
    body = tar_of(
        (member("src", mode=0o644), b"s"),
        (member("filler"), b"\0" * (32 * MiB)),  # time for the sandbox to swap `src`
        (member("hard", tarfile.LNKTYPE, linkname="src", mode=0o777, uid=0, gid=0), None),
    )
    statuses = []
    for _ in range(3):
        response = put_archive(daemon, box, "/hl", body)
        assert response.status_code in (204, 422), response.text
        statuses.append(response.status_code)
        assert as_found(canary) == before
        inside(daemon, box, "rm -f /hl/src /hl/hard /hl/filler")
    inside(daemon, box, "touch /tmp/stop-swapper")
    assert 422 in statuses
    assert as_found(canary) == before


def test_hard_links_to_what_is_not_a_regular_file_are_refused(daemon: Daemon, box: str) -> None:
    inside(daemon, box, "mkdir -p /hl && ln -s /etc/passwd /hl/there && mkfifo /hl/fifo")
    to_member = tar_of(
        (member("s", tarfile.SYMTYPE, linkname="x"), None),
        (member("h", tarfile.LNKTYPE, linkname="s"), None),
    )
    response = daemon.client.put(
        f"/sandboxes/{box}/archive", params={"path": "/hl"}, content=to_member
    )
    assert response.status_code == 422, response.text
    assert inside(daemon, box, "ls -A /hl") == "fifo\nthere\n"  # refused before any write
    for source in ("there", "fifo"):
        to_existing = tar_of((member("h", tarfile.LNKTYPE, linkname=source), None))
        response = daemon.client.put(
            f"/sandboxes/{box}/archive", params={"path": "/hl"}, content=to_existing
        )
        assert response.status_code == 422, response.text
        assert inside(daemon, box, "ls -A /hl") == "fifo\nthere\n"


def test_members_get_owner_mode_and_times_through_their_fd(daemon: Daemon, box: str) -> None:
    body = tar_of(
        (member("f", mode=0o4751, uid=7, gid=8, mtime=1000), b"f"),
        (member("p", tarfile.FIFOTYPE, mode=0o640, uid=9, gid=10, mtime=2000), None),
        (member("l", tarfile.SYMTYPE, linkname="f", uid=11, gid=12, mtime=3000), None),
        (member("h", tarfile.LNKTYPE, linkname="f", mode=0o600, uid=1, gid=1), None),
    )
    inside(daemon, box, "mkdir /attrs")
    response = daemon.client.put(
        f"/sandboxes/{box}/archive", params={"path": "/attrs"}, content=body
    )
    assert response.status_code == 204, response.text
    seen = inside(daemon, box, "cd /attrs && stat -c '%n %a %u %g %Y %F %h' f p l h")
    assert seen.splitlines() == [
        "f 4751 7 8 1000 regular file 2", "p 640 9 10 2000 fifo 1",
        "l 777 11 12 3000 symbolic link 1", "h 4751 7 8 1000 regular file 2",
    ]  # fmt: skip


def test_a_file_time_out_of_range_still_lists_and_stats(daemon: Daemon, box: str) -> None:
    inside(
        daemon,
        box,
        "mkdir /tmp/t && cd /tmp/t && touch far early && python3 -c "
        "\"import os; os.utime('far', (0, 1e14)); os.utime('early', (0, -1e14))\"",
    )
    listed = daemon.client.get(f"/sandboxes/{box}/files/list", params={"path": "/tmp/t"})
    assert listed.status_code == 200, listed.text
    times = {e["name"]: e["mtime"] for e in listed.json()["items"]}
    assert times["far"].startswith("9999-12-31") and times["early"].startswith("0001-01-01")
    assert stat(daemon, box, "/tmp/t/far").status_code == 200
