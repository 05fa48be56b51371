"""Building a sandbox from a SpawnRequest: the user namespace, the other namespaces, the root.

Which user namespace owns the other namespaces. The mount, PID, UTS, IPC and network
namespaces are created by a process that is still root in the host's user namespace, so the
host's user namespace owns them; the sandbox's own user namespace (uid 0 inside = an
unprivileged host uid range) owns nothing but its ids. We chose this over runc's layout (where
the sandbox's user namespace owns everything) because:
  - root inside then holds no capability over its mounts, hostname, IPC or network: it cannot
    mount, unmount (so no mount can be peeled off to reveal what lies below), change the host
    name or reconfigure interfaces, whatever seccomp or the bounding set may later miss;
  - every mount is built by host root with the new mount API, so the idmapped layers
    (open_tree + mount_setattr(MOUNT_ATTR_IDMAP), which need privilege over the filesystem's
    own user namespace) need no passing of mount fds between namespaces;
  - the supervisor (PID 1) stays host root in the host's user namespace, so nothing inside,
    root included, can signal it, ptrace it or open its /proc/1/{fd,exe,root}.
The price: ports below 1024 need privilege in the network namespace's owner, so each sandbox's
namespace gets net.ipv4.ip_unprivileged_port_start = 0 (and a ping group range covering its
ids); and `hostname NAME` inside fails, as it does in Docker without CAP_SYS_ADMIN.

The steps (bubblewrap's order: everything validated by the daemon before the first effect):
  A, a fork of the zygote, host root in host namespaces:
    1. user namespace: a throwaway child unshares it; A writes its uid_map/gid_map, keeps an fd
    2. listen on the supervisor socket in the runtime directory
    3. unshare mnt, pid (for children), uts, ipc, net; set the host name
    4. bridge mode: a veth pair from the daemon's bridge to eth0 in the new network namespace,
       with its address and a default route via the bridge (made through a netlink socket
       opened before the unshare, which stays in the host's namespace)
    5. fork B, the sandbox's PID 1, and report its host pid
  B, PID 1 in the new PID namespace, still host root:
    6. make every mount private, so nothing propagates back to the host
    7. overlay each base layer: lower read-only and idmapped, upper on the sandbox's tmpfs in
       the state directory (mounted by the daemon, sized by limits.disk_bytes); an image's
       root is one overlay of all its layers
    8. pivot_root into the new root and detach the old one
    9. /proc, /sys (read-only), a minimal /dev, /dev/pts, /dev/shm and /tmp (sized), the binds
   10. lo up, unprivileged ports from 0
   11. mask kernel files and make /proc/sys & co. read-only (daemon/sandbox/hardening.py)
Each exec's process then drops capabilities and loads the seccomp filter (daemon/sandbox/spawn.py).
A's network step is done before B exists, so the main cmd sees eth0 from its first instruction.
If A fails after making the veth, the new namespace dies with A and takes eth0 with it; the
daemon still deletes the host end by name and waits for it (daemon/network/bridge.py).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Imported where used: pyroute2 is 20 MB of a process, and only the zygote that builds
    # bridged sandboxes loads it (daemon/sandbox/zygote.py), so other supervisors fork lean.
    from pyroute2 import IPRoute

from daemon.linux import disk
from daemon.linux import syscalls as sc
from daemon.protocol import SOCKET_NAME, STAGING_DIR, SpawnRequest, short_path

KERNEL_TREES = ("proc", "sys", "dev")  # made by the steps above: no bind goes in or over them
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {
    "fd": "/proc/self/fd",
    "stdin": "/proc/self/fd/0",
    "stdout": "/proc/self/fd/1",
    "stderr": "/proc/self/fd/2",
    "ptmx": "pts/ptmx",
}
_NOSUID_NODEV = sc.MS_NOSUID | sc.MS_NODEV
_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1


# -- A: host root, host namespaces ------------------------------------------------------------


def create_user_namespace(uid_base: int, count: int) -> int:
    """Create a user namespace mapping 0..count-1 inside to uid_base.. on the host; its fd.

    A throwaway child unshares it and waits; we (host root) write its maps, which a process
    inside could not do for itself, then keep the namespace alive through the fd. The child
    is not waited for: the caller collects its children as they exit (the zygote on SIGCHLD).
    """
    ready_r, ready_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # Child, host namespaces, about to own the new user namespace.
        try:
            os.close(ready_r)
            os.close(done_w)
            sc.unshare(sc.CLONE_NEWUSER)
            os.write(ready_w, b"1")
            os.read(done_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(done_r)
    try:
        if os.read(ready_r, 1) != b"1":
            raise OSError(errno.ECHILD, "the user namespace child died")
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{pid}/{name}", "w") as f:
                f.write(f"0 {uid_base} {count}\n")
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
    finally:
        os.close(ready_r)
        os.close(done_w)  # the child's cue to exit


def listen_supervisor_socket(run_dir: str) -> socket.socket:
    dir_fd = os.open(run_dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(short_path(dir_fd, SOCKET_NAME))
        os.chmod(SOCKET_NAME, 0o600, dir_fd=dir_fd)
    finally:
        os.close(dir_fd)
    sock.listen(8)
    return sock


def unshare_namespaces(req: SpawnRequest) -> None:
    flags = sc.CLONE_NEWNS | sc.CLONE_NEWPID
    for name in ("uts", "ipc", "net"):
        if name in req.namespaces:
            flags |= sc.NAMESPACE_FLAGS[name]
    sc.unshare(flags)
    if "uts" in req.namespaces:
        socket.sethostname(req.hostname)


def open_host_netlink(req: SpawnRequest) -> IPRoute | None:
    """For bridge mode, a netlink socket opened before the unshare: it stays in the host's
    network namespace after A has left it."""
    if req.network is None:
        return None
    from pyroute2 import IPRoute

    return IPRoute()


def plug_network(req: SpawnRequest, host: IPRoute) -> None:
    """Step 4, in A after the unshare: the veth pair, eth0's address and the default route.

    `host` speaks to the host's namespace: the pair is made there with its peer placed
    straight into ours (/proc/self/ns/net), so no temporary name ever appears on the host.
    """
    plan = req.network
    assert plan is not None
    bridge = host.link_lookup(ifname=plan.bridge)
    if not bridge:
        raise OSError(errno.ENODEV, f"the bridge {plan.bridge} is missing")
    netns_fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        host.link(
            "add",
            ifname=plan.host_ifname,
            kind="veth",
            master=bridge[0],
            peer={"ifname": "eth0", "net_ns_fd": netns_fd, "address": plan.mac},
        )
    finally:
        os.close(netns_fd)
    host.link("set", ifname=plan.host_ifname, state="up")
    from pyroute2 import IPRoute

    with IPRoute() as inside:  # opened now, so in the sandbox's namespace
        eth0 = inside.link_lookup(ifname="eth0")[0]
        inside.addr("add", index=eth0, address=f"{plan.ip}/{plan.prefix}")
        inside.link("set", index=eth0, state="up")
        inside.route("add", dst="0.0.0.0/0", gateway=plan.gateway)


# -- B: PID 1 of the sandbox, host root, new mount namespace ----------------------------------


class InvalidMount(Exception):
    """A bind mount the request asked for cannot be made: the request's fault, not ours."""


