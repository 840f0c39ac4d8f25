"""`sysbake build`: build the images of a project, cached per stage."""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sysbake.build.context import StageResult
    from sysbake.oci.store import Store
    from sysbake.project.specs import Project
    from sysbake.registry.stagecache import BuildCache, RegistryCache
    from sysbake.registry.transfer import ConnectOptions


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
        "--target",
        action="append",
        default=[],
        metavar="IMAGE",
        help="build only this image (and its parents); repeatable",
    )
    p.add_argument(
        "-t",
        "--tag",
        action="append",
        default=[],
        metavar="NAME[:TAG]",
        help="also tag the image built (the --target, else the file's last image) NAME:TAG; "
        "a NAME that is an image of the project is built (its target) and tagged; repeatable",
    )
    p.add_argument(
        "-f",
        "--file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the project file (default: PATH/sysbake.toml)",
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
        "-j",
        "--jobs",
        type=_jobs,
        default=1,
        metavar="N",
        help="build up to N images at once, each once its parent is built (default: 1)",
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
        help="a cache repository written by --cache-to, or an image in a registry "
        "(host[:port]/repository[:tag|@digest]), whose sysbake stages (each fetched when "
        "the build needs it) and Salt toolchain this build may reuse; repeatable; replaces "
        "[build] cache_from. Only sources named here are trusted: a pulled image never "
        "feeds the cache",
    )
    p.add_argument(
        "--cache-to",
        default=None,
        metavar="REPO",
        help="a cache repository (host[:port]/repository) to push every stage of this "
        "build to, tagged by its key, and the Salt toolchain it used; replaces [build] "
        "cache_to. Stage inputs (pillars) never travel: only layers and keys",
    )
    from sysbake.commands.registry import connection_options

    connection_options(p)
    add_globals(p)
    p.set_defaults(handler=run_build)


def _jobs(text: str) -> int:
    """-j's value: a whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


class _Cli(Protocol):
    """What `build` needs of the command line's context (sysbake.cli.Context)."""

    @property
    def json(self) -> bool: ...
    @property
    def rootless(self) -> bool: ...
    def store(self) -> Store: ...
    def emit(self, value: object) -> None: ...


def run_build(ctx: _Cli, args: argparse.Namespace) -> int:
    from sysbake.build.context import BuildOptions, no_report
    from sysbake.build.pipeline import build_project, missing_parents
    from sysbake.project.load import load_project

    project = load_project(_project_file(args.path, args.file))
    args.target, tags = _tags(project, args.target, args.tag)
    if ctx.rootless:
        _check_rootless_boot(project, args.target, test=args.test)
    store = ctx.store()
    if missing := missing_parents(project, store, args.target):  # `from` a registry image
        from sysbake.commands.registry import connect_options
        from sysbake.registry.sources import pull_parents

        pull_parents(store, missing, connect_options(args))
    cache = _registry_cache(store, project, args, explain=args.explain and not ctx.json)
    options = BuildOptions(
        targets=tuple(args.target),
        no_cache=args.no_cache,
        explain=args.explain and not ctx.json,
        compression=args.compression,
        jobs=args.jobs,
        keep_failed=args.keep_failed,
        cache_from=cache.sources if cache else (),
    )
    reporter = _explain if options.explain else no_report
    with cache.pushing(project) if cache else contextlib.nullcontext():
        results = build_project(
            project, store, options, cache.listen(reporter) if cache else reporter
        )
    built = {r.name: r.image for r in results}
    tagged = [(store.tag(ref, built[name]), built[name]) for ref, name in tags]
    tagged = [(ref, image) for ref, image in tagged if ref not in {r.ref for r in results}]
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
        doc: dict[str, object] = {
            "images": [r.to_json() for r in results],
            "tests": [t.to_json() for t in reports],
            "tags": [ref for ref, _ in tagged],
        }
        if cache and cache.pushed:
            doc["cache_to"] = cache.pushed.to_json()
        ctx.emit(doc)
    elif not args.explain:
        for ref, image in [*((r.ref, r.image) for r in results), *tagged]:
            print(f"{ref} {image.id}")
    return 1 if failed else 0


