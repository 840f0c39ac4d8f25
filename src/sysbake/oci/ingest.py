"""Images and root filesystems users already have, brought into the store.

- `import_rootfs`: a root filesystem tarball (plain, gzip, zstd or xz, told by its first
  bytes; `docker export`, an LXC rootfs.tar.xz, sysbake's `export --format rootfs`) made
  one layer: extracted into staging by the layer Extractor (the one EntryCheck, then the
  disk checks: no `..`, absolute name, write through a symlink, hardlink to what the tar
  did not write, device node but the pseudo devices), optionally prepared, and committed
  by sysbake's own tree writer, whose tree the store keeps.
- `load_archive`: what `docker save`, `podman save` and `sysbake export` write: a
  docker-archive (manifest.json; docker 25's OCI-layout form too), an oci-archive, either
  gzip'd (or zstd, xz), or an OCI layout directory. Every image of it, with the names it
  carries (RepoTags; an index entry's ref name), or the one image under `tag`.

An archive is untrusted input, like a pulled image. Every blob read is checked against its
digest and size, every layer against the diff ID its config names and by the one
EntryCheck (`validate_layer`) as it is written: a blob is committed only once it passed
them all, and nothing is tagged until every image of the archive is stored; a refused
archive leaves no tag (what it left is unreachable, for `cache prune`). A docker-archive's
layers (plain tars) are stored compressed as the store's own; an OCI layout's blobs are
kept byte for byte (and so its manifest and image ID). Nothing here feeds the stage cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import stat
import sys
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, Protocol

from sysbake import log
from sysbake.errors import CommandError, LayerError, SysbakeError
from sysbake.oci import compress
from sysbake.oci import model as oci
from sysbake.oci.compress import CHUNK, Readable, Writable
from sysbake.oci.layers import archive as layers
from sysbake.oci.layers.apply import Extractor
from sysbake.oci.layers.commit import LAYER_LEVELS, commit_tree
from sysbake.oci.layers.tar import read_entries
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.records import record

MAX_MANIFEST = 4 << 20  # bytes of manifest.json, index.json or a manifest (as pull caps them)
MAX_CONFIG = 8 << 20  # bytes of an image config
_LAST_EPOCH = 253402300799  # the last second an OCI `created` stamp can name
_MAX_HOPS = 40  # links followed inside an archive to find a member
# Layer media types an archive may hold -> how they are compressed.
_SOURCE_LAYERS = {
    oci.MT_LAYER: "none",
    oci.MT_LAYER_GZIP: "gzip",
    oci.MT_LAYER_ZSTD: "zstd",
    oci.MT_DOCKER_LAYER_GZIP: "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "none",
}


class IngestError(SysbakeError):
    """An archive or rootfs tarball that cannot be brought in: names the file (and the
    image, blob or layer entry) and what was expected."""


@record
class Rootfs:
    """A rootfs tarball made a layer: the layer, its epoch (seconds since 1970) and the
    digest of the tarball's bytes as read."""

    layer: Layer
    epoch: int
    digest: str


@record
class Loaded:
    """An image of an archive, stored and tagged `ref`."""

    ref: str
    image: Image


# -- streams -----------------------------------------------------------------------------------


class _Hashing:
    """Passes reads through, hashing them; `sink` (when given) gets a copy, and more than
    `limit` bytes is an IngestError (`what` names the stream)."""

    def __init__(
        self, inner: Readable, sink: Writable | None = None, *, limit: int = -1, what: str = ""
    ) -> None:
        self._inner, self._sink, self._limit, self._what = inner, sink, limit, what
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(CHUNK if size < 0 else size)
        self._hash.update(data)
        self.size += len(data)
        if 0 <= self._limit < self.size:
            raise IngestError(f"{self._what}: more than its declared {self._limit} bytes")
        if self._sink is not None and data:
            self._sink.write(data)
        return data

    def drain(self) -> None:
        while self.read(CHUNK):
            pass

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