def build_root(req: SpawnRequest, userns_fd: int | None, base_userns_fd: int | None) -> int:
    """Steps 6-9: leave B chrooted (by pivot_root) in the sandbox's finished root.

    The base layers are idmapped through `base_userns_fd`, which maps host root alone (to
    root inside): the host's other users' files show as nobody's, so root inside gets no
    capability over them and sees them as any unprivileged user would. Bind mounts use the
    sandbox's full mapping, so that uid N on the host is uid N inside. Returns an O_PATH fd
    of the sandbox's /dev/pts/ptmx, opened before anything inside could replace it.
    """
    # The old root must be rprivate, or our mounts and unmounts would propagate to the host.
    sc.mount(None, "/", None, sc.MS_REC | sc.MS_PRIVATE)
    staging = os.path.join(req.run_dir, STAGING_DIR)
    sc.mount("tmpfs", staging, "tmpfs", _NOSUID_NODEV, "mode=0700,size=16k")
    new_root = os.path.join(staging, "root")
    os.mkdir(new_root)
    # Lower directories by names relative to the staging directory: the overlay's options
    # must fit in a page, and an image may have a hundred layers.
    os.chdir(staging)
    for index, layer in enumerate(req.layers):
        # An image's layers keep their owners (the whole range); the host's keep root alone.
        idmap = userns_fd if layer.image else base_userns_fd
        sources = [layer.lower, *layer.below]
        lowers = [f"lower{index}.{depth}" for depth in range(len(sources))]
        target = os.path.join(new_root, layer.target.lstrip("/"))
        options = f"lowerdir={':'.join(lowers)},upperdir={layer.upper},workdir={layer.work}"
        try:
            for source, lower in zip(sources, lowers, strict=True):
                os.mkdir(lower)
                attach(detached_tree(source, idmap, read_only=True), lower)
            sc.mount("overlay", target, "overlay", 0, options)
        except OSError as exc:
            if not layer.requested:
                raise
            # e.g. /proc or /sys: a filesystem that cannot be idmapped or be an overlay's lower
            raise InvalidMount(f"cannot use {layer.lower} as a root: {exc}") from exc
    # Trees from the host that must survive the old root: taken now, attached after the pivot.
    devices = {name: detached_tree(f"/dev/{name}", None, read_only=False) for name in DEVICES}
    binds = []
    for mount in req.mounts:
        try:
            tree = detached_tree(mount.source, userns_fd, mount.read_only)
        except OSError as exc:
            raise InvalidMount(f"cannot bind {mount.source}: {exc.strerror}") from exc
        binds.append((mount, os.path.isdir(mount.source), tree))

    os.chdir(new_root)
    sc.pivot_root(".", ".")
    sc.umount2(".", sc.MNT_DETACH)
    os.chdir("/")

    owner = req.uid_base if req.uid_base is not None else 0
    ids = f"uid={owner},gid={owner}"
    mount_at("proc", "/proc", "proc", _NOSUID_NODEV | sc.MS_NOEXEC, None, owner)
    mount_at("sysfs", "/sys", "sysfs", _NOSUID_NODEV | sc.MS_NOEXEC | sc.MS_RDONLY, None, owner)
    mount_at(
        "tmpfs", "/dev", "tmpfs", sc.MS_NOSUID | sc.MS_NOEXEC, f"mode=755,size=64k,{ids}", owner
    )
    for name, fd in devices.items():
        with open(f"/dev/{name}", "w"):
            pass
        attach(fd, f"/dev/{name}")
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")
        os.lchown(f"/dev/{name}", owner, owner)
    pts = f"newinstance,ptmxmode=0666,mode=620,gid={owner + 5}"
    mount_at("devpts", "/dev/pts", "devpts", sc.MS_NOSUID | sc.MS_NOEXEC, pts, owner)
    # Sized, or each would take up to half the host's memory.
    shm = disk.tmpfs_options(req.shm_bytes, "1777", owner)
    mount_at("tmpfs", "/dev/shm", "tmpfs", _NOSUID_NODEV, shm, owner)
    mount_at(
        "tmpfs",
        "/tmp",
        "tmpfs",
        _NOSUID_NODEV,
        disk.tmpfs_options(req.tmp_bytes, "1777", owner),
        owner,
    )
    ptmx = os.open("/dev/pts/ptmx", os.O_PATH | os.O_CLOEXEC)
    for mount, is_dir, fd in binds:
        target = resolved_target(mount.target)
        try:
            make_mountpoint(target, is_dir, owner)
            attach(fd, target)
        except OSError as exc:
            raise InvalidMount(f"cannot bind {mount.source} on {mount.target}: {exc}") from exc
    return ptmx


