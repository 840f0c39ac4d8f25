"""Images of a root filesystem tarball: `sysbake import ROOTFS NAME:TAG`, and the `import`
stage of an image `from = "rootfs:FILE"`.

The stage's key is the tarball's content (its sha256 digest, not its name or place) with
the image's clean-up settings: an unchanged tarball is never imported again. Its digest
is remembered by the file's identity (device, inode, size, mtime and ctime, as git's
index does), so a no-op build does not read the tarball; the import checks it again as
it reads the bytes. Like a bootstrap, the tree is made container-ready and cleaned by
the image's [finalize] before it is committed; `sysbake import` keeps the tree as it is.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from sysbake import log
from sysbake.build import finalize
from sysbake.build.bootstrap import host_architecture
from sysbake.build.context import BuildContext, Stage
from sysbake.fsutil import atomic_write
from sysbake.oci.layers.commit import epoch_stamp, source_date_epoch
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.project.reader import rel_path
from sysbake.project.specs import ImageSpec, OciConfigSpec

IMPORT_STAGE = "import"
NEWEST_ENTRY = "newest entry"  # what the key says of an epoch the tarball's entries give


def rootfs_stage(ctx: BuildContext, spec: ImageSpec) -> Stage:
    """The base stage of an image `from = "rootfs:FILE"`: the tarball extracted (every
    entry checked), made container-ready and cleaned by the image's [finalize], committed
    as one layer whose tree the store keeps."""
    assert spec.rootfs is not None
    path, cleanup, store = spec.rootfs, spec.finalize, ctx.store
    digest = content_digest(store, path)
    epoch = source_date_epoch()
    compression = ctx.options.compression
    inputs: dict[str, object] = {
        "stage": IMPORT_STAGE,
        "rootfs": digest,
        "cleanup": cleanup.key_inputs(),
        "container_ready": finalize.container_ready_inputs(cleanup),
        "compression": compression,
        "epoch": NEWEST_ENTRY if epoch is None else epoch,
    }
    found: list[int] = []

    def prepare(tree: Path, when: int) -> None:
        from sysbake.rootfs import Root

        with Root(tree) as root:
            finalize.make_container_ready(root, cleanup)
            finalize.clean_tree(root, cleanup, epoch=when)

    def produce() -> Layer:
        from sysbake.oci.ingest import import_rootfs

        made = import_rootfs(
            store, path, compression=compression, epoch=epoch, expect=digest, prepare=prepare
        )
        found.append(made.epoch)
        return made.layer

    created_by = f"sysbake import rootfs:{rel_path(ctx.project.root, path)} {digest}"
    return Stage(
        IMPORT_STAGE, inputs, created_by, produce, epoch=lambda: found[-1] if found else None
    )


def import_image(store: Store, path: Path, *, compression: str = "gzip") -> Image:
    """`sysbake import`: an image of one layer holding the rootfs tarball `path` as it is
    (every entry checked), with sysbake's default config (systemd as PID 1) and a history
    entry naming the file and its digest; its date is SOURCE_DATE_EPOCH, else the newest
    mtime of the tarball's entries."""
    from sysbake.oci.ingest import import_rootfs

    store.hold()
    made = import_rootfs(store, path, compression=compression, epoch=source_date_epoch())
    created = epoch_stamp(made.epoch)
    history = {
        "created": created,
        "created_by": f"sysbake import {path.name}",
        "comment": f"imported from {os.path.abspath(path)} ({made.digest})",
    }
    config = finalize.image_config(
        OciConfigSpec(),
        architecture=host_architecture(),
        diff_ids=[made.layer.diff_id],
        history=[history],
        created=created,
        labels={},
    )
    return store.put_image(config, (made.layer,))


def content_digest(store: Store, path: Path) -> str:
    """The sha256 digest of the tarball `path`, read once per version of the file: it is
    remembered in the store's cache by the file's identity (see the module docstring)."""
    from sysbake.oci.ingest import IngestError, file_digest

    try:
        st = os.stat(path)
    except OSError as exc:
        raise IngestError(f"{path}: cannot read: {exc.strerror}") from None
    fields = (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    identity = "\0".join(map(str, (*fields, st.st_ctime_ns)))
    memo = store.cache_dir / "rootfs" / hashlib.sha256(identity.encode()).hexdigest()
    try:
        known = memo.read_text().strip()
    except OSError:
        known = ""
    if known.startswith("sha256:") and len(known) == 71:
        return known
    log.info(f"    hashing {path.name}")
    digest = file_digest(path)
    store.ensure()
    memo.parent.mkdir(exist_ok=True)
    atomic_write(memo, digest.encode() + b"\n", durable=False)
    return digest