class _Prefixed:
    """`inner` with the bytes already read from it (to sniff them) given back first."""

    def __init__(self, head: bytes, inner: Readable) -> None:
        self._head, self._inner = head, inner

    def read(self, size: int = -1, /) -> bytes:
        if self._head:
            data, self._head = self._head, b""
            return data
        return self._inner.read(CHUNK if size < 0 else size)


def _sniffed(raw: Readable) -> tuple[str, Readable]:
    """(compression of `raw` told by its first bytes, `raw` from its start)."""
    head = b""
    while len(head) < 6:
        more = raw.read(6 - len(head))
        if not more:
            break
        head += more
    return compress.sniff(head), _Prefixed(head, raw)


@contextlib.contextmanager
def _errors(what: str, kind: str) -> Iterator[None]:
    """One line naming `what` for a refused layer or a broken `kind` stream."""
    try:
        yield
    except LayerError as exc:
        text = str(exc)
        raise IngestError(text if text.startswith(what) else f"{what}: {text}") from exc
    except CommandError as exc:  # the decompressor refused the stream
        raise IngestError(f"{what}: not a valid {kind} stream ({exc})") from exc


def open_regular(path: Path) -> IO[bytes]:
    """`path` opened for reading, refused (IngestError) unless it leads to a regular file:
    a FIFO or device is never opened for I/O, and a file swapped meanwhile is caught."""
    try:
        real = os.path.realpath(path)
        if not stat.S_ISREG(os.stat(real).st_mode):
            raise IngestError(f"{path}: not a regular file")
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc.strerror or exc}") from None
    f = os.fdopen(fd, "rb")
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        f.close()
        raise IngestError(f"{path}: not a regular file")
    return f


def file_digest(path: Path) -> str:
    """The sha256 digest of the regular file `path` (see `open_regular`)."""
    with open_regular(path) as f:
        hashed = _Hashing(f)
        hashed.drain()
    return hashed.digest


# -- a root filesystem tarball -----------------------------------------------------------------

Prepare = Callable[[Path, int], None]


def import_rootfs(
    store: Store,
    path: Path,
    *,
    compression: str = "gzip",
    epoch: int | None = None,
    expect: str | None = None,
    prepare: Prepare | None = None,
) -> Rootfs:
    """The rootfs tarball `path` as one layer of the store (see the module docstring).
    Its epoch is `epoch`, else the newest mtime of its entries; `prepare(tree, epoch)`
    may change the extracted tree before it is committed (mtimes later than the epoch are
    clamped to it). `expect`: the digest the tarball must have (its bytes changed since
    they were hashed otherwise)."""
    with open_regular(path) as f, store.staging("import") as staging:
        tree = staging / "rootfs"
        tree.mkdir(mode=0o755)
        hashed = _Hashing(f)
        kind, raw = _sniffed(hashed)
        with log.step(f"importing {path.name} ({kind})"):
            with _errors(str(path), kind), compress.decompressor(kind, raw) as plain:
                newest = _extract(plain, tree)
            hashed.drain()  # what follows the compressed stream is part of the file too
            if expect is not None and hashed.digest != expect:
                raise IngestError(
                    f"{path}: changed while it was read (its bytes hash to {hashed.digest}, "
                    f"not {expect})"
                )
            when = epoch if epoch is not None else newest
            if prepare is not None:
                prepare(tree, when)
            layer = commit_tree(store, tree, compression=compression, mtime=when)
        store.adopt_tree(layer.diff_id, tree)
    return Rootfs(layer, when, hashed.digest)


