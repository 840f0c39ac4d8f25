"""Exports of stored images: an OCI layout, an oci-archive (a tar of one), a docker-archive
(`docker save` format) and the flattened root filesystem as one tar (`baseimage.tar.xz`).

Every layer passes the store's layer check (Store.check_layer: the same EntryCheck that
extraction applies) before anything is written, whatever the format: no export copies a
`..`, an absolute name, an escaping hardlink or a disk's device node out of a pulled layer.

Everything streams (no layer is held in memory) and writes are atomic: a file is written
under a hidden temp name and renamed (fsutil.atomic_file), a new layout is made as a
hidden temp dir and renamed (fsutil.publish_dir); an existing layout gets its blobs (each
atomically) before its index.json is replaced. Exports carry the full "name:tag"
(`org.opencontainers.image.ref.name`, `RepoTags`): skopeo (`oci:DIR:web:latest`) and umoci
(`--image DIR:web:latest`) accept it and `podman load` names the image after it, whereas a
bare "latest" would load as "localhost/latest:latest".
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, BinaryIO

from sysbake import log, proc, progress
from sysbake.errors import CommandError, SysbakeError
from sysbake.fsutil import atomic_file, publish_dir, remove_tree
from sysbake.oci import compress
from sysbake.oci import model as oci
from sysbake.oci.compress import Readable
from sysbake.oci.layers import archive as layers
from sysbake.oci.layers.commit import source_date_epoch
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.records import record

FORMATS = ("oci", "oci-archive", "docker-archive", "rootfs")
ROOTFS_COMPRESSIONS = ("none", "gzip", "zstd", "xz")
LAYER_COMPRESSIONS = ("none", "gzip", "zstd")
_SUFFIX_COMPRESSION = {
    ".tar": "none",
    ".gz": "gzip",
    ".tgz": "gzip",
    ".zst": "zstd",
    ".tzst": "zstd",
    ".xz": "xz",
    ".txz": "xz",
}
OCI_LAYOUT = oci.canonical_json({"imageLayoutVersion": "1.0.0"})
_CHUNK = 1 << 20

Opener = Callable[[], AbstractContextManager[Readable]]


class ExportError(SysbakeError):
    """Bad format or compression, unwritable or full destination, or a corrupt layer."""


# -- pure parts ----------------------------------------------------------------------------


def check_options(fmt: str, compression: str | None) -> str | None:
    """The compression an export uses (None: layers as stored), or an ExportError.

    rootfs compresses the whole tar (default xz); oci and oci-archive re-compress layers
    on request; docker-archive layers are always the uncompressed tars docker verifies."""
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "docker-archive" and compression not in (None, "none"):
        raise ExportError(
            f"docker-archive takes no compression (got {compression!r}): its "
            "layers are the uncompressed tars docker load checks"
        )
    kinds = ROOTFS_COMPRESSIONS if fmt == "rootfs" else LAYER_COMPRESSIONS
    kind = compression or ("xz" if fmt == "rootfs" else None)
    if kind is not None and kind not in kinds:
        what = "rootfs compression" if fmt == "rootfs" else "layer compression"
        where = "" if fmt == "rootfs" else f" for {fmt}"
        raise ExportError(f"unknown {what} {kind!r}{where}: expected one of {', '.join(kinds)}")
    return None if fmt == "docker-archive" else kind


def rootfs_compression_for(dest: Path) -> str:
    """The compression a rootfs export's file name asks for ("x.tar.zst": zstd); xz when
    the name says nothing (the classic rootfs.tar.xz)."""
    return _SUFFIX_COMPRESSION.get(dest.suffix, "xz")


def export_name(ref: str, tags: Collection[str], name: str | None = None) -> str | None:
    """The "name:tag" an export carries: `name` when given, else `ref` when it is one of
    the store's `tags`; None for an image ID (the export is then untagged)."""
    if name is not None:
        return Reference.parse(name, allow_digest=False).store_name()
    try:
        wanted = Reference.parse(ref, allow_digest=False).store_name()
    except InvalidReference:
        return None
    return wanted if wanted in tags else None


