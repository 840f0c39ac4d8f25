"""The stage cache: a stage's key is the hash of all its inputs; a record maps it to a layer.

Records live in <store>/cache/stages/<key>.json (written atomically, after the layer blob is
committed, so a record never points at a missing blob). <store>/cache/last/<image>/<stage>
remembers the key of the previous build of that stage, which is what `--explain` compares.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

from sysbake import __version__
from sysbake.errors import BuildError
from sysbake.fsutil import atomic_write
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Layer
from sysbake.oci.store import Store
from sysbake.records import record

KEY_SCHEMA = 1  # bump when the meaning of an input changes


def stage_key(inputs: dict[str, Any]) -> str:
    """The cache key of a stage: sha256 over its canonical inputs and the tool version."""
    doc = {"inputs": inputs, "sysbake": __version__, "schema": KEY_SCHEMA}
    return oci.sha256_digest(oci.canonical_json(doc)).removeprefix("sha256:")


def hash_tree(path: Path) -> str:
    """A digest of a file or directory tree: names, types, modes, link targets, contents.
    Owners and mtimes are left out on purpose: a fresh checkout must hit the cache. `path`
    itself is followed when it is a link (the project file checks where it leads); nothing
    under it is: a link is hashed as its target, and names as bytes, whatever their encoding."""
    top = os.fsencode(os.path.realpath(path))
    try:
        st = os.stat(top)
        if not stat.S_ISDIR(st.st_mode):
            return oci.sha256_digest(
                b"F" + oct(st.st_mode & 0o7777).encode() + b"\0" + _file_digest(top)
            )
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        raise BuildError(f"{path}: cannot read: {exc.strerror}") from None
    # The tree's description, hashed at the end: each file's content is in it as its own
    # digest. Depth first, each directory's entries in byte order; iterative: a tree may be
    # deeper than Python's recursion limit.
    parts: list[bytes] = []
    todo = [(b".", st.st_mode)]
    while todo:
        rel, mode = todo.pop()
        parts.append(b"D\0" + rel + b"\0" + oct(mode).encode() + b"\0")
        where = top if rel == b"." else os.path.join(top, rel)
        try:
            subdirs = _describe_entries(parts, where)
        except OSError as exc:
            raise BuildError(f"{os.fsdecode(where)}: cannot read: {exc.strerror}") from None
        todo += [(name if rel == b"." else rel + b"/" + name, m) for name, m in reversed(subdirs)]
    return oci.sha256_digest(b"".join(parts))


def _describe_entries(parts: list[bytes], directory: bytes) -> list[tuple[bytes, int]]:
    """Describe in `parts` the entries of `directory` that are not directories (links to
    them included); return its subdirectories (name, mode), sorted. Nothing is opened
    through a link."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        with os.scandir(fd) as it:
            entries = sorted(
                (os.fsencode(e.name), e.stat(follow_symlinks=False).st_mode) for e in it
            )
        subdirs = []
        for name, mode in entries:
            if stat.S_ISDIR(mode):
                subdirs.append((name, mode))
                continue
            parts.append(name + b"\0" + oct(mode).encode() + b"\0")
            if stat.S_ISLNK(mode):
                parts.append(os.readlink(name, dir_fd=fd) + b"\0")
            elif stat.S_ISREG(mode):
                parts.append(_file_digest(name, dir_fd=fd))
        return subdirs
    finally:
        os.close(fd)


_SMALL_FILE = 1 << 20  # read whole and hashed by oci.sha256_digest; larger ones streamed


def _file_digest(path: bytes, dir_fd: int | None = None) -> bytes:
    """b"sha256:<hex>" of a regular file's content; b"-" when `path` is no longer one."""
    # O_NOFOLLOW: a file swapped for a link is not read; O_NONBLOCK: nor does a FIFO hang.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return b"-"
        if st.st_size < _SMALL_FILE:
            return oci.sha256_digest(f.read()).encode()
        import hashlib

        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        return b"sha256:" + h.hexdigest().encode()


@record
class Origin:
    """Where a stage came from when it was not built here: the image a cache source named
    by the user (`build --cache-from`) published it in."""

    registry: str
    repository: str
    manifest: str  # the manifest digest in that registry

    def __str__(self) -> str:
        return f"{self.registry}/{self.repository}@{self.manifest}"

    def to_json(self) -> dict[str, str]:
        return {"registry": self.registry, "repository": self.repository, "manifest": self.manifest}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Origin:
        return cls(str(doc["registry"]), str(doc["repository"]), str(doc["manifest"]))


@record
class StageRecord:
    """A cached stage: its inputs and the layer it produced; `origin` names the cache
    source it was taken from (None: built by this store)."""

    key: str
    image: str
    stage: str
    inputs: dict[str, Any]
    layer: Layer
    created: str
    created_by: str
    origin: Origin | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {
            "key": self.key,
            "image": self.image,
            "stage": self.stage,
            "inputs": self.inputs,
            "layer": self.layer.blob.to_json(),
            "diff_id": self.layer.diff_id,
            "created": self.created,
            "created_by": self.created_by,
        }
        if self.origin is not None:
            doc["origin"] = self.origin.to_json()
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StageRecord:
        origin = doc.get("origin")
        return cls(
            key=doc["key"],
            image=doc["image"],
            stage=doc["stage"],
            inputs=doc["inputs"],
            layer=Layer(Descriptor.from_json(doc["layer"]), doc["diff_id"]),
            created=doc["created"],
            created_by=doc.get("created_by", ""),
            origin=Origin.from_json(origin) if origin is not None else None,
        )


