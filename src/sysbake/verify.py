"""`sysbake verify`: rebuild an image's project without the cache and compare the result.

The image names its project image (label io.sysbake.image); the project, as it is now, is
built again in a scratch store inside the store's tmp/ that shares only the .deb cache and
the Salt toolchains (downloads and compilers, not results) and the containers' directory.
The verdict is the same manifest digest ("reproducible"), or what differs: fields of the
config, and per layer the files whose type, content, mode, owner, mtime, xattrs, link
target or device differ, or that only one side has; and for each stage whose key changed,
the first input that did. Layers are compared as their tars (the bytes the digests hash),
never unpacked.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from sysbake import log
from sysbake.build.cache import StageCache, explain
from sysbake.build.context import BuildOptions
from sysbake.build.pipeline import build_project
from sysbake.errors import BuildError, LayerError
from sysbake.oci import compress
from sysbake.oci.compress import Readable
from sysbake.oci.layers.tar import read_entries
from sysbake.oci.model import Image, Layer
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.project.specs import Project
from sysbake.records import record, replace

IMAGE_LABEL = "io.sysbake.image"
STAGE_LABEL = "io.sysbake.stage."
ONLY_IMAGE = "only in the image"
ONLY_REBUILD = "only in the rebuild"
# Caches a rebuild shares with the store: what they hold is checked where it is used (apt
# checks each .deb against the lists it just fetched; a toolchain is keyed by its inputs).
SHARED_CACHES = ("debs", "toolchains")
# And the containers' directory: the rebuild's build containers are the store's, so the
# next command reaps them (sysbake.runtime.owners) if verify is killed.
SHARED = (*SHARED_CACHES, "containers")


class Entry(NamedTuple):
    """What a layer says of one path: everything its tar entry carries, content hashed."""

    kind: str
    mode: int
    owner: tuple[int, int]
    mtime: float
    xattrs: tuple[tuple[str, str], ...]
    link: str
    device: tuple[int, int]
    content: str  # sha256 of a regular file's bytes ("" for other kinds)


# The aspect names of FileDiff.differs, in the order they are reported.
ASPECTS = ("type", "content", "mode", "owner", "mtime", "xattrs", "link", "device")
_KINDS = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.CONTTYPE: "file",
    tarfile.DIRTYPE: "directory",
    tarfile.SYMTYPE: "symlink",
    tarfile.LNKTYPE: "hardlink",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.FIFOTYPE: "fifo",
}


@record
class FileDiff:
    """One path that differs in layer `layer` (1 = the bottom one) of stage `stage`."""

    layer: int
    stage: str
    path: str
    differs: tuple[str, ...]

    def __str__(self) -> str:
        return f"layer {self.layer} ({self.stage}): /{self.path}: {', '.join(self.differs)}"

    def to_json(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "stage": self.stage,
            "path": self.path,
            "differs": list(self.differs),
        }


@record
class Verdict:
    """The comparison of an image with its rebuild."""

    image: str
    digest: str  # the image's manifest digest
    rebuilt: str  # the rebuild's
    files: tuple[FileDiff, ...] = ()
    config: tuple[str, ...] = ()  # config fields that differ ("created", "history[2].comment")
    notes: tuple[str, ...] = ()  # layer-level findings (counts, compression) and stage inputs
    # Every image the rebuild made (the target and its in-file parents): name, manifest digest.
    images: tuple[tuple[str, str], ...] = ()

    @property
    def reproducible(self) -> bool:
        return self.digest == self.rebuilt

    def lines(self) -> list[str]:
        """The verdict as `verify` prints it."""
        if self.reproducible:
            return [f"reproducible {self.digest}"]
        out = [f"not reproducible: {self.image} is {self.digest}, its rebuild {self.rebuilt}"]
        out += [str(f) for f in self.files]
        out += [f"config: {name}" for name in self.config]
        out += self.notes
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "image": self.image,
            "reproducible": self.reproducible,
            "digest": self.digest,
            "rebuilt": self.rebuilt,
            "files": [f.to_json() for f in self.files],
            "config": list(self.config),
            "notes": list(self.notes),
            "images": dict(self.images),
        }


def verify(store: Store, ref: str, project: Project) -> Verdict:
    """Rebuild image `ref` of `store` from `project` in a scratch store without the cache,
    and compare (README, "Reproducible builds")."""
    image = store.resolve(ref)
    labels = (image.config.get("config") or {}).get("Labels") or {}
    name = labels.get(IMAGE_LABEL)
    if not isinstance(name, str) or not name:
        raise BuildError(f"{ref}: no {IMAGE_LABEL} label: not built by sysbake, nothing to rebuild")
    spec = project.image(name)
    with store.staging("verify") as scratch_dir:
        scratch = _scratch_store(store, scratch_dir / "store")
        _seed_parents(store, scratch, project, spec.name)
        log.info(f"==> verify {ref}: rebuilding {spec.name} without the cache")
        options = BuildOptions(targets=(spec.name,), no_cache=True, compression=_compression(image))
        results = build_project(project, scratch, options)
        rebuilt = next(r.image for r in results if r.name == spec.name)
        verdict = compare(ref, (store, image), (scratch, rebuilt))
        return replace(verdict, images=tuple((r.name, r.image.manifest.digest) for r in results))


def _compression(image: Image) -> str:
    """The compression `build` used for `image`'s layers (its top layer's; gzip, the
    default, for one whose layers `build --compression` cannot have made)."""
    kind = image.layers[-1].compression if image.layers else "gzip"
    return kind if kind in ("gzip", "zstd") else "gzip"


def _scratch_store(store: Store, root: Path) -> Store:
    """An empty store at `root` whose .deb cache, Salt toolchains and containers' directory
    are `store`'s."""
    root.mkdir(mode=0o700)
    for name in SHARED:
        shared = (store.root / name).resolve()
        shared.mkdir(parents=True, exist_ok=True)
        (root / name).symlink_to(shared)
    return Store(root).ensure()


