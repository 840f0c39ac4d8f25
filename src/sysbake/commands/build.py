"""`sysbake build`: build the images of a project, cached per stage."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from sysbake import log

if TYPE_CHECKING:
    from sysbake.build.cache import StageRecord
    from sysbake.build.context import StageResult
    from sysbake.oci.store import Store


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_globals: Callable[[argparse.ArgumentParser], None],
) -> None:
    p = sub.add_parser(
        "build",
        help="build the images of a project (cached per stage)",
        description="Build the images of sysbake.toml: bootstrap -> provision "
        "-> finalize, each stage cached by the hash of its inputs.",
    )
    p.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        help="project file or directory (default: ./sysbake.toml)",
    )
    p.add_argument(
        "-t",
        "--target",
        action="append",
        default=[],
        metavar="IMAGE",
        help="build only this image (and its parents); repeatable",
    )
    p.add_argument("--no-cache", action="store_true", help="rebuild every stage")
    p.add_argument(
        "--explain", action="store_true", help="say for every stage why it was reused or rebuilt"
    )
    p.add_argument("--test", action="store_true", help="run `sysbake test` on each image built")
    p.add_argument(
        "--keep-failed",
        action="store_true",
        help="keep the container of a failed provision step for inspection",
    )
    p.add_argument(
        "--compression",
        choices=("gzip", "zstd"),
        default="gzip",
        help="layer compression in the store (default: gzip)",
    )
    p.add_argument(
        "--cache-from",
        action="append",
        default=[],
        metavar="REF",
        help="an image in a registry (host[:port]/repository[:tag|@digest]) whose "
        "sysbake stages this build may reuse; repeatable. Only sources named "
        "here are trusted: a pulled image never feeds the cache",
    )
    from sysbake.commands.registry import connection_options

    connection_options(p)
    add_globals(p)
    p.set_defaults(handler=run_build)


class _Cli(Protocol):
    """What `build` needs of the command line's context (sysbake.cli.Context)."""

    @property
    def json(self) -> bool: ...
    def store(self) -> Store: ...
    def emit(self, value: object) -> None: ...


def run_build(ctx: _Cli, args: argparse.Namespace) -> int:
    from sysbake.build.context import BuildOptions, no_report
    from sysbake.build.pipeline import build_project
    from sysbake.project.load import load_project

    project = load_project(args.path)
    store = ctx.store()
    options = BuildOptions(
        targets=tuple(args.target),
        no_cache=args.no_cache,
        explain=args.explain and not ctx.json,
        compression=args.compression,
        keep_failed=args.keep_failed,
        cache_from=_cache_sources(store, args),
    )
    results = build_project(project, store, options, _explain if options.explain else no_report)
    failed = 0
    reports = []
    if args.test:
        from sysbake.imagetest import test_image

        for result in results:
            test_report = test_image(store, result.ref, project.image(result.name))
            reports.append(test_report)
            if not test_report.passed:
                failed += 1
            if not ctx.json:
                print(test_report.summary())
    if ctx.json:
        ctx.emit(
            {"images": [r.to_json() for r in results], "tests": [t.to_json() for t in reports]}
        )
    elif not args.explain:
        for result in results:
            print(f"{result.ref} {result.image.id}")
    return 1 if failed else 0


def _explain(result: StageResult) -> None:
    """--explain: why each stage was reused or rebuilt, one line on stdout."""
    verdict = "reused" if result.reused else f"rebuilt because {result.reason}"
    if result.origin:
        verdict += f": from {result.origin}"
    print(f"{result.image}: {result.stage}: {verdict}", flush=True)


def _cache_sources(store: Store, args: argparse.Namespace) -> tuple[StageRecord, ...]:
    """The stages offered by every --cache-from source, fetched into the store untagged.
    A source that cannot be fetched is skipped with a warning (as docker does): the build
    then rebuilds what it would have reused."""
    if not args.cache_from or args.no_cache:
        return ()
    from sysbake.commands.registry import connect_options
    from sysbake.errors import Interrupted, SysbakeError
    from sysbake.registry.transfer import Reference, cache_source

    # A typo is an error, not a source that fails to connect.
    sources = [Reference.parse(text, need_registry=True) for text in args.cache_from]
    store.ensure()
    options = connect_options(args)
    offered: list[StageRecord] = []
    for source in sources:
        try:
            records = cache_source(store, source, options)
        except Interrupted:
            raise
        except SysbakeError as exc:
            log.warn(f"--cache-from {source}: {exc}; building without it")
            continue
        log.info(f"==> cache source {source}: {len(records)} stages offered")
        offered += records
    return tuple(offered)