def _extract(plain: Readable, tree: Path) -> int:
    """Extract the tar `plain` into the empty directory `tree` (the Extractor: checked
    entry by entry); the newest mtime of its entries, within what `created` can name."""
    extractor = Extractor(tree, overlay=False, allow_devices=True)
    newest = 0
    try:
        for info, data in read_entries(plain):
            extractor.entry(info, data)
            newest = max(newest, min(int(info.mtime), _LAST_EPOCH))
        while plain.read(CHUNK):
            pass
    except tarfile.TarError as exc:
        raise LayerError(f"not a valid tar ({exc})") from exc
    extractor.finish()
    return newest


# -- archives: where their files are -------------------------------------------------------------


class _Source(Protocol):
    """The files of an archive or layout, by name ("manifest.json", "blobs/sha256/...")."""

    what: str

    def has(self, name: str) -> bool: ...

    def open(self, name: str) -> contextlib.AbstractContextManager[Readable]: ...


class _TarSource:
    """A seekable, uncompressed tar archive; its symlinks and hardlinks lead to other
    members (resolved among the members, never on the host)."""

    def __init__(self, f: IO[bytes], what: str) -> None:
        self.what = what
        self.members: dict[str, tarfile.TarInfo] = {}
        try:
            self._tar = tarfile.open(fileobj=f, mode="r:")  # noqa: SIM115 - f is the caller's
            for info in self._tar:
                name = _member_name(info.name)
                if name:
                    self.members[name] = info
        except (tarfile.TarError, EOFError) as exc:
            raise IngestError(f"{what}: not a tar archive ({exc})") from None

    def has(self, name: str) -> bool:
        return name in self.members

    def _regular(self, name: str) -> tarfile.TarInfo:
        wanted = name
        for _ in range(_MAX_HOPS):
            info = self.members.get(name)
            if info is None:
                raise IngestError(f"{self.what}: no file {wanted!r} in the archive")
            if info.isreg():
                return info
            if not (info.issym() or info.islnk()):
                raise IngestError(f"{self.what}: {wanted!r} is not a regular file")
            base = posixpath.dirname(name) if info.issym() else ""
            name = _member_name(posixpath.join(base, info.linkname))
        raise IngestError(f"{self.what}: {wanted!r}: too many levels of links")

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Readable]:
        f = self._tar.extractfile(self._regular(name))
        assert f is not None  # a regular member always has a file object
        with f:
            yield f


def _member_name(name: str) -> str:
    """A member name as looked up ("./a//b" -> "a/b"); "" for one that climbs out."""
    norm = posixpath.normpath("/" + name).lstrip("/")
    return "" if norm in ("", ".") else norm


class _LayoutSource:
    """An OCI layout directory; its files are opened inside it (rootfs.Root: its symlinks
    never lead to host files), regular files only."""

    def __init__(self, path: Path) -> None:
        from sysbake.rootfs import Root

        self.what = str(path)
        self._root = Root(path)

    def close(self) -> None:
        self._root.close()

    def has(self, name: str) -> bool:
        return self._root.is_file(name)

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Readable]:
        try:
            fd = self._root.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise IngestError(f"{self.what}: cannot read {name}: {exc.strerror or exc}") from None
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise IngestError(f"{self.what}: {name} is not a regular file")
            yield f


@contextlib.contextmanager
def _opened(store: Store, path: Path) -> Iterator[_Source]:
    """The archive or layout `path` ("-": standard input) as a _Source; a compressed or
    streamed archive is first written out plain into the store's staging."""
    if path.is_dir():
        layout = _LayoutSource(path)
        try:
            yield layout
        finally:
            layout.close()
        return
    what = "standard input" if str(path) == "-" else str(path)
    with contextlib.ExitStack() as stack:
        if str(path) == "-":
            kind, raw = _sniffed(sys.stdin.buffer)  # a pipe: spooled whatever it holds
        else:
            f = stack.enter_context(open_regular(path))
            kind, raw = compress.sniff(f.read(6)), f
            f.seek(0)
            if kind == "none":
                yield _TarSource(f, what)
                return
        staging = stack.enter_context(store.staging("load"))
        plain_path = staging / "archive.tar"
        with (
            log.step(f"reading {what} ({kind})"),
            open(plain_path, "wb") as out,
            _errors(what, kind),
            compress.decompressor(kind, raw) as plain,
        ):
            while chunk := plain.read(CHUNK):
                out.write(chunk)
        yield _TarSource(stack.enter_context(open(plain_path, "rb")), what)