def _seed_parents(store: Store, scratch: Store, project: Project, target: str) -> None:
    """Give `scratch` the parents from the store that the images built for `target` start
    from (`from` an image that is not in the project): their blobs linked, their tag set."""
    for spec in project.build_order([target]):
        if spec.parent is None or spec.parent_is_local:
            continue
        parent = store.resolve(spec.parent)
        digests = [parent.manifest.digest, parent.config_descriptor.digest]
        for digest in digests + [layer.blob.digest for layer in parent.layers]:
            if not scratch.has_blob(digest):
                _link_or_copy(store.blob_path(digest), scratch.blob_path(digest))
        scratch.tag(_parent_tag(spec.parent, parent), parent)


def _parent_tag(text: str, parent: Image) -> str:
    """A tag under which a store resolves `text` (a reference, pinned or not, or an image
    ID) to `parent`, the image that `text` names in the store it came from."""
    try:
        return Reference.parse(text).store_name()
    except InvalidReference:  # an image ID: found whatever its tag
        return f"sysbake-verify-parent:{parent.id.removeprefix('sha256:')[:12]}"


def _link_or_copy(src: Path, dest: Path) -> None:
    """`dest` made the same file as `src` (both in one store: a link, else a copy)."""
    import shutil

    try:
        os.link(src, dest)
    except OSError:
        partial = dest.with_name(f".{dest.name}.{os.getpid()}")
        shutil.copyfile(src, partial)
        os.replace(partial, dest)


def compare(ref: str, image: tuple[Store, Image], rebuilt: tuple[Store, Image]) -> Verdict:
    """The verdict on `image` (the store holding it, the image) against its rebuild."""
    (store, old), (scratch, new) = image, rebuilt
    if old.manifest.digest == new.manifest.digest:
        return Verdict(ref, old.manifest.digest, new.manifest.digest)
    files: list[FileDiff] = []
    notes: list[str] = []
    if len(old.layers) != len(new.layers):
        notes.append(f"layers: the image has {len(old.layers)}, its rebuild {len(new.layers)}")
    names = layer_stages(old.config)
    for index, (a, b) in enumerate(zip(old.layers, new.layers, strict=False)):
        if a.diff_id == b.diff_id:
            if a.blob.digest != b.blob.digest:
                notes.append(f"layer {index + 1}: the same files, compressed differently")
            continue
        stage = names[index] if index < len(names) else "?"
        with _plain(store, a) as left, _plain(scratch, b) as right:
            differences = diff_layers(entries(left), entries(right))
        files += [FileDiff(index + 1, stage, path, what) for path, what in differences]
    notes += stage_inputs(store, scratch, old.config, new.config)
    config = diff_config(old.config, new.config)
    return Verdict(
        ref, old.manifest.digest, new.manifest.digest, tuple(files), config, tuple(notes)
    )


@contextlib.contextmanager
def _plain(store: Store, layer: Layer) -> Iterator[Readable]:
    """The uncompressed tar of `layer`, read from `store`."""
    with (
        store.open_blob(layer.blob.digest) as raw,
        compress.decompressor(layer.compression, raw) as plain,
    ):
        yield plain


def entries(src: Readable) -> dict[str, Entry]:
    """Every entry of the layer tar `src` by its canonical name (no "./", no trailing "/"),
    regular files' content hashed; the last entry of a name wins, as when it is applied."""
    out: dict[str, Entry] = {}
    try:
        for info, data in read_entries(src):
            out[_name(info.name)] = _entry(info, data)
    except tarfile.TarError as exc:
        raise LayerError(f"not a valid tar ({exc})") from exc
    return out