def resolved_target(target: str) -> str:
    """Where a bind's target lands once the symlinks on its way are followed, or InvalidMount
    if that is / or in /proc, /sys or /dev.

    B has pivoted into the new root, so every symlink, absolute or with '..', resolves inside
    it: `/etc/mtab` (a link to ../proc/self/mounts) would land in /proc, which the daemon's
    check of the target as written cannot see. Nothing else runs in the sandbox yet, so the
    path cannot change between this and the mount.
    """
    real = os.path.realpath(target)
    top = real.split("/")[1]
    if real == "/" or top in KERNEL_TREES:
        raise InvalidMount(f"mount target {target} resolves to {real}: not a place for a mount")
    return real


def detached_tree(path: str, userns_fd: int | None, read_only: bool) -> int:
    """A detached copy of the mount tree at `path`, idmapped through userns_fd if given."""
    fd = sc.open_tree(path, sc.OPEN_TREE_CLONE | sc.OPEN_TREE_CLOEXEC | sc.AT_RECURSIVE)
    attrs = sc.MOUNT_ATTR_RDONLY if read_only else 0
    if userns_fd is not None:
        attrs |= sc.MOUNT_ATTR_IDMAP
    if attrs:
        try:
            sc.mount_setattr(fd, attrs, userns_fd or 0, recursive=True)
        except OSError:
            os.close(fd)
            raise
    return fd


def attach(fd: int, target: str) -> None:
    try:
        sc.move_mount(fd, target)
    finally:
        os.close(fd)


def make_mountpoint(path: str, directory: bool, owner: int) -> None:
    """Create a missing mount point inside the new root (symlinks resolve inside it)."""
    parent = os.path.dirname(path.rstrip("/")) or "/"
    if not os.path.isdir(parent):
        make_mountpoint(parent, True, owner)
    if os.path.lexists(path):
        return
    if directory:
        os.mkdir(path, 0o755)
    else:
        with open(path, "w"):
            pass
    os.lchown(path, owner, owner)


def mount_at(
    source: str, target: str, fstype: str, flags: int, data: str | None, owner: int
) -> None:
    make_mountpoint(target, True, owner)
    sc.mount(source, target, fstype, flags, data)


def configure_network() -> None:
    """Step 10: bring lo up and let root inside bind low ports in its own namespace.

    The namespace is owned by the host's user namespace, so without this only host root could
    bind ports below 1024 in it. An ioctl, not netlink: one interface flag, no link setup.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH", b"lo", 0)
        flags = struct.unpack("16sH", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH", b"lo", flags | _IFF_UP))
    write_sysctl("net/ipv4/ip_unprivileged_port_start", "0")
    write_sysctl("net/ipv4/ping_group_range", "0 4294967294")


def write_sysctl(name: str, value: str) -> None:
    with open(f"/proc/sys/{name}", "w") as f:
        f.write(value)