# -- archives: what they hold --------------------------------------------------------------------


@record
class _Pending:
    """An image of the archive whose blobs are stored, before it is tagged: its config's
    bytes, its layers, its names, and its manifest when it is kept byte for byte."""

    where: str
    config: bytes
    layers: tuple[Layer, ...]
    names: tuple[str, ...]
    manifest: bytes | None = None


def load_archive(
    store: Store, path: Path, *, tag: str | None = None, compression: str = "gzip"
) -> list[Loaded]:
    """Store every image of the archive or layout `path` ("-": standard input) and tag it
    with the names it carries, or the one image it holds with `tag`; a docker-archive's
    layers are stored with `compression`. See the module docstring for the checks."""
    if tag is not None:
        tag = Reference.parse(tag, allow_digest=False).store_name()
    store.ensure()
    store.clean_stale()
    store.hold()
    with _opened(store, path) as src:
        if src.has("manifest.json"):
            pending = _docker_images(store, src, tag, compression)
        elif src.has("index.json"):
            pending = _oci_images(store, src, tag)
        else:
            raise IngestError(
                f"{src.what}: neither a docker-archive (no manifest.json) nor an OCI "
                "layout or oci-archive (no index.json)"
            )
    return [
        Loaded(store.tag(ref, image), image)
        for image, refs in [(_store_image(store, p), p.names) for p in pending]
        for ref in refs
    ]


def _names(carried: Sequence[tuple[str, ...]], tag: str | None, what: str) -> list[tuple[str, ...]]:
    """The store names of each image of an archive, told before any blob is written:
    `tag` for its one image; else the names each carries (an image without any is not
    loaded, with a warning, unless none has any: an error)."""
    if tag is not None:
        if len(carried) != 1:
            raise IngestError(
                f"{what}: holds {len(carried)} images: --tag names one (load it without "
                "--tag to keep the names each carries)"
            )
        return [(tag,)]
    if not any(carried):
        raise IngestError(f"{what}: its image carries no name: give one with --tag NAME:TAG")
    for number, names in enumerate(carried, 1):
        if not names:
            log.warn(f"{what}: image {number} carries no name: not loaded (give it --tag)")
    return list(carried)


def _store_image(store: Store, pending: _Pending) -> Image:
    """Write the config and manifest of an image whose layer blobs are stored."""
    config = store.put_bytes(pending.config, oci.MT_CONFIG)
    if pending.manifest is not None:
        manifest = store.put_bytes(pending.manifest, oci.MT_MANIFEST)
    else:
        doc = {
            "schemaVersion": 2,
            "mediaType": oci.MT_MANIFEST,
            "config": config.to_json(),
            "layers": [layer.blob.to_json() for layer in pending.layers],
        }
        manifest = store.put_json(doc, oci.MT_MANIFEST)
    try:
        return store.load_image(manifest)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IngestError(f"{pending.where}: malformed image ({exc})") from exc


def _read(src: _Source, name: str, cap: int) -> bytes:
    """The bytes of file `name` of `src`, refused beyond `cap` bytes."""
    with src.open(name) as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise IngestError(f"{src.what}: {name} is larger than {cap} bytes: refused")
    return data


def _json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except ValueError as exc:
        raise IngestError(f"{where}: not valid JSON ({exc})") from None