class StageSource(Protocol):
    """A cache source the user named for one build that is asked per stage key (a
    registry's stage cache, sysbake.registry.stagecache): `offer` answers the record of
    `key`, its layer blob already fetched into the store and checked, naming its origin;
    None when it has none (or a problem it reported itself)."""

    def offer(self, key: str) -> StageRecord | None: ...


# What a build's cache sources offer: records already known, or sources asked per key.
Offer = StageRecord | StageSource


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class StageCache:
    """Stage records of one store. `lookup` only answers with records whose blob exists,
    that this store made (a build here, or a stage a build took from a cache source the
    user named) or that a cache source named for this build offers."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stages_dir = store.cache_dir / "stages"
        self.last_dir = store.cache_dir / "last"

    def lookup(self, key: str, offered: Iterable[Offer] = ()) -> StageRecord | None:
        """The record of stage `key`: this store's own first, else one of `offered` (the
        stages of this build's cache sources, each naming its origin; a StageSource is
        asked only here, after this store missed, in the order the user named them)."""
        path = self.stages_dir / f"{key}.json"
        try:
            record = StageRecord.from_json(json.loads(path.read_bytes()))
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            record = None
        if (
            record is not None
            and _trusted(record)
            and self.store.has_blob(record.layer.blob.digest)
        ):
            return record
        for offer in offered:
            found = offer if isinstance(offer, StageRecord) else offer.offer(key)
            if (
                found is not None
                and found.key == key
                and found.origin is not None
                and self.store.has_blob(found.layer.blob.digest)
            ):
                return found
        return None

    def save(self, record: StageRecord) -> None:
        """Record a stage (idempotent) and remember it as the last build of its stage."""
        self.add(record)
        self.remember(record)

    def add(self, record: StageRecord) -> None:
        """Record a stage without making it the last build of its stage (a pulled one:
        `--explain` must not compare against inputs this machine never had)."""
        atomic_write(
            self.stages_dir / f"{record.key}.json",
            json.dumps(record.to_json(), indent=1, sort_keys=True).encode(),
        )

    def remember(self, record: StageRecord) -> None:
        """Make `record` the last build of its stage (idempotent; nothing is written when it
        is already: a no-op build writes nothing)."""
        path = self.last_dir / _safe(record.image) / _safe(record.stage)
        with contextlib.suppress(OSError):
            if path.read_bytes() == record.key.encode():
                return
        atomic_write(path, record.key.encode())

    def last(self, image: str, stage: str) -> StageRecord | None:
        try:
            key = (self.last_dir / _safe(image) / _safe(stage)).read_text().strip()
        except FileNotFoundError:
            return None
        return self.lookup(key)

    def records(self) -> list[StageRecord]:
        out = []
        if self.stages_dir.is_dir():
            for path in sorted(self.stages_dir.glob("*.json")):
                try:
                    out.append(StageRecord.from_json(json.loads(path.read_bytes())))
                except (ValueError, KeyError):
                    continue
        return sorted(out, key=lambda r: (r.image, r.created))

    def remove(self, key: str) -> None:
        (self.stages_dir / f"{key}.json").unlink(missing_ok=True)

    def prune(self, *, all_records: bool = False) -> tuple[int, int, int]:
        """Drop records (all, or those superseded: not the last build of their stage and
        not in a tagged image), then GC the store. Returns (records, blobs, bytes). Waits
        for the builds using the store: their records count (Store.collecting)."""
        with self.store.collecting():
            return self._prune(all_records)

    def _prune(self, all_records: bool) -> tuple[int, int, int]:
        tagged = {layer.diff_id for t in self.store.tags() for layer in t.image.layers}
        last = set()
        if self.last_dir.is_dir():
            last = {p.read_text().strip() for p in self.last_dir.glob("*/*")}
        dropped = 0
        for rec in self.records():
            if all_records or (rec.key not in last and rec.layer.diff_id not in tagged):
                self.remove(rec.key)
                dropped += 1
        if all_records and self.last_dir.is_dir():
            for p in self.last_dir.glob("*/*"):
                p.unlink()
        roots = {r.layer.blob.digest for r in self.records()}
        blobs, freed = self.store.gc(
            extra_roots=roots, extra_trees={oci.hex_of(r.layer.diff_id) for r in self.records()}
        )
        return dropped, blobs, freed


def _trusted(record: StageRecord) -> bool:
    # Records written by an older sysbake's `pull` from any image's labels: never reused.
    return record.origin is not None or "pulled" not in record.inputs


def explain(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a stage is rebuilt: the first input that differs, with old and new values."""
    if old is None:
        return "no earlier build of this stage"
    source = old.get("cache_from") or old.get("pulled")  # "pulled": an older sysbake's
    if source:
        return f"the cached stage came from {source} and its inputs differ"
    for path, a, b in _diff(old, new, ""):
        if path == "parent":
            return "its parent changed (an earlier stage or the parent image was rebuilt)"
        return f"{path or 'inputs'} changed from {_short(a)} to {_short(b)}"
    return "its cached layer is missing from the store"


def _diff(a: Any, b: Any, path: str) -> list[tuple[str, Any, Any]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{path}.{k}" if path else k)
        return out
    return [] if a == b else [(path, a, b)]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."