def docker_manifest(
    config_name: str, repo_tags: Sequence[str], layer_names: Sequence[str]
) -> bytes:
    """manifest.json of a `docker save` archive holding one image."""
    return oci.canonical_json(
        [{"Config": config_name, "RepoTags": list(repo_tags), "Layers": list(layer_names)}]
    )


def merge_index(existing: Sequence[Descriptor], new: Descriptor) -> list[Descriptor]:
    """An OCI index's manifests with `new` added: an entry with the same ref name (or,
    when `new` is untagged, an untagged entry with the same digest) is replaced."""
    name = new.annotation(oci.ANN_REF_NAME)
    kept = [
        d
        for d in existing
        if d.annotation(oci.ANN_REF_NAME) != name or (name is None and d.digest != new.digest)
    ]
    return sorted([*kept, new], key=lambda d: (d.annotation(oci.ANN_REF_NAME) or "", d.digest))


def oci_index(manifests: Sequence[Descriptor], annotations: dict[str, str] | None = None) -> bytes:
    """index.json of an OCI layout listing `manifests`, in the given order."""
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MT_INDEX,
        "manifests": [m.to_json() for m in manifests],
    }
    if annotations:
        doc["annotations"] = annotations
    return json.dumps(doc, indent=2, sort_keys=True).encode() + b"\n"


def blob_name(digest: str) -> str:
    return f"blobs/sha256/{oci.hex_of(digest)}"


class _Checked:
    """A reader that hashes what passes; `finish()` reads the rest and checks the digest."""

    def __init__(self, inner: Readable, digest: str, what: str) -> None:
        self._inner = inner
        self._digest = digest
        self._what = what
        self._hash = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(_CHUNK if size < 0 else size)
        self._hash.update(data)
        return data

    def finish(self) -> None:
        while self.read(_CHUNK):
            pass
        actual = "sha256:" + self._hash.hexdigest()
        if actual != self._digest:
            raise ExportError(
                f"{self._what}: content has digest {actual}, expected "
                f"{self._digest} (the store is corrupt: rebuild or re-pull it)"
            )


@contextlib.contextmanager
def _layer_stream(
    store: Store, layer: Layer, meter: progress.Meter | None = None
) -> Iterator[Readable]:
    """The uncompressed tar of `layer`, checked against its diff_id once read; the blob's
    bytes counted on `meter`."""
    with store.open_blob(layer.blob.digest) as blob:
        raw: Readable = blob if meter is None else meter.reader(blob)
        with compress.decompressor(layer.compression, raw) as plain:
            checked = _Checked(plain, layer.diff_id, f"layer {layer.blob.digest} uncompressed")
            yield checked
            checked.finish()


@contextlib.contextmanager
def _file_stream(path: Path, digest: str) -> Iterator[Readable]:
    with open(path, "rb") as raw:
        checked = _Checked(raw, digest, f"blob {path}")
        yield checked
        checked.finish()


@record
class _Entry:
    """One file of an export: its name inside, size, digest and how to read it; `path`
    is a file holding exactly that content (it may be hard-linked)."""

    name: str
    size: int
    digest: str
    opener: Opener
    path: Path | None = None


def _bytes_entry(name: str, data: bytes) -> _Entry:
    return _Entry(
        name, len(data), oci.sha256_digest(data), lambda: contextlib.nullcontext(io.BytesIO(data))
    )


def _file_entry(name: str, path: Path, desc: Descriptor) -> _Entry:
    return _Entry(
        name, desc.size, desc.digest, functools.partial(_file_stream, path, desc.digest), path
    )


def _write_tar(out: BinaryIO, entries: Sequence[_Entry], mtime: int) -> None:
    """A deterministic tar of `entries` (unique names) and their parent directories:
    sorted names, one mtime (SOURCE_DATE_EPOCH or 0), owner 0:0 with no names, fixed modes."""
    dirs = {str(p) for e in entries for p in Path(e.name).parents if str(p) != "."}
    items: list[tuple[str, _Entry | None]] = [(d, None) for d in dirs]
    items += [(e.name, e) for e in entries]
    for name, entry in sorted(items, key=lambda item: item[0]):
        info = tarfile.TarInfo(name)
        info.mtime = mtime
        info.type = tarfile.DIRTYPE if entry is None else tarfile.REGTYPE
        info.mode = 0o755 if entry is None else 0o644
        info.size = 0 if entry is None else entry.size
        out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        if entry is not None:
            _copy_exactly(entry, out)
            out.write(b"\0" * (-entry.size % tarfile.BLOCKSIZE))
    # End of archive: two zero blocks, no record padding (as docker's Go tar writes it).
    out.write(b"\0" * (2 * tarfile.BLOCKSIZE))


