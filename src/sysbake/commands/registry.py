"""Registry commands: push, pull, login, logout."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sysbake.errors import SysbakeError


def _tls_verify(value: str) -> bool:
    lowered = value.lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {value!r}")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of at least 0, not {value!r}")
    return number


def connection_options(p: argparse.ArgumentParser, *, creds: bool = True) -> None:
    """Add the options of a command that talks to a registry (see `connect_options`)."""
    p.add_argument(
        "--tls-verify",
        type=_tls_verify,
        default=True,
        metavar="BOOL",
        help="verify the registry's TLS certificate (default: true); false also allows plain http",
    )
    p.add_argument(
        "--cert-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="a CA file, or a directory of *.crt CAs and *.cert/*.key client "
        "certificates (default: /etc/containers/certs.d/HOST)",
    )
    p.add_argument(
        "--authfile",
        type=Path,
        default=None,
        metavar="FILE",
        help="auth.json to use (default: $REGISTRY_AUTH_FILE, else podman's and docker's files)",
    )
    if creds:
        p.add_argument(
            "--creds",
            default=None,
            metavar="USER[:PASSWORD]",
            help="credentials for the registry (asked for when PASSWORD is left out)",
        )
    p.add_argument(
        "--min-rate",
        type=_positive,
        default=None,
        metavar="KIB_PER_S",
        help="drop a registry that moves fewer KiB/s than this over a window "
        "(default: $SYSBAKE_REGISTRY_MIN_RATE, else 1; 0: no minimum)",
    )
    p.add_argument(
        "--rate-window",
        type=_positive,
        default=None,
        metavar="SECONDS",
        help="the window the minimum rate is measured over, and the longest "
        "silence allowed (default: $SYSBAKE_REGISTRY_WINDOW, else 30)",
    )


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "push",
        help="push an image to an OCI registry",
        description="Push IMAGE to DEST (host[:port]/repository[:tag]; default: "
        "IMAGE's own name when it names a registry). Blobs the registry has are "
        "skipped; the manifest is pushed last.",
    )
    p.add_argument("image")
    p.add_argument("dest", nargs="?", default=None)
    _supply_options(p)
    connection_options(p)
    add_globals(p)
    p.set_defaults(handler=cmd_push)

    p = sub.add_parser(
        "pull",
        help="pull an image from an OCI registry",
        description="Pull REF (host[:port]/repository[:tag|@digest]) into the "
        "store. A pulled image never feeds the stage cache: to reuse its "
        "stages, name it with `sysbake build --cache-from REF`. REF may also be "
        "docker-daemon:NAME or containers-storage:NAME: an image of the local docker or "
        "podman (saved by it, then read as `load -i` reads an archive).",
    )
    p.add_argument("ref")
    p.add_argument(
        "-t",
        "--tag",
        default=None,
        metavar="NAME[:TAG]",
        help="tag it this in the store (default: REF itself)",
    )
    p.add_argument(
        "--platform",
        default=None,
        metavar="OS/ARCH[/VARIANT]",
        help="the platform to pick from a multi-platform index (default: this host's)",
    )
    connection_options(p)
    add_globals(p)
    p.set_defaults(handler=cmd_pull)

    p = sub.add_parser("login", help="store credentials for a registry in auth.json")
    p.add_argument("registry", metavar="HOST[:PORT]")
    p.add_argument("-u", "--username", default=None)
    p.add_argument("-p", "--password", default=None)
    p.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )
    connection_options(p, creds=False)
    add_globals(p)
    p.set_defaults(handler=cmd_login)

    p = sub.add_parser("logout", help="remove a registry's credentials from auth.json")
    p.add_argument("registry", nargs="?", default=None, metavar="HOST[:PORT]")
    p.add_argument("-a", "--all", action="store_true", help="remove every registry's")
    p.add_argument(
        "--authfile",
        type=Path,
        default=None,
        metavar="FILE",
        help="auth.json to edit (default: $REGISTRY_AUTH_FILE or podman's)",
    )
    add_globals(p)
    p.set_defaults(handler=cmd_logout)


def _ask(prompt: str, *, secret: bool) -> str:
    if not sys.stdin.isatty():
        raise SysbakeError(
            f"{prompt.rstrip(': ')} not given and standard input is not a terminal to ask for it"
        )
    import getpass

    return getpass.getpass(prompt) if secret else input(prompt)


def connect_options(args: argparse.Namespace) -> Any:
    """The ConnectOptions of the options `connection_options` added."""
    from sysbake.registry.auth import Credentials, parse_creds
    from sysbake.registry.transfer import ConnectOptions

    creds = None
    if getattr(args, "creds", None):
        user, password = parse_creds(args.creds)
        if password is None:
            password = _ask(f"Password for {user}: ", secret=True)
        creds = Credentials(user, password)
    return ConnectOptions(
        tls=_tls(args), creds=creds, auth_file=args.authfile, limits=_limits(args)
    )


def _limits(args: argparse.Namespace) -> Any:
    from sysbake.registry.transfer import Limits

    limits = Limits.from_env()
    if args.min_rate is not None:
        limits = Limits(args.min_rate, limits.window)
    if args.rate_window is not None:
        if args.rate_window < 0.1:
            raise SysbakeError(f"--rate-window {args.rate_window:g}: expected at least 0.1 s")
        limits = Limits(limits.min_rate, args.rate_window)
    return limits


def _tls(args: argparse.Namespace) -> Any:
    from sysbake.registry.transfer import TlsOptions

    return TlsOptions(verify=args.tls_verify, cert_dir=args.cert_dir)


def _done(ctx: Any, value: dict[str, Any], line: str) -> int:
    """The result of a command: `value` with --json, else `line`."""
    if ctx.json:
        ctx.emit(value)
    else:
        print(line)
    return 0


def _platform(text: str | None) -> tuple[str, str, str | None] | None:
    if text is None:
        return None
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise SysbakeError(f"--platform {text!r}: expected OS/ARCH[/VARIANT], e.g. linux/arm64")
    return parts[0], parts[1], (parts[2] if len(parts) == 3 else None)


def _supply_options(p: argparse.ArgumentParser) -> None:
    """push's options for what it attaches and signs (sysbake.registry.attach)."""
    p.add_argument(
        "--sign-by",
        type=Path,
        default=None,
        metavar="KEY",
        help="sign the image (and its SBOM and provenance) with this sigstore private key "
        "(`sysbake key generate`): a sha256-<digest>.sig tag podman, skopeo and cosign verify",
    )
    p.add_argument(
        "--sign-passphrase-file",
        type=Path,
        default=None,
        metavar="FILE",
        help="the key's passphrase: this file's first line (default: $SYSBAKE_KEY_PASSPHRASE, "
        "else asked)",
    )
    p.add_argument(
        "--sbom",
        choices=("spdx-json", "cyclonedx-json", "none"),
        default="spdx-json",
        help="attach the image's SBOM in this format as an OCI artifact (default: spdx-json)",
    )
    p.add_argument(
        "--no-provenance",
        dest="provenance",
        action="store_false",
        help="do not attach the provenance (an in-toto statement, SLSA v1)",
    )


