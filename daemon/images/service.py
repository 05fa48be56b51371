"""The image store as the API and the sandbox lifecycle use it: import, pull, list, get,
delete; and what a sandbox made from an image takes of it (its layers, env, cwd and user).

Runs in: the daemon's event loop; file work (spooling, copying, unpacking) in worker threads.

An import or pull puts its blobs in place first, then unpacks each layer not yet unpacked,
then records the image: until the record exists nothing refers to those files, so the
collection of unused files (after a delete, or a failed import or pull) waits until no import
or pull is under way, and then keeps exactly what the recorded images use.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import os
import stat
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daemon.config import Config
from daemon.errors import Invalid, NotFound, RegistryError
from daemon.images.archive import ArchiveError, read_archive
from daemon.images.manifests import ManifestError, Resolved
from daemon.images.reference import normal_name, parse
from daemon.images.store import DigestMismatch, ImageFiles, LayerError
from daemon.lifecycle.events import EventType
from daemon.lifecycle.running import utcnow
from daemon.linux import syscalls
from daemon.shapes import ExecCreate, Image, ImageConfig, SandboxCreate
from daemon.store.database import ImageRecord, Store

if TYPE_CHECKING:
    from daemon.images.registry import Progress

log = logging.getLogger(__name__)

_SHORT_ID = 12  # the shortest id prefix taken for an image, as Docker shows ids
_MAX_ETC_FILE = 1 << 20  # an /etc/passwd or /etc/group larger than this is not read


class ImageService:
    def __init__(self, config: Config, store: Callable[[], Store]) -> None:
        self.config = config
        self._store = store
        self.files = ImageFiles(config.state_dir / "images")
        self.active = 0  # imports and pulls under way: no collection meanwhile
        self.collect_pending = False
        # Held by a collection while it runs, and by an import or pull as it begins: one that
        # begins during a collection waits for it, so no file of its can be taken for unused.
        self.collecting = asyncio.Lock()

    @property
    def store(self) -> Store:
        return self._store()

    def start(self) -> None:
        self.files.setup()
        self._collect()  # what a crash left between receiving files and recording them

    # -- queries ------------------------------------------------------------------------------

    async def list(self) -> list[Image]:
        return [image_view(r) for r in self.store.list_images()]

    async def get(self, ref: str) -> Image:
        return image_view(self.find(ref))

    def find(self, ref: str) -> ImageRecord:
        """The image `ref` names: a name[:tag] (tag latest if none), an id or manifest digest
        (`sha256:…`, or at least 12 hex digits of the id), or name@digest. NotFound if none."""
        records = self.store.list_images()
        hex_ref = ref.removeprefix("sha256:")
        name = normal_name(ref)
        _, _, digest = ref.partition("@")
        for record in records:
            if ref in (record.id, record.digest) or digest == record.digest:
                return record
            if name is not None and name in record.names:
                return record
        if len(hex_ref) >= _SHORT_ID and all(c in "0123456789abcdef" for c in hex_ref):
            matches = [r for r in records if r.id[7:].startswith(hex_ref)]
            if len(matches) == 1:
                return matches[0]
        raise NotFound(f"image {ref} is not in the store")

    # -- what a sandbox takes of its image ----------------------------------------------------

    def for_create(self, spec: SandboxCreate) -> tuple[SandboxCreate, str]:
        """A create naming an image: its spec with the image's env under its own, and the
        image's id. Invalid (naming the image) when the store does not have it."""
        assert spec.image is not None
        try:
            record = self.find(spec.image)
        except NotFound as exc:
            raise Invalid(f"image {spec.image} is not in the store: pull or import it") from exc
        env = {**record.config.get("env", {}), **spec.env}
        return spec.model_copy(update={"env": env}), record.id

    def root_layers(self, image_id: str) -> builtins.list[str]:
        """The lower directories of a sandbox made from the image `image_id`, top first."""
        return self.lower_layers(self.find(image_id))

    async def exec_defaults(self, image_id: str, spec: ExecCreate) -> ExecCreate:
        """An exec in a sandbox made from an image: the image's working_dir and user where
        the exec names none (its /etc/passwd and /etc/group read in a worker thread)."""
        try:
            record = self.find(image_id)
        except NotFound:
            return spec  # deleted with the sandbox meanwhile: the exec fails on its own
        update: dict[str, str] = {}
        working_dir = str(record.config.get("working_dir") or "")
        if "cwd" not in spec.model_fields_set and working_dir.startswith("/"):
            update["cwd"] = working_dir
        if "user" not in spec.model_fields_set:
            user = await asyncio.to_thread(self.default_user, record)
            if user is not None:
                update["user"] = user
        return spec.model_copy(update=update) if update else spec

    def lower_layers(self, record: ImageRecord) -> builtins.list[str]:
        """The image's unpacked layers, top first: the overlay's lower directories."""
        return [str(self.files.layer_path(layer["diff_id"])) for layer in reversed(record.layers)]

    def default_user(self, record: ImageRecord) -> str | None:
        """The image's user as uid[:gid], names looked up in the image's /etc/passwd and
        /etc/group; None if it names none (or one the image does not have). Blocking."""
        user = str(record.config.get("user") or "")
        if not user:
            return None
        name, _, group = user.partition(":")
        uid = name if name.isdigit() else self._lookup(record, "passwd", name, 2)
        gid = group if group.isdigit() or not group else self._lookup(record, "group", group, 2)
        if uid is None or gid is None:
            return None
        if not group and not name.isdigit():
            gid = self._lookup(record, "passwd", name, 3)
        return f"{uid}:{gid}" if gid else uid

    def _lookup(self, record: ImageRecord, table: str, name: str, column: int) -> str | None:
        data = image_file(self.lower_layers(record), "etc", table)
        if data is None:
            return None
        for line in data.decode(errors="replace").splitlines():
            fields = line.split(":")
            if len(fields) > column and fields[0] == name and fields[column].isdigit():
                return fields[column]
        return None

    # -- import and pull ----------------------------------------------------------------------

    async def import_archive(
        self, body: AsyncIterator[bytes], reference: str | None, platform: str
    ) -> Image:
        """The image in an OCI layout or docker archive tar streamed as `body`, named
        `reference` (else by the names the archive gives it)."""
        name = None
        if reference is not None:
            name = normal_name(reference)
            if name is None:
                raise Invalid(f"reference {reference!r} is not a name[:tag]")
        await self._begin()
        ok = False
        try:
            path = await self._spool(body)
            try:
                resolved = await asyncio.to_thread(read_archive, str(path), self.files, platform)
            except (ArchiveError, ManifestError, DigestMismatch) as exc:
                raise Invalid(f"cannot import the archive: {exc}") from exc
            finally:
                path.unlink(missing_ok=True)
            names = [name] if name else [n for t in resolved.names if (n := normal_name(t))]
            resolved.names = names
            image = await self._install(resolved, Invalid, EventType.IMAGE_IMPORTED)
            ok = True
            log.info("image %s imported", image.id, extra={"names": image.names})
            return image
        finally:
            await self._done(ok)

    async def pull(self, reference: str, platform: str, progress: Progress | None = None) -> Image:
        try:
            ref = parse(reference)
        except ValueError as exc:
            raise Invalid(str(exc)) from exc
        # httpx and the registry client: loaded by the first pull, not by every daemon start.
        from daemon.images import registry

        await self._begin()
        ok = False
        try:
            client = registry.Client(self.config)
            try:
                resolved = await client.pull(ref, platform, self.files, progress or _ignore)
            except (ManifestError, DigestMismatch) as exc:
                raise RegistryError(f"cannot pull {reference}: {exc}") from exc
            resolved.names = [ref.name] if ref.tag else []
            image = await self._install(resolved, RegistryError, EventType.IMAGE_PULLED)
            ok = True
            log.info("image %s pulled", image.id, extra={"reference": reference})
            return image
        finally:
            await self._done(ok)

    async def _spool(self, body: AsyncIterator[bytes]) -> Path:
        fd, name = tempfile.mkstemp(dir=self.files.tmp, prefix="archive-")
        try:
            with os.fdopen(fd, "wb") as out:
                async for chunk in body:
                    out.write(chunk)
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    async def _install(
        self, resolved: Resolved, error: type[Invalid | RegistryError], event: EventType
    ) -> Image:
        """Unpack the layers not unpacked yet, then record the image."""
        for layer in resolved.layers:
            try:
                await asyncio.to_thread(self.files.unpack, layer.digest, layer.diff_id)
            except (DigestMismatch, LayerError) as exc:
                raise error(f"layer {layer.digest}: {exc}") from exc
        record = ImageRecord(
            id=resolved.config_digest,
            digest=resolved.digest,
            names=resolved.names,
            layers=[layer.as_dict() for layer in resolved.layers],
            size=sum(layer.size for layer in resolved.layers),
            config=resolved.config,
            created_at=utcnow(),
        )
        return image_view(self.store.save_image(record, event))

    # -- delete -------------------------------------------------------------------------------

    async def delete(self, ref: str) -> None:
        """Forget the image and remove the files no other image uses; Conflict while a
        sandbox (running or not yet deleted) was made from it."""
        record = self.find(ref)
        self.store.delete_image(record.id)
        log.info("image %s removed", record.id)
        self.collect_pending = True
        await self._done(True, ending=False)

    async def _begin(self) -> None:
        async with self.collecting:
            self.active += 1

    async def _done(self, ok: bool, *, ending: bool = True) -> None:
        """An import or pull has ended (or a delete): collect unused files if one is due and
        nothing is under way."""
        if ending:
            self.active -= 1
        if not ok:
            self.collect_pending = True
        if not self.collect_pending or self.active:
            return
        async with self.collecting:
            if self.active == 0:
                await asyncio.to_thread(self._collect)

    def _collect(self) -> None:
        """Remove the blobs and layers no recorded image uses (a worker thread, or at start)."""
        blobs: set[str] = set()
        layers: set[str] = set()
        records = self.store.list_images()
        unknown = self.store.sandbox_image_ids() - {r.id for r in records}
        if unknown:
            # Sandboxes made from images this database does not have (it was rebuilt by
            # `recover`): their layers cannot be told apart, so nothing is removed.
            log.warning("images %s of sandboxes are not recorded: keeping every layer", unknown)
            return
        for record in records:
            blobs |= {record.id, record.digest, *(layer["digest"] for layer in record.layers)}
            layers |= {layer["diff_id"] for layer in record.layers}
        self.files.remove_unused(blobs, layers)
        self.collect_pending = False


