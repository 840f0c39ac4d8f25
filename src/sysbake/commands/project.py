"""`sysbake init` (a starter project) and `sysbake validate` (check a project file)."""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Iterator
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING

from sysbake.errors import ConfigError
from sysbake.fsutil import atomic_write
from sysbake.project import load as config

if TYPE_CHECKING:
    from sysbake.cli import Context

TEMPLATE_SUFFIX = ".in"  # the template of sysbake.toml is not itself a (valid) project file
_FALLBACK_NAME = "web"
_PARENT_NAME = "base"  # the starter's bootstrap image


def starter_name(directory: Path) -> str:
    """An image name made from a directory's name ("My App" -> "my-app"), or "web"."""
    name = re.sub(r"[^a-z0-9._-]+", "-", Path(os.path.abspath(directory)).name.lower())
    name = re.sub(r"^[^a-z0-9]+|[^a-z0-9]+$", "", name)
    return name if name and name != _PARENT_NAME else _FALLBACK_NAME


def _templates(node: Traversable, prefix: str = "") -> Iterator[tuple[str, Traversable]]:
    for child in sorted(node.iterdir(), key=lambda c: c.name):
        if child.is_dir():
            yield from _templates(child, f"{prefix}{child.name}/")
        else:
            yield f"{prefix}{child.name}".removesuffix(TEMPLATE_SUFFIX), child


def _render(text: str, name: str) -> str:
    # A name with a dot must be quoted where it is a TOML key.
    key = name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else json.dumps(name)
    return text.replace("@KEY@", key).replace("@NAME@", name)


def init_project(directory: Path, name: str | None = None, force: bool = False) -> list[Path]:
    """Write the starter project into `directory` (made if missing) and return the files
    written. Refuses, writing nothing, when one of them exists and `force` is not set."""
    if name is not None and not re.fullmatch(config.IMAGE_NAME, name):
        raise ConfigError(
            f"--name: expected an image name matching {config.IMAGE_NAME}, got {name!r}"
        )
    if name == _PARENT_NAME:
        raise ConfigError(f"--name: {name!r} is the starter's parent image: choose another name")
    name = name or starter_name(directory)
    root = Path(os.path.abspath(directory))
    files = [(root / rel, src) for rel, src in _templates(resources.files("sysbake") / "data/init")]
    existing = [str(path.relative_to(root)) for path, _ in files if path.exists()]
    if existing and not force:
        raise ConfigError(f"{root}: would overwrite {', '.join(existing)} (use --force)")
    for path, src in files:
        atomic_write(path, _render(src.read_text(encoding="utf-8"), name).encode())
    return [path for path, _ in files]


def _init(ctx: Context, args: argparse.Namespace) -> int:
    written = init_project(args.directory, args.name, args.force)
    root = Path(os.path.abspath(args.directory))
    if ctx.json:
        ctx.emit({"directory": str(root), "files": [str(p) for p in written]})
        return 0
    print(f"created a starter project in {root}:")
    for path in written:
        print(f"  {path.relative_to(root)}")
    where = "" if root == Path.cwd() else f"cd {args.directory} && "
    print(f"next: {where}sysbake build")
    return 0


def _validate(ctx: Context, args: argparse.Namespace) -> int:
    project = config.load_project(args.path)
    if args.online:  # what a bootstrap needs of this host and its mirrors
        from sysbake.build.bootstrap import online_problems
        from sysbake.project.reader import display_path

        problems = online_problems(project.images)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise ConfigError(f"{display_path(project.path)}: {problems[0]}{more}")
    if ctx.json:
        ctx.emit(project.to_json())
    else:
        names = ", ".join(image.name for image in project.images)
        count = len(project.images)
        print(f"ok: {count} image{'s' if count != 1 else ''} ({names})")
    return 0


def register(
    sub: argparse._SubParsersAction[argparse.ArgumentParser],
    add_globals: Callable[[argparse.ArgumentParser], None],
) -> None:
    """Add the `init` and `validate` sub-commands."""
    init = sub.add_parser(
        "init",
        help="write a starter project (sysbake.toml, salt/, pillar/)",
        description="Write a starter project: a base image bootstrapped from "
        "the host's apt sources and an image provisioned with Salt.",
    )
    init.add_argument(
        "directory",
        nargs="?",
        type=Path,
        default=Path("."),
        help="where to write it (default: the current directory)",
    )
    init.add_argument(
        "--name",
        help=f"the application image's name (default: the directory's name, or '{_FALLBACK_NAME}')",
    )
    init.add_argument("--force", action="store_true", help="overwrite existing files")
    add_globals(init)
    init.set_defaults(handler=_init)

    validate = sub.add_parser(
        "validate",
        help="check a project file (sysbake.toml)",
        description="Load and check a project file; with --json, print "
        "it with every default filled in.",
    )
    validate.add_argument(
        "path",
        nargs="?",
        type=Path,
        default=None,
        help="the file, or a directory with a sysbake.toml (default: .)",
    )
    validate.add_argument(
        "--online",
        action="store_true",
        help="also check what the bootstraps need of this host and the network: each "
        "distro's archive key, and that each mirror has the suite (dists/SUITE/Release)",
    )
    add_globals(validate)
    validate.set_defaults(handler=_validate)