def cmd_push(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.registry.transfer import Reference, push

    key = None
    if args.sign_by is not None:  # before the push: a wrong passphrase pushes nothing
        from sysbake.commands.supply import load_key

        key = load_key(args.sign_by, args.sign_passphrase_file)
    dest = Reference.parse(args.dest, need_registry=True) if args.dest is not None else None
    options = connect_options(args)
    store = ctx.store()
    result = push(store, args.image, dest, options)
    value = result.to_json()
    sbom = None if args.sbom == "none" else args.sbom
    if key is not None or sbom is not None or args.provenance:
        from sysbake.registry import attach

        extra = attach.publish_supply(
            store,
            args.image,
            Reference.parse(result.ref),
            options,
            sbom_format=sbom,
            provenance=args.provenance,
            key=key,
        )
        value |= extra.to_json()
    return _done(ctx, value, f"{result.ref} {result.digest}")


def cmd_pull(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.registry.sources import engine_source, pull_engine
    from sysbake.registry.transfer import Reference, pull

    if engine_source(args.ref) is not None:  # docker-daemon:NAME, containers-storage:NAME
        loaded = pull_engine(ctx.store(), args.ref, tag=args.tag)
        value = [{"source": args.ref, "ref": i.ref, "id": i.image.id} for i in loaded]
        return _done(ctx, {"images": value}, "\n".join(f"{i.ref} {i.image.id}" for i in loaded))
    source = Reference.parse(args.ref, need_registry=True)
    result = pull(
        ctx.store(), source, connect_options(args), tag=args.tag, wanted=_platform(args.platform)
    )
    return _done(ctx, result.to_json(), f"{result.ref} {result.image.id}")


def cmd_login(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.registry.auth import Credentials, default_auth_file, save_credentials
    from sysbake.registry.client import Session

    registry = _registry_arg(args.registry)
    user = args.username or _ask("Username: ", secret=False)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = args.password if args.password is not None else _ask("Password: ", secret=True)
    creds = Credentials(user, password)
    session = Session(registry, tls=_tls(args), creds=creds, limits=_limits(args))
    session.check_login()
    path = args.authfile or default_auth_file()
    save_credentials(path, registry, creds)
    return _done(ctx, {"registry": registry, "authfile": str(path)}, "Login Succeeded!")


def cmd_logout(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.registry.auth import default_auth_file, remove_credentials

    if bool(args.registry) == bool(args.all):
        raise SysbakeError("logout: give a registry HOST[:PORT] or --all")
    registry = _registry_arg(args.registry) if args.registry else None
    path = args.authfile or default_auth_file()
    if not remove_credentials(path, registry):
        raise SysbakeError(f"not logged in to {registry or 'any registry'} (in {path})")
    return _done(
        ctx,
        {"registry": registry, "authfile": str(path)},
        f"Removed login credentials for {registry or 'all registries'}",
    )


def _registry_arg(text: str) -> str:
    from sysbake.oci.reference import parse_domain
    from sysbake.registry.auth import normalize_key

    return parse_domain(normalize_key(text))