def _copy_exactly(entry: _Entry, out: BinaryIO) -> None:
    with entry.opener() as src:
        left = entry.size
        while left:
            chunk = src.read(min(_CHUNK, left))
            if not chunk:
                raise ExportError(
                    f"{entry.name}: ended after {entry.size - left} of "
                    f"{entry.size} bytes (did the store change meanwhile?)"
                )
            out.write(chunk)
            left -= len(chunk)


# -- OCI layouts ---------------------------------------------------------------------------


@record
class _Source:
    image: Image
    name: str | None  # the "name:tag" the export carries
    label: str  # for progress lines


def _resolve(store: Store, ref: str, name: str | None) -> _Source:
    """The image to export, its layers checked first (once per layer, see
    Store.check_layer): a refused layer is a LayerError before anything is written."""
    image = store.resolve(ref)
    store.check_image(image)
    named = export_name(ref, {t.ref for t in store.tags()}, name)
    return _Source(image, named, named or oci.hex_of(image.id)[:12])


def _recompress(store: Store, layer: Layer, kind: str, workdir: Path) -> tuple[Descriptor, Path]:
    log.info(f"    re-compressing layer {layer.diff_id[:19]} as {kind}")
    # Private to this export (a staging dir): any free name will do, no rename needed.
    fd, path = tempfile.mkstemp(dir=workdir, prefix="layer-")
    with os.fdopen(fd, "wb") as f:
        packed = layers.HashingWriter(f)
        with (
            progress.Meter(f"re-compressing ({kind})", layer.blob.size) as meter,
            _layer_stream(store, layer, meter) as plain,
            compress.compressor(kind, packed) as sink,
        ):
            shutil.copyfileobj(plain, sink, _CHUNK)
    return Descriptor(
        oci.LAYER_MEDIA_TYPE[kind], packed.digest, packed.size, layer.blob.annotations
    ), Path(path)


def _workdir(store: Store, image: Image, kind: str | None) -> AbstractContextManager[Path | None]:
    """Room in the store for re-compressed layers, when `kind` asks for any."""
    if kind is not None and any(layer.compression != kind for layer in image.layers):
        return store.staging("export")
    return contextlib.nullcontext(None)


def _plan_layout(
    store: Store, src: _Source, kind: str | None, workdir: Path | None
) -> tuple[Descriptor, list[_Entry]]:
    """The manifest (as index.json lists it) and blobs of `src` as an OCI layout; with
    `kind`, layers stored in another compression are re-compressed into `workdir` under a
    new manifest (the config, and so the diff_ids and the image ID, stay the same)."""
    image = src.image
    blobs: dict[str, _Entry] = {}
    layer_descs = []
    for layer in image.layers:
        if kind is None or layer.compression == kind:
            desc, path = layer.blob, store.blob_path(layer.blob.digest)
        else:
            assert workdir is not None
            desc, path = _recompress(store, layer, kind, workdir)
        layer_descs.append(desc)
        blobs[desc.digest] = _file_entry(blob_name(desc.digest), path, desc)
    config = image.config_descriptor
    blobs[config.digest] = _file_entry(
        blob_name(config.digest), store.blob_path(config.digest), config
    )
    if layer_descs == [layer.blob for layer in image.layers]:
        manifest = Descriptor(image.manifest.media_type, image.manifest.digest, image.manifest.size)
        blobs[manifest.digest] = _file_entry(
            blob_name(manifest.digest), store.blob_path(manifest.digest), manifest
        )
    else:
        doc = store.read_json(image.manifest.digest)
        doc["layers"] = [d.to_json() for d in layer_descs]
        data = oci.canonical_json(doc)
        manifest = Descriptor(image.manifest.media_type, oci.sha256_digest(data), len(data))
        blobs[manifest.digest] = _bytes_entry(blob_name(manifest.digest), data)
    if src.name:
        manifest = manifest.with_annotations(**{oci.ANN_REF_NAME: src.name})
    return manifest, list(blobs.values())


