"""Factories for tests: tars, layers and images made in memory or in a store, small and
deterministic (the same arguments give the same bytes), after go-containerregistry's
random.Image(). Import them from tests.unit.conftest (the integration tests do too); the
`store` fixture is an empty store in the test's temp dir."""

from __future__ import annotations

import contextlib
import gzip
import io
import random
import tarfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from sysbake.oci import model as oci
from sysbake.oci.layers import archive as layers
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store

EPOCH = 1_700_000_000

Entry = tuple[str, bytes, Mapping[str, object]]
"""A tar entry for crafted_tar: its name, its tar type (tarfile.REGTYPE, ...) and TarInfo
attributes to set; the attribute "data" is a regular file's content."""


# -- tars ----------------------------------------------------------------------------------


def crafted_tar(*entries: Entry) -> bytes:
    """A PAX tar of `entries` in order, as a foreign or hostile tool writes it: nothing is
    checked and names may hold any byte. Mtime EPOCH, mode 0644 (0755 for directories),
    unless an entry sets them."""
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape"
    ) as tf:
        for name, kind, attrs in entries:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.mtime = EPOCH
            info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
            attrs = dict(attrs)  # the caller's entry may be written again
            data = attrs.pop("data", b"")
            assert isinstance(data, bytes)
            for key, value in attrs.items():
                setattr(info, key, value)
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


def files_tar(files: Mapping[str, bytes]) -> bytes:
    """A tar of regular files (name -> content), in name order."""
    return crafted_tar(
        *((name, tarfile.REGTYPE, {"data": data}) for name, data in sorted(files.items()))
    )


def noise(size: int, seed: int = 0) -> bytes:
    """`size` bytes that do not compress; the same for the same seed."""
    return random.Random(seed).randbytes(size)


def tar_members(data: bytes) -> list[tarfile.TarInfo]:
    """The entries of the tar `data`, in order."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getmembers()


def tar_member(data: bytes, name: str) -> bytes:
    """The content of the regular file `name` in the tar `data`."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile(name)
        assert f is not None, f"{name} is not a regular file"
        return f.read()


def opener(data: bytes) -> Callable[[], contextlib.AbstractContextManager[io.BytesIO]]:
    """A layer opener (as layers.flatten takes them) that reads `data`."""

    @contextlib.contextmanager
    def open_layer() -> Iterator[io.BytesIO]:
        yield io.BytesIO(data)

    return open_layer


def flat(*tars: bytes, mtime: int | None = None) -> bytes:
    """The tars flattened into one, bottom first (layers.flatten)."""
    out = io.BytesIO()
    layers.flatten([opener(t) for t in tars], out, mtime=mtime)
    return out.getvalue()


# -- layers and images ---------------------------------------------------------------------


def layer_blob(plain: bytes, *, compressed: bool = True) -> tuple[bytes, str]:
    """The blob of a layer whose tar is `plain` (gzip without a timestamp, or the tar
    itself) and its diff_id."""
    return (gzip.compress(plain, mtime=0) if compressed else plain), oci.sha256_digest(plain)


def put_layer(store: Store, plain: bytes, *, compressed: bool = True) -> Layer:
    """The layer of the tar `plain`, its blob stored in `store`."""
    blob, diff_id = layer_blob(plain, compressed=compressed)
    return Layer(store.put_bytes(blob, oci.MT_LAYER_GZIP if compressed else oci.MT_LAYER), diff_id)


def image_config(diff_ids: Sequence[str], **fields: Any) -> dict[str, Any]:
    """A linux/amd64 image config over `diff_ids`; `fields` add or replace top-level keys."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        **fields,
    }


def put_image(
    store: Store,
    *layers: Layer | bytes | Mapping[str, bytes],
    ref: str | None = "t:latest",
    **fields: Any,
) -> Image:
    """An image in `store` of `layers`, bottom first, tagged `ref` unless that is None;
    `fields` as for image_config. A tar (bytes), or a mapping of regular files as for
    files_tar, is stored as a gzip layer."""
    stored = tuple(
        la
        if isinstance(la, Layer)
        else put_layer(store, la if isinstance(la, bytes) else files_tar(la))
        for la in layers
    )
    image = store.put_image(image_config([la.diff_id for la in stored], **fields), stored)
    if ref is not None:
        store.tag(ref, image)
    return image


@pytest.fixture
def store(tmp_path: Path) -> Store:
    """An empty store, `store` in the test's temp dir."""
    return Store(tmp_path / "store").ensure()
