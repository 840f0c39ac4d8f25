"""Host integration commands: flags, apparmor, load, setup-rootless."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sysbake import engines as hostint
from sysbake import log
from sysbake.errors import SysbakeError
from sysbake.fsutil import atomic_write

if TYPE_CHECKING:
    from sysbake.cli import Context


class UsageError(SysbakeError):
    """Options that do not go together (exit code 2, as argparse's own usage errors)."""

    exit_code = 2


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser("flags", help="docker/podman run flags that boot systemd on this host")
    p.add_argument("engine", choices=("docker", "podman"))
    p.add_argument(
        "image",
        nargs="?",
        help="tailor the flags to this stored image and show a full example command line",
    )
    p.add_argument(
        "--builder",
        action="store_true",
        help="the least-privilege flags of the sysbake-builder container instead "
        "(README: Building in a container)",
    )
    p.add_argument(
        "--seccomp-profile",
        type=Path,
        default=hostint.BUILDER_SECCOMP_PATH,
        metavar="FILE",
        help="with --builder: the builder's seccomp profile file the docker flags name "
        f"(default: {hostint.BUILDER_SECCOMP_PATH})",
    )
    p.add_argument(
        "--seccomp-json",
        action="store_true",
        help="with --builder: print the builder's seccomp profile (JSON) instead of the flags",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_flags)

    p = sub.add_parser(
        "apparmor", help="print (or install) the AppArmor profile for systemd containers"
    )
    p.add_argument(
        "--install",
        action="store_true",
        help="write /etc/apparmor.d/PROFILE and load it with apparmor_parser -r",
    )
    p.add_argument(
        "--builder",
        action="store_true",
        help=f"the {hostint.BUILDER_PROFILE_NAME} profile, for the builder container "
        f"(default: {hostint.PROFILE_NAME}, for systemd containers)",
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

    p = sub.add_parser(
        "load",
        help="read an archive into the store (-i), or load a stored image into docker/podman",
        description="`load -i ARCHIVE` reads a docker-archive (docker save, podman save), "
        "an oci-archive (either gzip'd too) or an OCI layout directory into sysbake's "
        "store, every blob and layer checked, with the names it carries (or --tag). "
        "`load IMAGE --into docker|podman` loads a stored image into that engine.",
    )
    p.add_argument("image", nargs="?", help="stored image to load (name[:tag] or ID)")
    p.add_argument(
        "-i",
        "--input",
        type=Path,
        default=None,
        metavar="ARCHIVE",
        help="read this archive or OCI layout into sysbake's store ('-': standard input)",
    )
    p.add_argument(
        "--tag",
        default=None,
        metavar="NAME:TAG",
        help="with -i: tag the archive's one image this (default: the names it carries)",
    )
    p.add_argument(
        "--compression",
        choices=("gzip", "zstd", "none"),
        default="gzip",
        help="with -i: how a docker-archive's layers are stored (default: gzip)",
    )
    p.add_argument(
        "--into",
        default=None,
        choices=("docker", "podman"),
        help="load IMAGE (or --archive FILE) into this engine",
    )
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

    p = sub.add_parser(
        "setup-rootless",
        help="as root: let USER build (and boot, where the host allows it) without root",
        description="Give USER 65536 subordinate uids and gids (/etc/subuid, /etc/subgid) "
        "when lacking and, on cgroup v1 and hybrid hosts, a cgroup of their own in every v1 "
        "hierarchy for booting images (again after each reboot). README: Rootless.",
    )
    p.add_argument("user", help="user name or uid")
    add_globals(p)
    p.set_defaults(handler=cmd_setup_rootless)


def cmd_flags(ctx: Context, args: argparse.Namespace) -> int:
    if args.builder:
        return _builder_flags(ctx, args)
    if args.seccomp_json:
        raise UsageError("flags: --seccomp-json goes with --builder")
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


def _builder_flags(ctx: Context, args: argparse.Namespace) -> int:
    """`flags --builder ENGINE`: the builder container's flags, or its seccomp profile."""
    if args.image:
        raise UsageError(
            f"flags --builder: the builder's flags do not depend on an image (got {args.image!r})"
        )
    if args.seccomp_json:
        sys.stdout.write(hostint.builder_seccomp_json())
        return 0
    chosen = hostint.select_builder_flags(args.engine, hostint.detect_host(), args.seccomp_profile)
    for note in chosen.notes:
        log.warn(note)
    profile = args.seccomp_profile
    # Inside a container (the builder printing its own flags) the file is the host's affair.
    if args.engine == "docker" and not profile.is_file() and "container" not in os.environ:
        log.warn(
            f"{profile}: no such file: write the builder's seccomp profile there with "
            f"`sysbake flags --builder docker --seccomp-json > {profile}`"
        )
    if ctx.json:
        ctx.emit(list(chosen.flags))
    else:
        print(chosen.line())
    return 0


def cmd_apparmor(ctx: Context, args: argparse.Namespace) -> int:
    name = hostint.profile_name(builder=args.builder)
    if args.install:
        facts = hostint.detect_host()
        default = hostint.PROFILE_PATH.parent / name
        path = hostint.install_profile(facts, args.output or default, builder=args.builder)
        if ctx.json:
            ctx.emit({"profile": name, "path": str(path), "loaded": True})
        else:
            print(f"installed and loaded {name} from {path}")
        return 0
    text = hostint.apparmor_profile(builder=args.builder)
    if args.output is not None:
        atomic_write(args.output, text.encode())
        if ctx.json:
            ctx.emit({"profile": name, "path": str(args.output), "loaded": False})
    elif ctx.json:
        ctx.emit({"profile": name, "text": text})
    else:
        sys.stdout.write(text)
    return 0


def cmd_setup_rootless(ctx: Context, args: argparse.Namespace) -> int:
    from sysbake import userns

    done = userns.setup(args.user)
    if ctx.json:
        ctx.emit({"user": args.user, "done": done})
    else:
        for line in done:
            print(line)
    return 0


def cmd_load(ctx: Context, args: argparse.Namespace) -> int:
    if args.input is not None:
        return _load_in(ctx, args)
    if args.into is None:
        raise UsageError(
            "load: give -i ARCHIVE (read it into sysbake's store) or IMAGE --into "
            "docker|podman (load a stored image into that engine)"
        )
    if args.tag is not None:
        raise UsageError("load: --tag goes with -i ARCHIVE")
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


def _load_in(ctx: Context, args: argparse.Namespace) -> int:
    """`load -i ARCHIVE`: the archive's images into sysbake's store (sysbake.oci.ingest)."""
    if args.into is not None or args.image or args.archive is not None:
        raise UsageError(
            "load -i ARCHIVE reads into sysbake's store and takes no IMAGE, --into or "
            "--archive (load --archive FILE --into ENGINE loads a file into docker/podman)"
        )
    from sysbake.oci.ingest import load_archive

    loaded = load_archive(ctx.store(), args.input, tag=args.tag, compression=args.compression)
    if ctx.json:
        ctx.emit([{"ref": item.ref, "id": item.image.id} for item in loaded])
    else:
        for item in loaded:
            print(f"Loaded image: {item.ref} {item.image.id}")
    return 0