def _place(entry: _Entry, target: Path) -> None:
    """Put `entry` at `target`: a hard link when the content is a file on the same file
    system, else a checked copy written atomically (fsutil.atomic_file)."""
    try:
        if entry.path is not None:
            os.link(entry.path, target)
            return
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
            raise
    with atomic_file(target) as f, entry.opener() as src:
        shutil.copyfileobj(src, f, _CHUNK)


def _put_files(root: Path, entries: Sequence[_Entry], *, replace: bool = False) -> None:
    for entry in entries:
        target = root / entry.name
        target.parent.mkdir(parents=True, exist_ok=True)
        if replace or not target.exists():  # blobs are content-addressed: present is done
            _place(entry, target)


def _add_to_layout(dest: Path, manifest: Descriptor, blobs: Sequence[_Entry]) -> None:
    path = dest / "index.json"
    try:
        doc = json.loads(path.read_bytes())
        existing = [Descriptor.from_json(m) for m in doc.get("manifests", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ExportError(f"{path} is not a valid OCI index: {exc}") from exc
    _put_files(dest, blobs)
    index = oci_index(merge_index(existing, manifest), doc.get("annotations"))
    _put_files(dest, [_bytes_entry("index.json", index)], replace=True)


def _new_layout(dest: Path, manifest: Descriptor, blobs: Sequence[_Entry]) -> None:
    if dest.exists() and not (dest.is_dir() and not any(dest.iterdir())):
        raise ExportError(
            f"{dest} exists and is not an OCI layout (no oci-layout file): "
            "give a new or empty directory"
        )
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))
    try:
        os.chmod(tmp, 0o755)
        _put_files(
            tmp,
            [
                *blobs,
                _bytes_entry("oci-layout", OCI_LAYOUT),
                _bytes_entry("index.json", oci_index([manifest])),
            ],
        )
        if publish_dir(tmp, dest):  # replaces an empty directory
            return
    except BaseException:
        remove_tree(tmp)
        raise
    raise ExportError(
        f"{dest} was filled while the layout was written: give a new or empty directory"
    )


@contextlib.contextmanager
def _writing(dest: Path | str) -> Iterator[None]:
    """Turn the OS's and compressors' write failures into one line naming `dest`."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.EPIPE:
            raise
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ExportError(f"cannot write {dest}: no space left on device") from exc
        raise ExportError(f"cannot write {dest}: {(exc.strerror or str(exc)).lower()}") from exc
    except CommandError as exc:
        if "No space left on device" in f"{exc} {exc.tail}":
            raise ExportError(f"cannot write {dest}: no space left on device") from exc
        raise


@contextlib.contextmanager
def _output(dest: Path) -> Iterator[BinaryIO]:
    """A file to write an archive to: `dest` written atomically (fsutil.atomic_file), or
    stdout for "-". Not fsynced: an export is the user's file (like `tar -f` or
    `docker save -o` write it), unlike the store's blobs."""
    if str(dest) == "-":
        if sys.stdout.isatty():
            raise ExportError(
                "refusing to write an archive to a terminal: redirect stdout or give an output file"
            )
        with _writing("stdout"):
            yield sys.stdout.buffer
            sys.stdout.buffer.flush()
        return
    if dest.is_dir():
        raise ExportError(f"{dest} is a directory: give a file name for the archive")
    with _writing(dest), atomic_file(dest, durable=False, mode=None) as f:
        yield f


# -- the exports ---------------------------------------------------------------------------


def export_oci(
    store: Store,
    ref: str,
    dest_dir: Path,
    *,
    compression: str | None = None,
    name: str | None = None,
) -> Path:
    """Write image `ref` as an OCI layout at `dest_dir` (blobs hard-linked from the store
    when possible); an existing layout gets the image added, replacing a same-named one."""
    kind = check_options("oci", compression)
    src = _resolve(store, ref, name)
    with (
        log.step(f"exporting {src.label} as an OCI layout to {dest_dir}"),
        _writing(dest_dir),
        _workdir(store, src.image, kind) as workdir,
    ):
        manifest, blobs = _plan_layout(store, src, kind, workdir)
        if (dest_dir / "oci-layout").is_file():
            _add_to_layout(dest_dir, manifest, blobs)
        else:
            _new_layout(dest_dir, manifest, blobs)
    return dest_dir