def _diff_ids(config: bytes, where: str, count: int) -> list[str]:
    """The diff IDs of the image config `config`, which must name `count` layers."""
    doc = _json(config, f"{where}: config")
    rootfs = doc.get("rootfs") if isinstance(doc, dict) else None
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list) or not all(
        isinstance(d, str) and oci.is_digest(d) for d in diff_ids
    ):
        raise IngestError(f"{where}: config: expected rootfs.diff_ids, a list of sha256 digests")
    if len(diff_ids) != count:
        raise IngestError(f"{where}: the config names {len(diff_ids)} diff_ids for {count} layers")
    return list(diff_ids)


def _known_layers(store: Store) -> dict[str, Layer]:
    """The checked layers of the store's tagged images, by diff ID: an archive's layer of
    the same diff ID needs no second copy."""
    known = {}
    for tagged in store.tags():
        for layer in tagged.image.layers:
            if (
                store.has_blob(layer.blob.digest)
                and (store.checked_dir / oci.hex_of(layer.diff_id)).exists()
            ):
                known[layer.diff_id] = layer
    return known


# -- docker-archive ------------------------------------------------------------------------------


def _docker_images(store: Store, src: _Source, tag: str | None, compression: str) -> list[_Pending]:
    """The images of a docker-archive's manifest.json that get a name, layers stored."""
    doc = _json(_read(src, "manifest.json", MAX_MANIFEST), f"{src.what}: manifest.json")
    if not isinstance(doc, list) or not doc:
        raise IngestError(f"{src.what}: manifest.json: expected a list of images")
    entries = [_docker_entry(entry, f"{src.what}: image {n}") for n, entry in enumerate(doc, 1)]
    names = _names([tags for _, _, tags in entries], tag, src.what)
    known = _known_layers(store)
    pending = []
    for number, (entry, named) in enumerate(zip(entries, names, strict=True), 1):
        if not named:
            continue
        config_name, layer_names, _ = entry
        where = f"{src.what}: image {number}"
        config = _read(src, config_name, MAX_CONFIG)
        diff_ids = _diff_ids(config, where, len(layer_names))
        stored = []
        for index, (name, diff_id) in enumerate(zip(layer_names, diff_ids, strict=True), 1):
            if diff_id not in known:
                what = f"{where}: layer {index}/{len(layer_names)} ({name})"
                with src.open(name) as raw:
                    log.info(f"    {what}")
                    known[diff_id] = ingest_plain(
                        store, raw, what, diff_id=diff_id, compression=compression
                    )
            stored.append(known[diff_id])
        pending.append(_Pending(where, config, tuple(stored), named))
    return pending


def _docker_entry(entry: object, where: str) -> tuple[str, list[str], tuple[str, ...]]:
    """(config file, layer files, store names) of one entry of manifest.json."""
    if not isinstance(entry, dict):
        raise IngestError(f"{where}: expected an object in manifest.json")
    config, layer_names = entry.get("Config"), entry.get("Layers")
    tags = entry.get("RepoTags") or []
    if not isinstance(config, str) or not config:
        raise IngestError(f"{where}: manifest.json: expected Config, a file name")
    if not isinstance(layer_names, list) or not all(isinstance(n, str) for n in layer_names):
        raise IngestError(f"{where}: manifest.json: expected Layers, a list of file names")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        raise IngestError(f"{where}: manifest.json: expected RepoTags, a list of names")
    return config, list(layer_names), tuple(_store_name(t, where) for t in tags)


def _store_name(text: str, where: str) -> str:
    try:
        return Reference.parse(text, allow_digest=False).store_name()
    except InvalidReference as exc:
        raise IngestError(f"{where}: the name {exc}") from None


