"""Store commands: images, inspect, tag, rmi, squash, export, cache ls|prune."""

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
    p = sub.add_parser("images", help="list images in the store", conflict_handler="resolve")
    add_globals(p)
    p.add_argument("-q", "--quiet", dest="ids", action="store_true", help="print image IDs only")
    p.add_argument(
        "--format",
        default=None,
        metavar="FORMAT",
        help="json (a JSON object a line), or a template like '{{.Repository}}:{{.Tag}}' "
        "(fields: ID, Repository, Tag, Digest, CreatedAt, CreatedSince, Size); "
        "'table ...' aligns it under headers",
    )
    p.add_argument("--no-trunc", action="store_true", help="full image IDs")
    p.set_defaults(handler=cmd_images)

    p = sub.add_parser(
        "inspect",
        help="show a container (state, settings) or an image (manifest, config, layers)",
    )
    p.add_argument("image", metavar="CONTAINER|IMAGE")
    p.add_argument(
        "--type",
        choices=("container", "image"),
        default=None,
        help="look only for this kind (default: a container of that name, else an image)",
    )
    p.add_argument(
        "-f",
        "--format",
        default=None,
        metavar="TEMPLATE",
        help="a template like '{{.State.Status}}' or '{{json .Config}}' instead of the JSON",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser(
        "history",
        help="an image's layers, newest first, with what made each",
        conflict_handler="resolve",
    )
    p.add_argument("image")
    add_globals(p)
    p.add_argument("-q", "--quiet", dest="ids", action="store_true", help="print image IDs only")
    p.add_argument(
        "--format",
        default=None,
        metavar="FORMAT",
        help="json, or a template (fields: ID, CreatedAt, CreatedSince, CreatedBy, Size, Comment)",
    )
    p.add_argument("--no-trunc", action="store_true", help="do not shorten IDs and steps")
    p.set_defaults(handler=cmd_history)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("image")
    p.add_argument("ref")
    add_globals(p)
    p.set_defaults(handler=cmd_tag)

    p = sub.add_parser("rmi", help="remove image tags (blobs go with `cache prune`)")
    p.add_argument("images", nargs="+")
    add_globals(p)
    p.set_defaults(handler=cmd_rmi)

    p = sub.add_parser(
        "squash",
        help="make a one-layer image with an image's files",
    )
    p.add_argument("image")
    p.add_argument("ref", metavar="NAME:TAG", help="the tag of the squashed image")
    p.add_argument(
        "--compression",
        choices=("gzip", "zstd", "none"),
        default=None,
        help="of the one layer (default: as the image's top layer)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_squash)

    p = sub.add_parser(
        "import",
        help="make a one-layer image of a root filesystem tarball",
        description="Make an image of ROOTFS (a tar, plain or gzip/zstd/xz compressed: "
        "`export --format rootfs`, an LXC rootfs) as it is, every entry checked, with "
        "sysbake's default config (systemd as PID 1), tagged NAME:TAG.",
    )
    p.add_argument("rootfs", type=Path, metavar="ROOTFS")
    p.add_argument("ref", metavar="NAME:TAG")
    p.add_argument(
        "--compression",
        choices=("gzip", "zstd", "none"),
        default="gzip",
        help="of the layer stored (default: gzip)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_import)

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

    p = sub.add_parser(
        "verify",
        help="rebuild an image's project without the cache: is the image reproducible?",
        description="Rebuild IMAGE from its project (as it is now) in a scratch store, "
        "without the cache, and compare: prints `reproducible DIGEST`, or the files "
        "that differ (exit 1).",
    )
    p.add_argument("image")
    p.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        help="the project file or directory IMAGE was built from (default: ./sysbake.toml)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_verify)

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
    if args.ids or args.format:
        from sysbake.commands import formats

        found = [_image_row(t.ref, t.image, args.no_trunc) for t in tagged]
        if args.ids:
            lines = [row["ID"] for row in found]
        else:
            lines = formats.write_rows(args.format, found, {"ID": "IMAGE ID"})
        for line in lines:
            print(line)
        return 0
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


def _image_row(ref: str, image: Any, full: bool) -> dict[str, Any]:
    """An image as `docker images --format` names its fields."""
    name, _, tag = ref.rpartition(":")
    created = image.config.get("created", "")
    return {
        "ID": image.id if full else _short_id(image.id),
        "Repository": name,
        "Tag": tag,
        "Digest": image.manifest.digest,
        "CreatedAt": created,
        "CreatedSince": _ago(created),
        "Size": human_size(image.size),
    }


def cmd_inspect(ctx: Any, args: argparse.Namespace) -> int:
    value = _inspected(ctx, args.image, args.type)
    if args.format is None:
        ctx.emit(value)
        return 0
    from sysbake.commands import formats

    for line in formats.write_rows(args.format, [value]):
        print(line)
    return 0


def _inspected(ctx: Any, name: str, kind: str | None) -> dict[str, Any]:
    """What `inspect` shows of `name`: the container of that name (or ID), else the image."""
    if kind != "image":
        from sysbake.commands.runtime import inspect_container
        from sysbake.runtime import containers as rt

        try:
            return inspect_container(rt.load(ctx.store_path / "containers", name))
        except rt.ContainerNotFound:
            if kind == "container":
                raise
    return _inspect_image(ctx.store(), name)


def _inspect_image(store: Any, name: str) -> dict[str, Any]:
    image = store.resolve(name)
    refs = [t.ref for t in store.tags() if t.image.manifest.digest == image.manifest.digest]
    return {
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


def cmd_history(ctx: Any, args: argparse.Namespace) -> int:
    """docker's `history`: the image's history entries newest first, each with the size of
    the layer it made (0B for an entry that made none)."""
    image = ctx.store().resolve(args.image)
    rows = _history_rows(image, args.no_trunc)
    if ctx.json:
        ctx.emit(rows)
        return 0
    from sysbake.commands import formats

    if args.ids:
        lines = [row["ID"] for row in rows]
    elif args.format:
        lines = formats.write_rows(args.format, rows, {"ID": "IMAGE", "CreatedSince": "CREATED"})
    else:
        table = ["IMAGE\tCREATED\tCREATED BY\tSIZE\tCOMMENT"]
        table += [
            "\t".join((r["ID"], r["CreatedSince"], r["CreatedBy"], r["Size"], r["Comment"]))
            for r in rows
        ]
        lines = formats.aligned(table)
    for line in lines:
        print(line)
    return 0


def _history_rows(image: Any, full: bool) -> list[dict[str, Any]]:
    """The rows of `history`, newest first: the top one carries the image ID, the others
    "<missing>" (as under docker: they are no images of their own)."""
    layers = list(image.layers)
    entries = image.config.get("history") or [{} for _ in layers]
    rows = []
    for entry in entries:
        layer = None if entry.get("empty_layer") or not layers else layers.pop(0)
        created_by = str(entry.get("created_by", ""))
        if not full and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        rows.append(
            {
                "ID": "<missing>",
                "CreatedAt": str(entry.get("created", "")),
                "CreatedSince": _ago(str(entry.get("created", ""))),
                "CreatedBy": created_by,
                "Size": human_size(layer.blob.size if layer else 0),
                "Comment": str(entry.get("comment", "")),
                "Layer": layer.diff_id if layer else "",
            }
        )
    rows.reverse()
    if rows:
        rows[0]["ID"] = image.id if full else _short_id(image.id)
    return rows


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


def cmd_squash(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.build.squash import squash_image
    from sysbake.oci.reference import Reference

    store = ctx.store()
    Reference.parse(args.ref, allow_digest=False)  # a bad name fails before the work
    image = store.resolve(args.image)
    store.check_image(image)
    squashed = squash_image(store, image, compression=args.compression)
    ref = store.tag(args.ref, squashed)
    if ctx.json:
        ctx.emit({"ref": ref, "id": squashed.id, "layers": len(image.layers)})
    else:
        print(f"{ref} {_short_id(squashed.id)} ({len(image.layers)} layers squashed into one)")
    return 0


def cmd_import(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.build.imported import import_image
    from sysbake.oci.reference import Reference

    Reference.parse(args.ref, allow_digest=False)  # a bad name fails before the work
    store = ctx.store()
    image = import_image(store, args.rootfs, compression=args.compression)
    ref = store.tag(args.ref, image)
    if ctx.json:
        ctx.emit({"ref": ref, "id": image.id, "layer": image.layers[0].diff_id})
    else:
        print(f"{ref} {image.id}")
    return 0


def cmd_export(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.oci.export import export_image

    dest = export_image(
        ctx.store(), args.image, args.format, args.output, args.compression, name=args.name
    )
    if ctx.json and str(args.output) != "-":  # stdout carries the archive itself
        ctx.emit({"image": args.image, "format": args.format, "output": str(dest)})
    return 0


def cmd_verify(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.project.load import load_project
    from sysbake.verify import verify

    verdict = verify(ctx.store(), args.image, load_project(args.path))
    if ctx.json:
        ctx.emit(verdict.to_json())
    else:
        print("\n".join(verdict.lines()))
    return 0 if verdict.reproducible else 1


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

        with store.collecting():  # never under a build that is using a toolchain
            remove_tree(store.root / "toolchains")
    if ctx.json:
        ctx.emit({"stages": dropped, "blobs": blobs, "bytes": freed})
    else:
        print(f"removed {dropped} cached stages and {blobs} blobs, freed {human_size(freed)}")
    return 0