def export_oci_archive(
    store: Store,
    ref: str,
    out: BinaryIO,
    *,
    compression: str | None = None,
    name: str | None = None,
) -> None:
    """Write image `ref` to `out` as an oci-archive: a deterministic tar of an OCI layout."""
    kind = check_options("oci-archive", compression)
    src = _resolve(store, ref, name)
    with (
        log.step(f"exporting {src.label} as an oci-archive"),
        _workdir(store, src.image, kind) as workdir,
    ):
        manifest, blobs = _plan_layout(store, src, kind, workdir)
        entries = [
            *blobs,
            _bytes_entry("oci-layout", OCI_LAYOUT),
            _bytes_entry("index.json", oci_index([manifest])),
        ]
        _write_tar(out, entries, source_date_epoch() or 0)


def export_docker_archive(
    store: Store, ref: str, out: BinaryIO, *, name: str | None = None
) -> None:
    """Write image `ref` to `out` in `docker save` format; each `<diff_id>/layer.tar` is
    the uncompressed layer, checked against its diff_id as it is written."""
    src = _resolve(store, ref, name)
    image = src.image
    with log.step(f"exporting {src.label} as a docker-archive"):
        entries: dict[str, _Entry] = {}
        layer_names = []
        for number, layer in enumerate(image.layers, 1):
            layer_name = f"{oci.hex_of(layer.diff_id)}/layer.tar"
            layer_names.append(layer_name)
            if layer_name in entries:
                continue
            # The tar header needs the uncompressed size first: a reading pass (also
            # checking the diff_id) costs less than spooling the layer to disk.
            opener = functools.partial(_layer_stream, store, layer)
            log.info(f"    layer {number}/{len(image.layers)}: measuring")
            with opener() as stream:
                size = sum(len(chunk) for chunk in iter(lambda: stream.read(_CHUNK), b""))
            entries[layer_name] = _Entry(layer_name, size, layer.diff_id, opener)
        config = image.config_descriptor
        config_name = f"{oci.hex_of(config.digest)}.json"
        entries[config_name] = _file_entry(config_name, store.blob_path(config.digest), config)
        manifest = docker_manifest(config_name, [src.name] if src.name else [], layer_names)
        entries["manifest.json"] = _bytes_entry("manifest.json", manifest)
        _write_tar(out, list(entries.values()), source_date_epoch() or 0)


def export_rootfs(store: Store, ref: str, out: BinaryIO, compression: str = "xz") -> None:
    """Write the flattened root filesystem of image `ref` to `out` as one tar, compressed
    with `compression` (none, gzip, zstd or xz). A one-layer image is re-read from its
    unpacked tree when the store has it (the same bytes as the layer, no decompression);
    otherwise every layer blob is checked against its digests while it is read."""
    kind = check_options("rootfs", compression)
    assert kind is not None
    src = _resolve(store, ref, None)
    # Progress: the bytes read of the layer blobs (or of the tree), as a part of all.
    label = f"compressing ({kind})" if kind != "none" else "writing"
    meter = progress.Meter(label, sum(la.blob.size for la in src.image.layers))
    openers = [functools.partial(_layer_stream, store, layer, meter) for layer in src.image.layers]
    with (
        log.step(f"exporting the root filesystem of {src.label} as a tar ({kind})"),
        meter,
    ):
        if len(openers) == 1:
            tree = store.tree_path(src.image.layers[0].diff_id)
            if tree.is_dir():
                # The tree is the layer (commit_tree clamps it; see store.adopt_tree): our
                # deterministic writer gives the layer's bytes back, faster than inflating
                # the gzip blob on one core.
                if meter.status.mode != "off":
                    meter.total = progress.tree_bytes(tree)
                with compress.compressor(kind, out) as sink:
                    layers.write_tree_tar(tree, meter.writer(sink), mtime=None)
                return
            # One layer is already the whole tree (no whiteouts to apply): pipe it through.
            if _piped_rootfs(store, src.image.layers[0], out, kind, meter):
                return
        with compress.compressor(kind, out) as sink:
            if len(openers) == 1:
                with openers[0]() as plain:
                    shutil.copyfileobj(plain, sink, _CHUNK)
            else:
                layers.flatten(openers, sink, mtime=source_date_epoch())


