"""Squash: an image's layers merged into one layer holding its root file system.

The layers' trees are mounted as one overlay (sysbake.runtime.overlay.view: a detached
mount where the kernel allows, gone with the process however it ends; its upper dir is
thrown away unwritten) and the merged view is written by sysbake's own layer writer
(sysbake.oci.layers.commit): whiteouts applied and none left, entries in canonical order,
so the same layers always give the same layer. `squash_image` makes the image holding it
(`sysbake squash`); a `squash = true` image gets the same layer as its last stage
(sysbake.build.pipeline). Either way the history keeps every former entry, marked
`empty_layer`, and ends with one entry saying what was merged.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sysbake import log
from sysbake.errors import BuildError
from sysbake.oci import model as oci
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store

SQUASH_BY = "sysbake squash"


def squash_layers(store: Store, layers: Sequence[Layer], *, compression: str) -> Layer:
    """One layer (compressed with `compression`) holding the files of `layers` (bottom to
    top) as a container of them sees them; layers not yet unpacked are checked and
    unpacked first (Store.layer_tree)."""
    from sysbake.oci.layers.commit import commit_tree
    from sysbake.runtime import overlay

    if not layers:
        raise BuildError("nothing to squash: the image has no layers")
    if len(layers) > overlay.MAX_LAYERS:
        # More than one mount stacks: the bottom ones merged first, then the rest on them.
        bottom = squash_layers(store, layers[: overlay.MAX_LAYERS], compression=compression)
        return squash_layers(
            store, (bottom, *layers[overlay.MAX_LAYERS :]), compression=compression
        )
    trees = [store.layer_tree(layer) for layer in layers]
    with store.staging("squash") as staging:
        upper, work, root = (staging / n for n in ("upper", "work", "root"))
        for d in (upper, work, root):
            d.mkdir()
        with (
            overlay.view(trees, upper, work, root) as merged,
            log.step(f"squashing {len(layers)} layers into one"),
        ):
            return commit_tree(store, merged, compression=compression)


def emptied(history: Iterable[Mapping[str, object]]) -> tuple[dict[str, object], ...]:
    """History entries kept for the record once their layers are merged: each marked
    `empty_layer` (it holds no layer of its own any more)."""
    return tuple({**dict(h), "empty_layer": True} for h in history)


def squash_entry(created: str, layers: int, comment: str = "") -> dict[str, object]:
    """The history entry of the merged layer."""
    return {
        "created": created,
        "created_by": f"{SQUASH_BY} ({layers} layers)",
        "comment": comment or f"{SQUASH_BY}: the {layers} layers of the entries above, merged",
    }


def squashed_config(config: Mapping[str, Any], layer: Layer) -> dict[str, Any]:
    """`config` (an image config) for the image whose one layer is `layer`, the merge of
    its layers: the same settings and creation time, one diff ID, the history kept."""
    layers = len((config.get("rootfs") or {}).get("diff_ids") or [])
    created = str(config.get("created", ""))
    return {
        **config,
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        "history": [*emptied(config.get("history") or ()), squash_entry(created, layers)],
    }


def squash_image(store: Store, image: Image, *, compression: str | None = None) -> Image:
    """The image `image` as one layer (in the compression of its top layer unless
    `compression` says), written to the store (untagged). The same image always gives
    the same image: its creation time is kept."""
    if not image.layers:
        raise BuildError("nothing to squash: the image has no layers")
    kind = compression or image.layers[-1].compression
    layer = squash_layers(store, image.layers, compression=kind)
    config = squashed_config(image.config, layer)
    log.info(f"==> squashed {len(image.layers)} layers into {oci.hex_of(layer.diff_id)[:12]}")
    return store.put_image(config, (layer,))
