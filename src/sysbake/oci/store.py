"""The local store: an OCI image layout of blobs and tags, plus unpacked layer trees.

Layout under the store root::

    oci/                OCI image layout (oci-layout, index.json, blobs/sha256/<hex>)
    trees/<hex>/        a layer unpacked as an overlayfs lowerdir, keyed by its diff ID
    checked/<hex>       an empty file: the layer with this diff ID passed the layer check
    cache/              stage records (see sysbake.build.cache)
    debs/               the persistent .deb cache shared by bootstraps
    containers/<name>/  state of containers (see sysbake.runtime.containers)
    tmp/                staging; an entry whose owner died is removed by `clean_stale`
    locks/              flock files: gc, tmp, and one per named lock (`exclusive`)

Every write is atomic (temp file + fsync + rename) and idempotent: writing a blob that
is present is a no-op, so an interrupted write never leaves a referenced partial blob.

The store is closed: its top directory is 0700 (made so, and tightened whenever its owner
opens it), so the setuid files and device nodes of unpacked layers, containers' merged
views and staging trees are out of other users' reach, wherever they sit below it.

Layers are checked once per diff ID (`check_layer`: the EntryCheck of sysbake.oci.layers.archive,
plus the diff ID) before anything reads them as a tree or tar: pull, export and run.
A layer counts as checked when its marker checked/<hex> exists: written atomically once
`check_layer` or an extraction (`layer_tree`: the same EntryCheck, and the diff ID) passed,
or by commit_tree for a layer this store wrote from a directory walk that the check would
pass. A tree alone proves nothing: a build adopts its trees without checking them.

Several processes may share one store (two builds, a build and `cache prune`, builder
containers on one volume): every lock is a flock, which the kernel drops however its
holder dies, and which works across mount and PID namespaces on one file system.
- `lock()` (the file `lock`): read-modify-write of index.json, and the sweep of GC.
- locks/gc: held shared by every process that adds blobs or trees (`hold`, taken by the
  writers themselves and by a build for its whole length), exclusive while GC decides what
  is unreachable and sweeps it (`collecting`): GC never removes what a live writer has
  added but not yet tagged or recorded.
- locks/tmp: held shared while a staging entry or a blob's temp file is made and locked,
  exclusive while `clean_stale` looks for dead ones: it never takes a live entry that is
  not locked yet for a dead one.
- locks/<name>.lock (`exclusive`): a build holds stage-<key> while it makes that stage, so
  that two builds of one stage make it once: the second waits, then reuses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO, NamedTuple

from sysbake import log
from sysbake.errors import CommandError, ImageNotFound, LayerError, StoreError
from sysbake.fsutil import atomic_write, fsync_dir, publish_dir, raise_disk, remove_tree
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.oci.reference import InvalidReference, Reference

if TYPE_CHECKING:
    from sysbake.oci.compress import Readable


class BlobWriter:
    """A blob being written: bytes go to a temp file and are hashed on the way.

    `commit()` moves it into place under its digest (a no-op when already present);
    leaving the `with` block without committing deletes the temp file.
    """

    def __init__(self, store: Store) -> None:
        import hashlib
        import tempfile

        self._store = store
        with store._tmp_guard(fcntl.LOCK_SH):
            fd, name = tempfile.mkstemp(dir=store.tmp_dir, prefix="blob-")
            fcntl.flock(fd, fcntl.LOCK_EX)  # tells clean_stale this temp file is live
        self._path = Path(name)
        self._file: IO[bytes] = os.fdopen(fd, "wb")
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        try:
            self._file.write(data)
        except OSError as exc:
            raise_disk(exc, f"writing a blob into {self._store.tmp_dir}")
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        self._file.flush()

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()

    def commit(self, media_type: str) -> Descriptor:
        try:
            self._file.flush()
            os.fchmod(self._file.fileno(), 0o644)
            os.fsync(self._file.fileno())
            # Moved (or dropped) while still open: its lock tells clean_stale it is live.
            final = self._store.blob_path(self.digest)
            if final.exists():
                self._path.unlink()
            else:
                os.rename(self._path, final)
                fsync_dir(final.parent)
            self._file.close()
        except OSError as exc:
            raise_disk(exc, f"committing a blob into {self._store.blobs_dir}")
        return Descriptor(media_type, self.digest, self.size)

    def discard(self) -> None:
        if not self._file.closed:
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self._path.unlink()


def _lock(fd: int, mode: int, waiting: Callable[[], None] | None) -> None:
    """flock `fd` in `mode`, calling `waiting` first when another holder makes us wait."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        if waiting is not None:
            waiting()
        fcntl.flock(fd, mode)


