"""The stage cache: a stage's key is the hash of all its inputs; a record maps it to a layer.

Records live in <store>/cache/stages/<key>.json (written atomically, after the layer blob is
committed, so a record never points at a missing blob). <store>/cache/last/<image>/<stage>
remembers the key of the previous build of that stage, which is what `--explain` compares.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from sysbake import __version__, oci
from sysbake.fsutil import atomic_write
from sysbake.oci import Descriptor, Layer
from sysbake.records import record
from sysbake.store import Store

KEY_SCHEMA = 1  # bump when the meaning of an input changes


def stage_key(inputs: dict[str, Any]) -> str:
    """The cache key of a stage: sha256 over its canonical inputs and the tool version."""
    doc = {"inputs": inputs, "sysbake": __version__, "schema": KEY_SCHEMA}
    return hashlib.sha256(oci.canonical_json(doc)).hexdigest()


def hash_tree(path: Path) -> str:
    """A digest of a file or directory tree: names, types, modes, link targets, contents.
    Owners and mtimes are left out on purpose: a fresh checkout must hit the cache."""
    h = hashlib.sha256()
    if not path.exists():
        return "missing"
    if path.is_file():
        h.update(b"F" + oct(path.stat().st_mode & 0o7777).encode())
        _hash_file(h, path)
        return "sha256:" + h.hexdigest()
    for dirpath, dirs, files in os.walk(path):
        dirs.sort()
        rel = os.path.relpath(dirpath, path)
        h.update(b"D\0" + rel.encode() + b"\0")
        for name in sorted(files + [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]):
            full = Path(dirpath, name)
            st = full.lstat()
            h.update(name.encode() + b"\0" + oct(st.st_mode).encode() + b"\0")
            if full.is_symlink():
                h.update(os.readlink(full).encode() + b"\0")
            elif full.is_file():
                _hash_file(h, full)
    return "sha256:" + h.hexdigest()


def _hash_file(h: Any, path: Path) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    h.update(b"\0")


@record
class StageRecord:
    """A cached stage: its inputs and the layer it produced."""

    key: str
    image: str
    stage: str
    inputs: dict[str, Any]
    layer: Layer
    created: str
    created_by: str

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key, "image": self.image, "stage": self.stage, "inputs": self.inputs,
            "layer": self.layer.blob.to_json(), "diff_id": self.layer.diff_id,
            "created": self.created, "created_by": self.created_by,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> StageRecord:
        return cls(
            key=doc["key"], image=doc["image"], stage=doc["stage"], inputs=doc["inputs"],
            layer=Layer(Descriptor.from_json(doc["layer"]), doc["diff_id"]),
            created=doc["created"], created_by=doc.get("created_by", ""),
        )


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


class StageCache:
    """Stage records of one store. `lookup` only answers with records whose blob exists."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stages_dir = store.cache_dir / "stages"
        self.last_dir = store.cache_dir / "last"

    def lookup(self, key: str) -> StageRecord | None:
        path = self.stages_dir / f"{key}.json"
        try:
            record = StageRecord.from_json(json.loads(path.read_bytes()))
        except (FileNotFoundError, ValueError, KeyError):
            return None
        if not self.store.has_blob(record.layer.blob.digest):
            return None
        return record

    def save(self, record: StageRecord) -> None:
        """Record a stage (idempotent) and remember it as the last build of its stage."""
        self.add(record)
        self.remember(record)

    def add(self, record: StageRecord) -> None:
        """Record a stage without making it the last build of its stage (a pulled one:
        `--explain` must not compare against inputs this machine never had)."""
        atomic_write(self.stages_dir / f"{record.key}.json",
                     json.dumps(record.to_json(), indent=1, sort_keys=True).encode())

    def remember(self, record: StageRecord) -> None:
        atomic_write(self.last_dir / _safe(record.image) / _safe(record.stage),
                     record.key.encode())

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
        not in a tagged image), then GC the store. Returns (records, blobs, bytes)."""
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
        blobs, freed = self.store.gc(extra_roots=roots, extra_trees={
            oci.hex_of(r.layer.diff_id) for r in self.records()})
        return dropped, blobs, freed


def explain(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    """Why a stage is rebuilt: the first input that differs, with old and new values."""
    if old is None:
        return "no earlier build of this stage"
    if "pulled" in old:
        return f"the cached stage came from {old['pulled']} and its inputs differ"
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
