"""Host integration commands: flags, apparmor, load."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sysbake import engines as hostint
from sysbake import log
from sysbake.fsutil import atomic_write

if TYPE_CHECKING:
    from sysbake.cli import Context


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("flags", help="docker/podman run flags that boot systemd on this host")
    p.add_argument("engine", choices=("docker", "podman"))
    p.add_argument(
        "image",
        nargs="?",
        help="tailor the flags to this stored image and show a full example command line",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_flags)

    p = sub.add_parser(
        "apparmor", help="print (or install) the AppArmor profile for systemd containers"
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="write /etc/apparmor.d/sysbake-systemd and load it with apparmor_parser -r",
    )
    p.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="write the profile to this file (with --install: install it there)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_apparmor)

    p = sub.add_parser("load", help="load a stored image into a local docker or podman")
    p.add_argument("image", nargs="?", help="stored image to load (name[:tag] or ID)")
    p.add_argument("--into", required=True, choices=("docker", "podman"))
    p.add_argument(
        "--host",
        default=None,
        help="daemon address (docker -H / podman --url), e.g. unix:///run/docker.sock",
    )
    p.add_argument(
        "--archive",
        type=Path,
        default=None,
        help="load this docker-archive file instead of exporting IMAGE",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_load)


def cmd_flags(ctx: Context, args: argparse.Namespace) -> int:
    facts = hostint.detect_host()
    image = None
    if args.image:
        stored = ctx.store().resolve(args.image)
        image = hostint.ImageFacts.from_config(args.image, stored.config)
    chosen = hostint.select_flags(args.engine, facts, image)
    for note in chosen.notes:
        log.warn(note)
    if ctx.json:
        ctx.emit(list(chosen.flags))
    else:
        print(chosen.line())
    if image is not None:
        # stderr, so `$(sysbake flags docker IMAGE)` still captures the flags alone.
        log.info("example: " + shlex.join(chosen.example(image)))
    return 0


def cmd_apparmor(ctx: Context, args: argparse.Namespace) -> int:
    if args.install:
        facts = hostint.detect_host()
        path = hostint.install_profile(facts, args.output or hostint.PROFILE_PATH)
        if ctx.json:
            ctx.emit({"profile": hostint.PROFILE_NAME, "path": str(path), "loaded": True})
        else:
            print(f"installed and loaded {hostint.PROFILE_NAME} from {path}")
        return 0
    text = hostint.apparmor_profile()
    if args.output is not None:
        atomic_write(args.output, text.encode())
        if ctx.json:
            ctx.emit({"profile": hostint.PROFILE_NAME, "path": str(args.output), "loaded": False})
    elif ctx.json:
        ctx.emit({"profile": hostint.PROFILE_NAME, "text": text})
    else:
        sys.stdout.write(text)
    return 0


def cmd_load(ctx: Context, args: argparse.Namespace) -> int:
    if args.archive is not None:
        names = hostint.load_archive(args.into, args.archive, args.host)
    elif args.image:
        names = hostint.load_image(ctx.store(), args.image, args.into, args.host)
    else:
        raise hostint.HostError("load: name a stored IMAGE or give --archive FILE")
    if ctx.json:
        ctx.emit({"into": args.into, "images": list(names)})
    else:
        for name in names:
            print(name)
    return 0
