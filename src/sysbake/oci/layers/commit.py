"""Commit a directory tree (or an overlay upper dir) to the store as one layer, streaming:
tar -> sha256 (diff ID) -> compressor -> sha256 (blob digest) -> blob file."""

from __future__ import annotations

import math
import os
from pathlib import Path

from sysbake.errors import ConfigError
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.store import Store

# Store layers favour build speed: gzip -1 costs a third of gzip -6's time for ~10% more
# bytes (measured on a bookworm base; see BENCHMARKS.md). Exports keep these bytes.
LAYER_LEVELS = {"gzip": 1, "zstd": 3, "none": None}


# The last second that an OCI `created` stamp (four-digit years) can name.
_LAST_EPOCH = 253402300799


def source_date_epoch() -> int | None:
    """SOURCE_DATE_EPOCH from the environment (reproducible-builds convention), if set and
    not empty; a value that is not whole seconds since 1970 is a ConfigError (the
    convention asks builds to fail rather than guess)."""
    value = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not value:
        return None
    if not value.isascii() or not value.isdigit() or int(value) > _LAST_EPOCH:
        raise ConfigError(
            f"SOURCE_DATE_EPOCH: expected whole seconds since 1970 (up to {_LAST_EPOCH}), "
            f"got {value[:40]!r}"
        )
    return int(value)


def epoch_stamp(epoch: int) -> str:
    """The OCI `created` form of `epoch` (seconds since 1970, UTC): "2025-05-20T08:14:03Z"."""
    import time

    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def stamp_epoch(stamp: object) -> int | None:
    """The whole seconds since 1970 of an OCI `created` value (RFC 3339, any offset; Go's
    nanoseconds too); None when it is not one."""
    from datetime import datetime

    if not isinstance(stamp, str):
        return None
    try:
        when = datetime.fromisoformat(stamp.strip())
    except ValueError:
        return None
    if when.tzinfo is None:
        return None  # RFC 3339 requires an offset: without one it names no instant
    return math.floor(when.timestamp())


def commit_tree(
    store: Store,
    tree: Path,
    *,
    compression: str = "gzip",
    mtime: int | None = None,
    overlay_upper: bool = False,
) -> Layer:
    """Write `tree` as a layer blob; with `overlay_upper`, `tree` is an overlayfs upper dir
    and the layer is its diff (whiteouts for deletions). The same tree gives the same layer,
    marked as checked in the store when it passes (see Store.check_layer). With `mtime`,
    the tree's later mtimes are clamped first: it equals its layer after."""
    from sysbake.oci import compress
    from sysbake.oci.layers import archive as layers

    if mtime is not None:
        # Kept as the layer's tree, it is what containers see and what exports re-read.
        layers.clamp_mtimes(tree, mtime)
    writer = store.blob_writer()
    try:
        with compress.compressor(
            compression, writer, level=LAYER_LEVELS.get(compression)
        ) as packed:
            plain = layers.HashingWriter(packed)
            if overlay_upper:
                passes = layers.write_overlay_diff(tree, plain, mtime=mtime)
            else:
                passes = layers.write_tree_tar(tree, plain, mtime=mtime)
        blob = writer.commit(oci.LAYER_MEDIA_TYPE[compression])
    except BaseException:
        writer.discard()
        raise
    if passes:
        # Our writer walked a real directory: no "..", no absolute names, hardlinks only
        # to earlier entries; and it saw no device node the check refuses. Otherwise the
        # layer is checked (and refused) where it is read: export, pull elsewhere.
        store.mark_checked(plain.digest)
    return Layer(blob, plain.digest)