def _check_rootless_boot(project: Project, targets: Sequence[str], *, test: bool) -> None:
    """Rootless: a build whose steps boot the image (or --test) where the user has no
    cgroup to boot in ends here, before any stage, naming those steps."""
    from sysbake import userns

    why = userns.boot_blocker()
    if why is None:
        return
    steps = [
        f"{spec.name}: {step.name}"
        for spec in project.build_order(targets or None)
        for step in spec.provision
        if step.mode == "boot"
    ]
    if steps:
        raise userns.Missing(
            f'rootless: the steps {", ".join(steps)} boot their image (mode = "boot", '
            f"the default), but {why}; run sysbake as root, or give those steps "
            f'mode = "chroot"'
        )
    if test:
        userns.require_boot("`build --test`")


def _project_file(path: Path | None, file: Path | None) -> Path | None:
    """The project file of `build [PATH] [-f FILE]`: FILE (PATH, if given, must be its
    directory), else PATH."""
    if file is None:
        return path
    if path is not None and Path(path).resolve() != file.resolve().parent:
        from sysbake.errors import ConfigError

        raise ConfigError(f"-f {file}: not in {path} (PATH is the project file's directory)")
    return file


def _tags(
    project: Project, targets: Sequence[str], tags: Sequence[str]
) -> tuple[list[str], list[tuple[str, str]]]:
    """(--target images, (tag, image name) for each -t). A -t that names an image of the
    project (its name or tag) builds that image and tags it, as `-t base` did when -t
    was --target; any other tags the one image built: the --target, else the file's last
    image. ConfigError when that is not one image, or a tag is no image name."""
    from sysbake.errors import ConfigError
    from sysbake.oci.reference import InvalidReference, Reference

    named = {s.name: s.name for s in project.images} | {s.tag: s.name for s in project.images}
    chosen = list(targets)
    pairs: list[tuple[str, str]] = []
    others: list[str] = []
    for tag in tags:
        try:
            Reference.parse(tag, allow_digest=False)
        except InvalidReference as exc:
            raise ConfigError(f"-t {tag}: {exc}") from None
        if tag in named and not targets:
            chosen.append(named[tag])
            pairs.append((tag, named[tag]))
        else:
            others.append(tag)
    if others:
        wanted = chosen or [project.images[-1].name]
        if len(set(wanted)) != 1:
            raise ConfigError(
                f"-t {others[0]}: this build has several targets ({', '.join(wanted)}): "
                "name the image to tag with one --target"
            )
        pairs += [(tag, project.image(wanted[0]).name) for tag in others]
    return chosen, pairs


def _explain(result: StageResult) -> None:
    """--explain: why each stage was reused or rebuilt, one line on stdout."""
    verdict = "reused" if result.reused else f"rebuilt because {result.reason}"
    if result.origin:
        verdict += f": from {result.origin}"
    print(f"{result.image}: {result.stage}: {verdict}", flush=True)


def _registry_cache(
    store: Store, project: Project, args: argparse.Namespace, *, explain: bool
) -> BuildCache | None:
    """The registry caches of this build (--cache-from/--cache-to, else the project's
    [build] settings), None without any: sources opened, the cache repository checked
    before anything is built, the Salt toolchains fetched (--explain says so)."""
    refs = args.cache_from or list(project.build.cache_from)
    to = args.cache_to if args.cache_to is not None else project.build.cache_to
    if not (refs and not args.no_cache) and not to:
        return None
    from sysbake.commands.registry import connect_options
    from sysbake.project.specs import cache_repository
    from sysbake.registry.stagecache import BuildCache, salt_versions

    target = cache_repository(to) if to else None  # a typo fails before the build
    options = connect_options(args)
    cache = BuildCache(store, _cache_sources(store, args, refs, options), target, options)
    for line in cache.toolchains(salt_versions(project, tuple(args.target))):
        if explain:
            print(line, flush=True)
    return cache


def _cache_sources(
    store: Store,
    args: argparse.Namespace,
    refs: Sequence[str] | None = None,
    options: ConnectOptions | None = None,
) -> tuple[RegistryCache, ...]:
    """The cache sources `refs` (default: --cache-from) opened, none with --no-cache. A
    source that cannot be used is skipped with a warning (as docker does): the build then
    rebuilds what it would have reused."""
    refs = args.cache_from if refs is None else refs
    if not refs or args.no_cache:
        return ()
    from sysbake.commands.registry import connect_options
    from sysbake.registry.stagecache import open_sources

    return open_sources(store, refs, options or connect_options(args))