def _guard_of(staging: Path) -> Path:
    """The lock file of a staging directory: its name plus ".lock" (the name may hold dots)."""
    return staging.with_name(f"{staging.name}.lock")


def _waiting_for_writers() -> None:
    log.info("    waiting for the builds and pulls using the store to end")


def _open_lock(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


class _GcLock:
    """This process's hold on a store's locks/gc: shared while it may add blobs or trees,
    exclusive while it collects garbage. One open file per store and process (a flock
    conflicts with another open file of the same lock, even in one process: a `cache prune`
    after a write must not wait for itself); forked build jobs share it."""

    def __init__(self, path: Path) -> None:
        self.fd = _open_lock(path)
        self.shared = False
        self.collecting = 0  # nesting depth of `exclusive`

    def share(self, waiting: Callable[[], None]) -> None:
        if not self.shared and not self.collecting:
            _lock(self.fd, fcntl.LOCK_SH, waiting)
        self.shared = True

    @contextlib.contextmanager
    def exclusive(self, waiting: Callable[[], None]) -> Iterator[None]:
        if not self.collecting:
            # Converting a shared lock drops it first: a process never waits for itself.
            _lock(self.fd, fcntl.LOCK_EX, waiting)
        self.collecting += 1
        try:
            yield
        finally:
            self.collecting -= 1
            if not self.collecting:
                fcntl.flock(self.fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_UN)


_GC_LOCKS: dict[Path, _GcLock] = {}  # by store root: see _GcLock


class Tagged(NamedTuple):
    """A tag in the store and the image it points to."""

    ref: str
    image: Image


# An image ID or manifest digest ("sha256:" optional), or a prefix of one.
_ID_RE = re.compile(r"(?:sha256:)?[0-9a-f]{4,64}")


def _names(desc: Descriptor, wanted: Reference) -> bool:
    """Whether the index entry `desc` is the image `wanted` names: its tag, or for a pinned
    reference, a tag of the same name on a manifest of that digest (the tag aside, as
    docker and podman read a reference holding both)."""
    ref = desc.annotation(oci.ANN_REF_NAME)
    if wanted.digest is None:
        return ref == wanted.store_name()
    return desc.digest == wanted.digest and (ref or "").startswith(f"{wanted.name}:")


class Store:
    """A content-addressed image store at `root` (see the module docstring for the layout)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.oci_dir = root / "oci"
        self.blobs_dir = self.oci_dir / "blobs" / "sha256"
        self.trees_dir = root / "trees"
        self.cache_dir = root / "cache"
        self.debs_dir = root / "debs"
        self.containers_dir = root / "containers"
        self.tmp_dir = root / "tmp"
        self.checked_dir = root / "checked"
        self.locks_dir = root / "locks"
        self._ready = False
        self._close_top()

    def _close_top(self) -> None:
        """Tighten an existing top directory of ours to 0700 (stores before this rule were
        0755): one stat when it already is."""
        try:
            st = os.stat(self.root)
        except OSError:
            return
        if st.st_uid == os.geteuid() and st.st_mode & 0o077:
            with contextlib.suppress(OSError):  # a read-only mount: nothing to protect
                os.chmod(self.root, 0o700)

    # -- set-up and locking ------------------------------------------------------------

    def ensure(self) -> Store:
        """Create the layout if missing (idempotent)."""
        if self._ready:
            return self
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._close_top()
            for d in (
                self.blobs_dir,
                self.trees_dir,
                self.cache_dir,
                self.debs_dir,
                self.containers_dir,
                self.tmp_dir,
                self.checked_dir,
                self.locks_dir,
            ):
                d.mkdir(parents=True, exist_ok=True)
            layout = self.oci_dir / "oci-layout"
            if not layout.exists():
                atomic_write(layout, oci.canonical_json({"imageLayoutVersion": "1.0.0"}))
            self._first_index()
        except OSError as exc:
            raise_disk(exc, f"creating the store at {self.root}")
        self._ready = True
        return self

    def _first_index(self) -> None:
        """Write an empty index.json unless there is one: by a link, which never replaces
        the index another process has meanwhile made and tagged into."""
        index = self.oci_dir / "index.json"
        if index.exists():
            return
        doc = {"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": []}
        new = self.oci_dir / f".index.json.{os.getpid()}.{os.urandom(6).hex()}"
        atomic_write(new, json.dumps(doc, indent=2).encode() + b"\n")
        try:
            os.link(new, index)
        except FileExistsError:
            pass
        finally:
            new.unlink()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive lock for read-modify-write of index.json and for GC."""
        self.ensure()
        with open(self.root / "lock", "a+b") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def hold(self) -> Store:
        """Keep garbage collection (`collecting`) out of this store until this process
        ends: what it adds is unreachable until it is tagged or recorded. Taken by every
        writer of blobs and trees, and by a build before it looks up its first stage.
        Waits while a GC runs. Idempotent."""
        self.ensure()
        self._gc_lock().share(lambda: log.info("    waiting for a garbage collection"))
        return self

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Exclusive against every process that `hold`s the store (a build, a pull), for
        deciding what is unreachable and removing it; reentrant."""
        self.ensure()
        with self._gc_lock().exclusive(_waiting_for_writers):
            yield

    def _gc_lock(self) -> _GcLock:
        root = self.root.absolute()
        if root not in _GC_LOCKS:
            _GC_LOCKS[root] = _GcLock(self.locks_dir / "gc")
        return _GC_LOCKS[root]

    @contextlib.contextmanager
    def exclusive(self, name: str, waiting: Callable[[], None] | None = None) -> Iterator[None]:
        """The lock `name` (a file name: "stage-<key>"), exclusive across the processes and
        builder containers sharing this store; `waiting` is called if another holds it.
        Its file goes when it is released."""
        self.ensure()
        path = self.locks_dir / f"{name}.lock"
        while True:
            fd = _open_lock(path)
            try:
                _lock(fd, fcntl.LOCK_EX, waiting)
                waiting = None
                # The holder we waited for removed the file: ours is then a lock on a
                # name nobody else will open again; open the name anew.
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)

    @contextlib.contextmanager
    def _tmp_guard(self, mode: int) -> Iterator[None]:
        """locks/tmp: shared while a tmp/ entry is made and locked, exclusive while
        `clean_stale` judges entries (see the module docstring)."""
        fd = _open_lock(self.locks_dir / "tmp")
        try:
            fcntl.flock(fd, mode)
            yield
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def staging(self, prefix: str) -> Iterator[Path]:
        """A private directory under tmp/, removed afterwards; flock-ed while in use so
        `clean_stale` (run by the next command) can remove it if we are killed."""
        import tempfile

        self.ensure()
        with self._tmp_guard(fcntl.LOCK_SH):
            path = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix=f"{prefix}-"))
            f = open(_guard_of(path), "a+b")  # noqa: SIM115 - closed below
            fcntl.flock(f, fcntl.LOCK_EX)
        with f:
            try:
                yield path
            finally:
                remove_tree(path)
                with contextlib.suppress(FileNotFoundError):
                    _guard_of(path).unlink()

    def clean_stale(self) -> list[str]:
        """Remove tmp/ entries left by killed processes (their lock is free). Idempotent."""
        if not self.tmp_dir.exists():
            return []
        self.ensure()
        dead: list[tuple[Path, int]] = []
        with self._tmp_guard(fcntl.LOCK_EX):  # no live entry is between made and locked
            for entry in sorted(self.tmp_dir.iterdir()):
                fd = self._take_if_dead(entry)
                if fd is not None:
                    dead.append((entry, fd))
        # Removed outside the guard (a tree may be large): their locks are ours now.
        for entry, fd in dead:
            try:
                remove_tree(entry)
                if entry.suffix != ".lock":
                    _guard_of(entry).unlink(missing_ok=True)
            finally:
                os.close(fd)
        return [entry.name for entry, _fd in dead]

    def _take_if_dead(self, entry: Path) -> int | None:
        """The lock of tmp/ entry `entry`, taken, if its owner is gone; else None. A
        directory is guarded by its sibling .lock file, a blob's temp file by itself; a
        .lock file alone is left by an owner killed between removing its directory and it.
        Caller holds locks/tmp exclusively."""
        if entry.suffix == ".lock":
            if entry.with_name(entry.name.removesuffix(".lock")).exists():
                return None  # judged with its directory
            guard = entry
        else:
            guard = _guard_of(entry) if entry.is_dir() else entry
        try:
            fd = _open_lock(guard)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    # -- blobs -------------------------------------------------------------------------

    def blob_path(self, digest: str) -> Path:
        return self.blobs_dir / oci.hex_of(digest)

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def blob_writer(self) -> BlobWriter:
        self.hold()
        return BlobWriter(self)

    def put_bytes(self, data: bytes, media_type: str) -> Descriptor:
        """Store `data` as a blob; idempotent."""
        self.hold()
        digest = oci.sha256_digest(data)
        if not self.has_blob(digest):
            atomic_write(self.blob_path(digest), data)
        return Descriptor(media_type, digest, len(data))

    def put_json(self, value: Any, media_type: str) -> Descriptor:
        return self.put_bytes(oci.canonical_json(value), media_type)

    def open_blob(self, digest: str) -> BinaryIO:
        try:
            return open(self.blob_path(digest), "rb")
        except FileNotFoundError as exc:
            raise StoreError(f"blob {digest} is missing from the store") from exc

    def read_json(self, digest: str) -> Any:
        with self.open_blob(digest) as f:
            data = f.read()
        if oci.sha256_digest(data) != digest:
            raise StoreError(f"blob {digest} is corrupt (digest mismatch)")
        return json.loads(data)

    # -- images and tags ---------------------------------------------------------------

    def put_image(
        self,
        config: dict[str, Any],
        layers: tuple[Layer, ...],
        annotations: dict[str, str] | None = None,
    ) -> Image:
        """Write config and manifest blobs for an image whose layer blobs are present."""
        for layer in layers:
            if not self.has_blob(layer.blob.digest):
                raise StoreError(f"layer {layer.blob.digest} is missing from the store")
        config_desc = self.put_json(config, oci.MT_CONFIG)
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": oci.MT_MANIFEST,
            "config": config_desc.to_json(),
            "layers": [layer.blob.to_json() for layer in layers],
        }
        if annotations:
            manifest["annotations"] = dict(sorted(annotations.items()))
        manifest_desc = self.put_json(manifest, oci.MT_MANIFEST)
        return Image(manifest_desc, config_desc, config, layers)

    def load_image(self, manifest: Descriptor) -> Image:
        doc = self.read_json(manifest.digest)
        config_desc = Descriptor.from_json(doc["config"])
        config = self.read_json(config_desc.digest)
        diff_ids = config.get("rootfs", {}).get("diff_ids", [])
        blobs = [Descriptor.from_json(d) for d in doc.get("layers", [])]
        if len(diff_ids) != len(blobs):
            raise StoreError(
                f"image {manifest.digest}: {len(blobs)} layers but "
                f"{len(diff_ids)} diff_ids in its config"
            )
        layers = tuple(Layer(b, d) for b, d in zip(blobs, diff_ids, strict=True))
        return Image(manifest, config_desc, config, layers)

    def _read_index(self) -> list[Descriptor]:
        path = self.oci_dir / "index.json"
        try:
            doc = json.loads(path.read_bytes())
        except FileNotFoundError:
            return []
        except ValueError as exc:
            raise StoreError(f"{path} is not valid JSON: {exc}") from exc
        return [Descriptor.from_json(m) for m in doc.get("manifests", [])]

    def _write_index(self, manifests: list[Descriptor]) -> None:
        ordered = sorted(manifests, key=lambda d: d.annotation(oci.ANN_REF_NAME) or "")
        doc = {
            "schemaVersion": 2,
            "mediaType": oci.MT_INDEX,
            "manifests": [m.to_json() for m in ordered],
        }
        atomic_write(self.oci_dir / "index.json", json.dumps(doc, indent=2).encode() + b"\n")

    def tag(self, ref: str, image: Image) -> str:
        """Point `ref` ("name[:tag]", see sysbake.oci.reference) at `image`, replacing any
        previous target; returns its store name ("name:tag"). Idempotent."""
        ref = Reference.parse(ref, allow_digest=False).store_name()
        tagged = image.manifest.with_annotations(**{oci.ANN_REF_NAME: ref})
        with self.lock():
            index = self._read_index()
            if tagged not in index:  # else nothing to write (a no-op build writes nothing)
                self._write_index(
                    [m for m in index if m.annotation(oci.ANN_REF_NAME) != ref] + [tagged]
                )
        return ref

    def untag(self, ref: str) -> bool:
        """Remove the tag `ref` ("name[:tag]"); False when there was none."""
        ref = Reference.parse(ref, allow_digest=False).store_name()
        with self.lock():
            manifests = self._read_index()
            kept = [m for m in manifests if m.annotation(oci.ANN_REF_NAME) != ref]
            if len(kept) == len(manifests):
                return False
            self._write_index(kept)
        return True

    def tags(self) -> list[Tagged]:
        """Every tag with its image, in name order; tags whose blobs are gone are skipped."""
        out = []
        for desc in self._read_index():
            ref = desc.annotation(oci.ANN_REF_NAME)
            if not ref:
                continue
            try:
                out.append(Tagged(ref, self.load_image(desc)))
            except StoreError:
                continue
        return out

    def resolve(self, ref: str) -> Image:
        """An image by reference: "name[:tag]", or "name[:tag]@digest" (an image tagged
        with that name whose manifest has that digest); by image ID (config digest) or
        its prefix of 4 or more hex digits, or manifest digest. ImageNotFound when there
        is none; InvalidReference when `ref` is neither a reference nor an ID."""
        try:
            wanted: Reference | None = Reference.parse(ref)
        except InvalidReference:
            if not _ID_RE.fullmatch(ref):
                raise
            wanted = None
        if wanted is not None:  # a tag: load that image only
            for desc in self._read_index():
                if _names(desc, wanted):
                    return self.load_image(desc)
        probe = ref.removeprefix("sha256:")
        if _ID_RE.fullmatch(ref):
            hits = {
                t.image.manifest.digest: t.image
                for t in self.tags()
                if oci.hex_of(t.image.id).startswith(probe)
                or oci.hex_of(t.image.manifest.digest).startswith(probe)
            }
            if len(hits) == 1:
                return next(iter(hits.values()))
            if len(hits) > 1:
                raise ImageNotFound(f"image ID prefix {ref!r} is ambiguous")
        raise ImageNotFound(f"no image {ref!r} in the store {self.root}")

    # -- unpacked layers ---------------------------------------------------------------

    def tree_path(self, diff_id: str) -> Path:
        return self.trees_dir / oci.hex_of(diff_id)

    def adopt_tree(self, diff_id: str, tree: Path) -> Path:
        """Move an already-built directory into place as the unpacked tree of `diff_id`
        (the caller guarantees it matches the layer, as when a stage just built it)."""
        self.hold()
        final = self.tree_path(diff_id)
        publish_dir(tree, final)  # an existing tree of `diff_id` is the same tree
        return final

    def layer_tree(self, layer: Layer) -> Path:
        """The layer unpacked as an overlayfs lowerdir (whiteouts as overlay expects them);
        unpacked once, then reused. Idempotent; safe against concurrent callers. A layer
        the check refuses (or whose content is not its diff ID) is a LayerError naming it,
        and leaves no tree."""
        final = self.tree_path(layer.diff_id)
        if final.exists():
            return final
        from sysbake.oci.layers import archive as layers

        with self.staging("unpack") as staging:
            target = staging / "tree"
            target.mkdir()
            with self._layer_error(layer), self._plain_layer(layer) as plain:
                layers.extract(plain, target, overlay=True, diff_id=layer.diff_id)
            self.mark_checked(layer.diff_id)
            with contextlib.suppress(OSError):
                publish_dir(target, final)
        if not final.exists():
            raise StoreError(f"could not unpack layer {layer.diff_id}")
        return final

    def check_layer(self, layer: Layer) -> None:
        """Refuse `layer` (LayerError naming its blob and the entry) unless it is a tar that
        sysbake.oci.layers.archive.validate_layer accepts and whose content is its diff ID;
        the check runs once per diff ID (see the module docstring)."""
        if (self.checked_dir / oci.hex_of(layer.diff_id)).exists():
            return
        from sysbake.oci.layers import archive as layers

        with self._layer_error(layer), self._plain_layer(layer) as plain:
            layers.validate_layer(plain, f"layer {layer.blob.digest}", diff_id=layer.diff_id)
        self.mark_checked(layer.diff_id)

    def check_image(self, image: Image) -> None:
        """check_layer for every layer of `image`, bottom to top."""
        for layer in image.layers:
            self.check_layer(layer)

    def mark_checked(self, diff_id: str) -> None:
        """Remember that the layer `diff_id` passed the check (or was written by us)."""
        self.ensure()
        # Not fsynced: a marker lost in a crash only costs one more check.
        atomic_write(self.checked_dir / oci.hex_of(diff_id), b"", durable=False)

    @contextlib.contextmanager
    def _plain_layer(self, layer: Layer) -> Iterator[Readable]:
        from sysbake.oci import compress

        with (
            self.open_blob(layer.blob.digest) as raw,
            compress.decompressor(layer.compression, raw) as plain,
        ):
            yield plain

    @staticmethod
    @contextlib.contextmanager
    def _layer_error(layer: Layer) -> Iterator[None]:
        """Name the layer in what its decompression or its check says."""
        what = f"layer {layer.blob.digest}"
        try:
            yield
        except LayerError as exc:
            if str(exc).startswith(what):
                raise
            raise LayerError(f"{what}: {exc}") from exc
        except CommandError as exc:  # the decompressor refused the stream
            raise LayerError(f"{what}: not a valid {layer.compression} stream ({exc})") from exc

    # -- garbage collection ------------------------------------------------------------

    def gc(
        self, extra_roots: set[str] | None = None, extra_trees: set[str] | None = None
    ) -> tuple[int, int]:
        """Delete blobs and trees that no tag and no cache record (`extra_roots`: blob
        digests, `extra_trees`: tree names) reaches. Returns (blobs removed, bytes freed).
        Idempotent. Waits for the processes that `hold` the store (builds, pulls): what
        they have added is reachable only once they are done."""
        with self.collecting(), self.lock():
            roots = set(extra_roots or ()) | {desc.digest for desc in self._read_index()}
            keep_blobs, keep_trees = self._reachable(roots)
            removed, freed = self._sweep_blobs(keep_blobs)
            self._sweep_trees(keep_trees | set(extra_trees or ()))
        return removed, freed

    def _reachable(self, roots: set[str]) -> tuple[set[str], set[str]]:
        """The blobs and tree names that `roots` (blob digests) reach: a manifest keeps its
        config, its layers and its layers' trees; a root that is no stored blob keeps nothing.
        Caller holds the lock."""
        keep_blobs: set[str] = set()
        keep_trees: set[str] = set()
        for digest in roots:
            if not oci.is_digest(digest) or not self.has_blob(digest):
                continue
            keep_blobs.add(digest)
            try:
                doc = self.read_json(digest)
            except (StoreError, ValueError, UnicodeDecodeError):
                continue  # a layer blob given directly as a root
            if isinstance(doc, dict) and "config" in doc:
                keep_blobs.add(doc["config"]["digest"])
                keep_blobs.update(d["digest"] for d in doc.get("layers", []))
                cfg = self.read_json(doc["config"]["digest"])
                keep_trees.update(oci.hex_of(d) for d in cfg.get("rootfs", {}).get("diff_ids", []))
        return keep_blobs, keep_trees

    def _sweep_blobs(self, keep: set[str]) -> tuple[int, int]:
        """Delete every blob whose digest is not in `keep`; returns (removed, bytes freed).
        Caller holds the lock."""
        removed = freed = 0
        for blob in self.blobs_dir.iterdir():
            if f"sha256:{blob.name}" not in keep:
                freed += blob.stat().st_size
                blob.unlink()
                removed += 1
        return removed, freed

    def _sweep_trees(self, keep: set[str]) -> None:
        """Delete every tree not in `keep` and not mounted, and the check markers of the
        trees not in `keep`. Caller holds the lock."""
        for tree in self.trees_dir.iterdir():
            if tree.name not in keep and not _tree_in_use(tree):
                remove_tree(tree)
        if self.checked_dir.is_dir():
            for marker in self.checked_dir.iterdir():
                # A hidden name is the temp file of a marker being written: markers are
                # written by readers too (`check_layer`), which do not hold the store.
                if marker.name not in keep and not marker.name.startswith("."):
                    marker.unlink(missing_ok=True)


def _tree_in_use(tree: Path) -> bool:
    # A lowerdir of a mounted overlay (a container or a build step) must stay.
    try:
        mounts = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return True
    # A legacy overlay mount names it by a short link, a prefix of its name
    # (sysbake.runtime.overlay): a relative lowerdir that is one keeps it too.
    short = re.findall(r"[,\s]lowerdir=([^,\s]*)", mounts)
    names = {n for value in short for n in value.split(":") if n and "/" not in n}
    return str(tree) in mounts or any(tree.name.startswith(n) for n in names)