def _ignore(_event: dict[str, Any]) -> None:
    pass


def image_view(record: ImageRecord) -> Image:
    return Image(
        id=record.id,
        digest=record.digest,
        names=list(record.names),
        size=record.size,
        layers=len(record.layers),
        created_at=record.created_at,
        config=ImageConfig.model_validate(record.config),
    )


def image_file(layers: builtins.list[str], directory: str, name: str) -> bytes | None:
    """DIRECTORY/NAME of the image whose unpacked `layers` (top first) are given, as the
    sandbox's overlay shows it; None if it has none, or none that is a regular file of at most
    _MAX_ETC_FILE bytes. Each layer is a root of its own: a link is followed in its layer,
    never out of it (a layer's `etc -> /somewhere` names the image's /somewhere, not the
    host's). Blocking."""
    for layer in layers:
        root = os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            top = _lstat(root, directory)
            if top is None:
                continue  # the layers below decide
            if stat.S_ISLNK(top.st_mode):
                return _read_in(root, f"{directory}/{name}")
            if not stat.S_ISDIR(top.st_mode):
                return None  # a whiteout or a file: it hides the directories below
            entry = _lstat(root, f"{directory}/{name}")
            if entry is not None:
                if stat.S_ISCHR(entry.st_mode) and entry.st_rdev == 0:
                    return None  # whited out
                return _read_in(root, f"{directory}/{name}")
            if _opaque(os.path.join(layer, directory)):
                return None  # the layers below are hidden
        finally:
            os.close(root)
    return None


def _lstat(root: int, path: str) -> os.stat_result | None:
    try:
        return os.stat(path, dir_fd=root, follow_symlinks=False)
    except OSError:
        return None


def _opaque(directory: str) -> bool:
    try:
        return os.getxattr(directory, "trusted.overlay.opaque", follow_symlinks=False) == b"y"
    except OSError:
        return False


def _read_in(root: int, path: str) -> bytes | None:
    """The regular file `path` with `root` as its root (links and `..` included), at most
    _MAX_ETC_FILE bytes; O_NONBLOCK: a fifo there must not hang the open."""
    resolve = syscalls.RESOLVE_IN_ROOT | syscalls.RESOLVE_NO_MAGICLINKS
    try:
        fd = syscalls.openat2(root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY, 0, resolve)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = bytearray()
        while len(data) <= _MAX_ETC_FILE:
            chunk = os.read(fd, _MAX_ETC_FILE + 1 - len(data))
            if not chunk:
                return bytes(data)
            data += chunk
        log.warning("an image's %s is larger than %d bytes: not read", path, _MAX_ETC_FILE)
        return None
    finally:
        os.close(fd)