def _name(name: str) -> str:
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def _entry(info: tarfile.TarInfo, data: Readable | None) -> Entry:
    content = ""
    if data is not None:
        digest = hashlib.sha256()
        while chunk := data.read(compress.CHUNK):
            digest.update(chunk)
        content = digest.hexdigest()
    xattrs = tuple(
        sorted((k, v) for k, v in info.pax_headers.items() if k.startswith("SCHILY.xattr."))
    )
    device = (info.devmajor, info.devminor) if info.ischr() or info.isblk() else (0, 0)
    return Entry(
        _KINDS.get(info.type, repr(info.type)),
        info.mode,
        (info.uid, info.gid),
        float(info.mtime),
        xattrs,
        info.linkname if info.issym() or info.islnk() else "",
        device,
        content,
    )


def diff_layers(
    old: Mapping[str, Entry], new: Mapping[str, Entry]
) -> list[tuple[str, tuple[str, ...]]]:
    """The paths whose entries differ between two layers, in name order, each with the
    aspects that differ (ASPECTS), or ONLY_IMAGE / ONLY_REBUILD."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for path in sorted(old.keys() | new.keys()):
        a, b = old.get(path), new.get(path)
        if a is None:
            out.append((path, (ONLY_REBUILD,)))
        elif b is None:
            out.append((path, (ONLY_IMAGE,)))
        elif a != b:
            out.append((path, aspects(a, b)))
    return out


def aspects(a: Entry, b: Entry) -> tuple[str, ...]:
    """What differs between two entries of one path (ASPECTS; "type" alone when the kinds
    differ: the rest then compares unlike things)."""
    if a.kind != b.kind:
        return ("type",)
    pairs = {
        "content": (a.content, b.content),
        "mode": (a.mode, b.mode),
        "owner": (a.owner, b.owner),
        "mtime": (a.mtime, b.mtime),
        "xattrs": (a.xattrs, b.xattrs),
        "link": (a.link, b.link),
        "device": (a.device, b.device),
    }
    return tuple(name for name in ASPECTS if name in pairs and pairs[name][0] != pairs[name][1])


def layer_stages(config: Mapping[str, Any]) -> list[str]:
    """The stage that made each layer of an image, bottom first, from its history (the
    entries that are not empty layers; sysbake writes "sysbake STAGE KEY" comments)."""
    names = []
    for entry in config.get("history") or ():
        if not isinstance(entry, Mapping) or entry.get("empty_layer"):
            continue
        comment = str(entry.get("comment") or "")
        words = comment.split()
        if len(words) >= 2 and words[0] == "sysbake":
            names.append(words[1])
        else:
            names.append(str(entry.get("created_by") or "?"))
    return names


def diff_config(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[str, ...]:
    """The fields of two image configs that differ, as paths ("created",
    'config.Labels["io.sysbake.stage.site"]', "history[2].comment"); the layers' diff IDs
    left out (the layers are compared file by file)."""

    def strip(doc: Mapping[str, Any]) -> dict[str, Any]:
        rootfs = {k: v for k, v in (doc.get("rootfs") or {}).items() if k != "diff_ids"}
        return {**doc, "rootfs": rootfs}

    return tuple(_diff_paths(strip(old), strip(new), ""))


def _diff_paths(a: object, b: object, path: str) -> Iterator[str]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b), key=str):
            yield from _diff_paths(a.get(key), b.get(key), _child(path, str(key)))
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff_paths(x, y, f"{path}[{index}]")
    elif a != b:
        yield path


def _child(path: str, key: str) -> str:
    """The path of field `key` of the object at `path`; brackets when the key has dots."""
    if "." in key or "[" in key or not key:
        return f'{path}["{key}"]'
    return f"{path}.{key}" if path else key


def stage_inputs(
    store: Store, scratch: Store, old: Mapping[str, Any], new: Mapping[str, Any]
) -> list[str]:
    """For each stage whose key differs between two configs (their io.sysbake.stage.*
    labels), the first input that changed, when this store still has the image's record."""
    old_keys, new_keys = _stage_keys(old), _stage_keys(new)
    notes = []
    for stage, key in sorted(new_keys.items()):
        before = old_keys.get(stage)
        if before is None or before == key:
            continue
        old_rec = StageCache(store).lookup(before)
        new_rec = StageCache(scratch).lookup(key)
        if old_rec is None or new_rec is None:
            notes.append(f"stage {stage}: its inputs changed since the image was built")
        else:
            reason = explain(old_rec.inputs, new_rec.inputs)
            notes.append(f"stage {stage}: its inputs changed since the image was built: {reason}")
    return notes


def _stage_keys(config: Mapping[str, Any]) -> dict[str, str]:
    labels = (config.get("config") or {}).get("Labels") or {}
    return {
        str(k).removeprefix(STAGE_LABEL): str(v)
        for k, v in labels.items()
        if str(k).startswith(STAGE_LABEL)
    }