def ingest_plain(
    store: Store, raw: Readable, what: str, *, diff_id: str, compression: str
) -> Layer:
    """A layer tar (plain, or compressed: told by its first bytes) stored as a blob of
    `compression`, committed once it passed the EntryCheck and hashes to `diff_id`."""
    kind, stream = _sniffed(raw)
    writer = store.blob_writer()
    try:
        with (
            _errors(what, kind),
            compress.compressor(compression, writer, level=LAYER_LEVELS.get(compression)) as sink,
            compress.decompressor(kind, stream) as plain,
        ):
            layers.validate_layer(_Hashing(plain, sink), what, diff_id=diff_id)
        blob = writer.commit(oci.LAYER_MEDIA_TYPE[compression])
    except BaseException:
        writer.discard()
        raise
    store.mark_checked(diff_id)
    return Layer(blob, diff_id)


# -- OCI layout, oci-archive ---------------------------------------------------------------------


def _oci_images(store: Store, src: _Source, tag: str | None) -> list[_Pending]:
    """The images index.json lists that get a name, their blobs stored."""
    index = _json(_read(src, "index.json", MAX_MANIFEST), f"{src.what}: index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list) or not entries:
        raise IngestError(f"{src.what}: index.json lists no image")
    descs = [_descriptor(entry, f"{src.what}: image {n}") for n, entry in enumerate(entries, 1)]
    names = _names([_index_names(d, src.what) for d in descs], tag, src.what)
    known = {(la.blob.digest, d): la for d, la in _known_layers(store).items()}
    pending = []
    for number, (desc, named) in enumerate(zip(descs, names, strict=True), 1):
        if named:
            where = f"{src.what}: image {number}"
            pending.append(_oci_image(store, src, desc, where, named, known))
    return pending


def _oci_image(
    store: Store,
    src: _Source,
    desc: Descriptor,
    where: str,
    names: tuple[str, ...],
    known: dict[tuple[str, str], Layer],
) -> _Pending:
    """The image an index entry names, its blobs stored (byte for byte: a layer the
    store has by digest and diff ID is not copied again)."""
    data, media_type = _manifest(src, desc, where)
    doc = _json(data, f"{where}: manifest")
    try:
        config_desc = Descriptor.from_json(doc["config"])
        blobs = [Descriptor.from_json(d) for d in doc.get("layers") or []]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IngestError(f"{where}: malformed manifest ({exc})") from None
    config = _blob(src, config_desc, MAX_CONFIG, f"{where}: config")
    diff_ids = _diff_ids(config, where, len(blobs))
    stored = []
    for number, (blob, diff_id) in enumerate(zip(blobs, diff_ids, strict=True), 1):
        if (blob.digest, diff_id) not in known:
            what = f"{where}: layer {number}/{len(blobs)} ({blob.digest})"
            log.info(f"    {what}")
            known[(blob.digest, diff_id)] = _ingest_blob(store, src, blob, what, diff_id)
        stored.append(known[(blob.digest, diff_id)])
    kept = media_type == oci.MT_MANIFEST and all(
        b.media_type == la.blob.media_type for b, la in zip(blobs, stored, strict=True)
    )
    return _Pending(where, config, tuple(stored), names, data if kept else None)


def _descriptor(entry: object, where: str) -> Descriptor:
    try:
        desc = Descriptor.from_json(entry)  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise IngestError(f"{where}: malformed descriptor ({exc})") from None
    if not oci.is_digest(desc.digest):
        raise IngestError(f"{where}: unsupported digest {desc.digest!r} (expected sha256)")
    return desc


def _blob(src: _Source, desc: Descriptor, cap: int, where: str) -> bytes:
    """A small blob (manifest, config) read whole and checked against `desc`."""
    if not oci.is_digest(desc.digest):
        raise IngestError(f"{where}: unsupported digest {desc.digest!r} (expected sha256)")
    if not 0 <= desc.size <= cap:
        raise IngestError(f"{where}: declares {desc.size} bytes (at most {cap}): refused")
    data = _read(src, f"blobs/sha256/{oci.hex_of(desc.digest)}", cap)
    if len(data) != desc.size or oci.sha256_digest(data) != desc.digest:
        raise IngestError(
            f"{where}: blob {desc.digest} holds {len(data)} bytes hashing to "
            f"{oci.sha256_digest(data)}, not the {desc.size} bytes it declares"
        )
    return data


def _manifest(src: _Source, desc: Descriptor, where: str) -> tuple[bytes, str]:
    """An index entry's image manifest (data, media type): through a nested index, its
    entry for this host's platform."""
    data = _blob(src, desc, MAX_MANIFEST, f"{where}: manifest")
    media_type = _media_type(data, desc, where)
    if media_type in (oci.MT_INDEX, oci.MT_DOCKER_LIST):
        chosen = _platform_entry(_json(data, f"{where}: index"), where)
        desc = _descriptor(chosen, where)
        data = _blob(src, desc, MAX_MANIFEST, f"{where}: manifest")
        media_type = _media_type(data, desc, where)
    if media_type not in (oci.MT_MANIFEST, oci.MT_DOCKER_MANIFEST):
        raise IngestError(
            f"{where}: unsupported manifest type {media_type!r} (expected an OCI or Docker "
            "schema2 image manifest)"
        )
    return data, media_type


def _media_type(data: bytes, desc: Descriptor, where: str) -> str:
    doc = _json(data, f"{where}: manifest")
    declared = doc.get("mediaType") if isinstance(doc, dict) else None
    return str(declared or desc.media_type)


def _platform_entry(index: Any, where: str) -> Any:
    """The entry of a multi-platform index for linux on this host's architecture."""
    arch = oci.host_platform()[1]
    entries = index.get("manifests") if isinstance(index, dict) else None
    for entry in entries if isinstance(entries, list) else []:
        plat = entry.get("platform") if isinstance(entry, dict) else None
        if isinstance(plat, dict) and (plat.get("os"), plat.get("architecture")) == ("linux", arch):
            return entry
    raise IngestError(f"{where}: its index has no image for linux/{arch}")


def _index_names(desc: Descriptor, where: str) -> tuple[str, ...]:
    """The store name an index entry carries: its ref name when that is a whole name
    (sysbake, skopeo, podman write "name:tag"); a bare tag (docker writes "latest")
    completes the name containerd's annotation gives; none otherwise."""
    ref = desc.annotation(oci.ANN_REF_NAME) or ""
    full = desc.annotation("io.containerd.image.name") or ""
    if ":" in ref or "/" in ref:
        return (_store_name(ref, where),)
    if full:
        return (_store_name(full, where),)
    return ()


def _ingest_blob(store: Store, src: _Source, desc: Descriptor, what: str, diff_id: str) -> Layer:
    """A layer blob of the layout copied byte for byte, committed once it matched its
    digest and size, passed the EntryCheck and unpacked to `diff_id`."""
    kind = _SOURCE_LAYERS.get(desc.media_type)
    if kind is None:
        raise IngestError(f"{what}: unsupported layer type {desc.media_type!r}")
    writer = store.blob_writer()
    try:
        with src.open(f"blobs/sha256/{oci.hex_of(desc.digest)}") as raw:
            copied = _Hashing(raw, writer, limit=desc.size, what=what)
            refused = None
            try:
                with _errors(what, kind), compress.decompressor(kind, copied) as plain:
                    layers.validate_layer(plain, what, diff_id=diff_id)
            except IngestError as exc:
                refused = exc  # the wrong bytes, if they are, say more: see below
            copied.drain()
        if writer.digest != desc.digest or writer.size != desc.size:
            raise IngestError(
                f"{what}: its {writer.size} bytes hash to {writer.digest}, not the "
                f"{desc.size} bytes of {desc.digest} its manifest names"
            ) from refused
        if refused is not None:
            raise refused
        blob = writer.commit(oci.LAYER_MEDIA_TYPE[kind])
    except BaseException:
        writer.discard()
        raise
    store.mark_checked(diff_id)
    return Layer(Descriptor(blob.media_type, blob.digest, blob.size, desc.annotations), diff_id)
