"""Store commands: images, inspect, tag, rmi, export, cache ls|prune."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sysbake.errors import SysbakeError


def _short_id(digest: str) -> str:
    # oci.hex_of without importing oci: this module loads for every command.
    return digest.split(":", 1)[-1][:12]


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("images", help="list images in the store")
    add_globals(p)
    p.set_defaults(handler=cmd_images)

    p = sub.add_parser("inspect", help="show an image's manifest, config and layers")
    p.add_argument("image")
    add_globals(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("image")
    p.add_argument("ref")
    add_globals(p)
    p.set_defaults(handler=cmd_tag)

    p = sub.add_parser("rmi", help="remove image tags (blobs go with `cache prune`)")
    p.add_argument("images", nargs="+")
    add_globals(p)
    p.set_defaults(handler=cmd_rmi)

    p = sub.add_parser("export", help="export an image: oci, oci-archive, docker-archive, rootfs")
    p.add_argument("image")
    p.add_argument(
        "--format", required=True, choices=("oci", "oci-archive", "docker-archive", "rootfs")
    )
    p.add_argument(
        "--compression",
        choices=("xz", "zstd", "gzip", "none"),
        default=None,
        help="rootfs: xz (default unless the file name says .tar/.gz/.zst), zstd, "
        "gzip, none; oci/oci-archive: re-compress layers (gzip, zstd; default: as "
        "stored)",
    )
    p.add_argument(
        "--name",
        default=None,
        metavar="NAME:TAG",
        help="the name the exported image carries (default: its tag in the store)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        type=Path,
        help="destination file or directory ('-' for stdout)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("cache", help="list or prune cached stages")
    csub = p.add_subparsers(dest="cache_command", metavar="ls|prune", required=True)
    q = csub.add_parser("ls", help="list cached stages")
    add_globals(q)
    q.set_defaults(handler=cmd_cache_ls)
    q = csub.add_parser("prune", help="drop superseded stages and unreferenced blobs")
    q.add_argument(
        "--all",
        action="store_true",
        help="drop every cached stage and the Salt toolchains (tagged images stay)",
    )
    add_globals(q)
    q.set_defaults(handler=cmd_cache_prune)


def human_size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}GB"


def _ago(stamp: str) -> str:
    try:
        when = datetime.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        return stamp
    secs = (datetime.now(UTC) - when).total_seconds()
    for size, unit in ((86400, "day"), (3600, "hour"), (60, "minute")):
        if secs >= size:
            n = int(secs // size)
            return f"{n} {unit}{'s' if n > 1 else ''} ago"
    return "just now"


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("   ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cmd_images(ctx: Any, args: argparse.Namespace) -> int:
    store = ctx.store()
    tagged = store.tags() if store.oci_dir.exists() else []
    if ctx.json:
        ctx.emit(
            [
                {
                    "ref": t.ref,
                    "id": t.image.id,
                    "manifest": t.image.manifest.digest,
                    "created": t.image.config.get("created", ""),
                    "size": t.image.size,
                }
                for t in tagged
            ]
        )
        return 0
    rows = [["REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE"]]
    for t in tagged:
        name, _, tag = t.ref.rpartition(":")
        rows.append(
            [
                name,
                tag,
                _short_id(t.image.id),
                _ago(t.image.config.get("created", "")),
                human_size(t.image.size),
            ]
        )
    _table(rows)
    return 0


def cmd_inspect(ctx: Any, args: argparse.Namespace) -> int:
    store = ctx.store()
    image = store.resolve(args.image)
    refs = [t.ref for t in store.tags() if t.image.manifest.digest == image.manifest.digest]
    ctx.emit(
        {
            "Id": image.id,
            "RepoTags": refs,
            "Manifest": image.manifest.to_json(),
            "Config": image.config,
            "Layers": [
                {
                    "digest": lay.blob.digest,
                    "mediaType": lay.blob.media_type,
                    "size": lay.blob.size,
                    "diff_id": lay.diff_id,
                }
                for lay in image.layers
            ],
            "Size": image.size,
        }
    )
    return 0


def cmd_tag(ctx: Any, args: argparse.Namespace) -> int:
    store = ctx.store()
    ref = store.tag(args.ref, store.resolve(args.image))
    if not ctx.json:
        print(ref)
    return 0


def cmd_rmi(ctx: Any, args: argparse.Namespace) -> int:
    store = ctx.store()
    missing = []
    for ref in args.images:
        if store.untag(ref):
            print(f"Untagged: {ref}")
        else:
            missing.append(ref)
    if missing:
        raise SysbakeError(f"no such image tag: {', '.join(missing)}")
    return 0


def cmd_export(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.oci.export import export_image

    dest = export_image(
        ctx.store(), args.image, args.format, args.output, args.compression, name=args.name
    )
    if ctx.json and str(args.output) != "-":  # stdout carries the archive itself
        ctx.emit({"image": args.image, "format": args.format, "output": str(dest)})
    return 0


def cmd_cache_ls(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.build.cache import StageCache

    records = StageCache(ctx.store()).records()
    if ctx.json:
        ctx.emit([r.to_json() for r in records])
        return 0
    rows = [["IMAGE", "STAGE", "KEY", "LAYER", "SIZE", "CREATED"]]
    for r in records:
        rows.append(
            [
                r.image,
                r.stage,
                r.key[:16],
                _short_id(r.layer.diff_id),
                human_size(r.layer.blob.size),
                _ago(r.created),
            ]
        )
    _table(rows)
    return 0


def cmd_cache_prune(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.build.cache import StageCache

    store = ctx.store()
    dropped, blobs, freed = StageCache(store).prune(all_records=args.all)
    if args.all and (store.root / "toolchains").exists():
        from sysbake.fsutil import remove_tree

        remove_tree(store.root / "toolchains")
    if ctx.json:
        ctx.emit({"stages": dropped, "blobs": blobs, "bytes": freed})
    else:
        print(f"removed {dropped} cached stages and {blobs} blobs, freed {human_size(freed)}")
    return 0