@contextlib.contextmanager
def _checked_blob(path: Path, expected: str) -> Iterator[BinaryIO]:
    """Blob file `path` open at its start, once its content was checked against `expected`."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
        if f"sha256:{digest.hexdigest()}" != expected:
            raise ExportError(
                f"blob {expected} has digest sha256:{digest.hexdigest()} (the store is corrupt)"
            )
        f.seek(0)
        yield f


def _piped_rootfs(
    store: Store, layer: Layer, out: BinaryIO, kind: str, meter: progress.Meter
) -> bool:
    """Fast path of a one-layer rootfs export: decompressor | compressor joined by an OS
    pipe, writing straight into `out`, with no Python copy in between. The blob is checked
    against its digest first, which vouches for the diff_id committed with it. False when
    the path does not apply (no file descriptor, no external tool for a side)."""
    tools = {"gzip": "pigz", "zstd": "zstd", "xz": "xz"}
    if kind not in tools or layer.compression not in tools or compress.gzip_backend() != "pigz":
        return False
    out_fd = compress.file_descriptor(out)
    if out_fd is None:
        return False
    level = compress.DEFAULT_LEVELS[kind]
    decode = [tools[layer.compression], "-d", "-c"]
    encode = [tools[kind], f"-{level}", "-c", *(["-n"] if kind == "gzip" else ["-T0", "-q"])]
    # The blob checked, then given to the decoder as its stdin: the offset it shares with
    # us is the progress.
    with (
        _checked_blob(store.blob_path(layer.blob.digest), layer.blob.digest) as blob,
        progress.file_position(meter, blob.fileno()),
        subprocess.Popen(
            decode,
            stdin=blob,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            preexec_fn=proc.die_with_parent_hook(),
        ) as dec,
    ):
        with subprocess.Popen(
            encode,
            stdin=dec.stdout,
            stdout=out_fd,
            stderr=subprocess.PIPE,
            preexec_fn=proc.die_with_parent_hook(),
        ) as enc:
            assert dec.stdout is not None
            dec.stdout.close()
            _, enc_err = enc.communicate()
        _, dec_err = dec.communicate()
    # The encoder first: when it fails (a full disk), the decoder only dies of SIGPIPE.
    for argv, rc, err in ((encode, enc.returncode, enc_err), (decode, dec.returncode, dec_err)):
        if rc != 0:
            text = err.decode(errors="replace").strip().splitlines()
            if any("No space left" in line for line in text):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            raise ExportError(f"{argv[0]} failed (exit {rc}): {text[-1] if text else ''}")
    return True


def export_image(
    store: Store,
    ref: str,
    fmt: str,
    dest: Path,
    compression: str | None = None,
    *,
    name: str | None = None,
) -> Path:
    """Export image `ref` in format `fmt` to `dest` (a directory for "oci", else a file,
    "-" meaning stdout); `name` overrides the "name:tag" the export carries. A rootfs
    export without `compression` takes it from the file name (see rootfs_compression_for)."""
    if fmt == "rootfs" and compression is None:
        compression = rootfs_compression_for(dest)
    kind = check_options(fmt, compression)
    # An unknown image, or a layer the check refuses, fails before anything is created.
    store.check_image(store.resolve(ref))
    if fmt == "oci":
        if str(dest) == "-":
            raise ExportError(
                "the oci format writes a directory: give one as the output "
                "(or use oci-archive to write to stdout)"
            )
        return export_oci(store, ref, dest, compression=kind, name=name)
    with _output(dest) as out:
        if fmt == "oci-archive":
            export_oci_archive(store, ref, out, compression=kind, name=name)
        elif fmt == "docker-archive":
            export_docker_archive(store, ref, out, name=name)
        else:
            assert kind is not None
            export_rootfs(store, ref, out, kind)
    return dest
