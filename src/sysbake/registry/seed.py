"""What the local store learns from a registry: the stages a cache source publishes (so a
build reuses stages built elsewhere, from a source the user named with `--cache-from`), and
where blobs were seen (so a push can mount a blob from another repository instead of
uploading it).

A sysbake image carries `io.sysbake.stage.<stage>` = stage key labels and, per layer, a
history entry whose comment is `sysbake <stage> <first 16 hex of the key>`: together they
map each stage key to its layer, which is all a StageRecord needs to be a cache hit. Any
image can carry such labels, so they are read only from a cache source the user named, and
offered to one build; a pull never writes them into the stage cache.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from sysbake.build.cache import Origin, StageRecord
from sysbake.fsutil import atomic_write
from sysbake.oci.model import Image
from sysbake.oci.store import Store

STAGE_LABEL = "io.sysbake.stage."
_COMMENT_RE = re.compile(r"^sysbake (\S+) ([0-9a-f]{16})$")
_HINTS_PER_BLOB = 8


def stage_records(image: Image, origin: Origin) -> list[StageRecord]:
    """The stage records an image's labels and history prove, each naming `origin` (pure:
    nothing is written). A record's layer is exactly the one the image publishes for its
    key: the manifest's blob and the config's diff_id at the position whose history entry
    names the stage and the key, whose label names the same stage. A key claimed by no
    label, by two labels or by two layers, and a history that does not line up with the
    layers, prove nothing and are left out."""
    config = image.config
    labels: dict[str, Any] = (config.get("config") or {}).get("Labels") or {}
    keys = {
        str(v): k.removeprefix(STAGE_LABEL) for k, v in labels.items() if k.startswith(STAGE_LABEL)
    }
    history = [
        h for h in config.get("history") or [] if isinstance(h, dict) and not h.get("empty_layer")
    ]
    if len(history) != len(image.layers):
        return []
    name = str(labels.get("io.sysbake.image") or origin.repository)
    found: dict[str, StageRecord] = {}
    claimed: set[str] = set()
    for entry, layer in zip(history, image.layers, strict=True):
        m = _COMMENT_RE.match(str(entry.get("comment") or ""))
        if m is None:
            continue
        matches = [k for k in keys if k.startswith(m[2])]
        if len(matches) != 1 or keys[matches[0]] != m[1]:
            continue
        key = matches[0]
        if key in claimed:
            found.pop(key, None)  # two layers claim it: neither is proven
            continue
        claimed.add(key)
        found[key] = StageRecord(
            key=key,
            image=name,
            stage=m[1],
            # The inputs stay on the machine that built the stage; the key stands for them.
            inputs={"cache_from": str(origin)},
            layer=layer,
            created=str(entry.get("created") or config.get("created") or ""),
            created_by=str(entry.get("created_by") or f"from {origin}"),
            origin=origin,
        )
    return list(found.values())


# -- where blobs live in registries (hints for cross-repository mounts) -------------------------


def _hints_path(store: Store) -> Path:
    return store.cache_dir / "registry" / "blobs.json"


def _read_hints(store: Store) -> dict[str, dict[str, list[str]]]:
    try:
        doc = json.loads(_hints_path(store).read_bytes())
    except (OSError, ValueError):
        return {}  # a hint file is only an optimisation: a bad one is ignored
    return doc if isinstance(doc, dict) else {}


def blob_repositories(store: Store, registry: str, digest: str) -> list[str]:
    """Repositories of `registry` that held blob `digest` when last seen (newest first)."""
    repos = _read_hints(store).get(registry, {}).get(digest, [])
    return [r for r in repos if isinstance(r, str)]


def remember_blobs(store: Store, registry: str, repository: str, digests: list[str]) -> None:
    """Note that `repository` of `registry` holds `digests` (best effort, never raises)."""
    try:
        hints = _read_hints(store)
        known = hints.setdefault(registry, {})
        for digest in digests:
            repos = [repository, *(r for r in known.get(digest, []) if r != repository)]
            known[digest] = repos[:_HINTS_PER_BLOB]
        atomic_write(_hints_path(store), json.dumps(hints, sort_keys=True).encode())
    except Exception:
        return
