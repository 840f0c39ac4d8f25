"""Supply-chain commands: sbom, provenance, key generate (signing on push: `push --sign-by`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sysbake.errors import SysbakeError

SBOM_FORMATS = ("spdx-json", "cyclonedx-json")  # sysbake.supply.sbom.FORMATS, not imported
PASSPHRASE_ENV = "SYSBAKE_KEY_PASSPHRASE"


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "sbom",
        help="the software bill of materials of an image (SPDX or CycloneDX JSON)",
        description="List every Debian package of IMAGE's dpkg status (version, architecture, "
        "source package, licence from a machine-readable copyright file, purl) and every Python "
        "distribution Salt or a step installed, each with the layer and stage that brought it. "
        "The same image gives the same bytes.",
    )
    p.add_argument("image")
    p.add_argument("--format", choices=SBOM_FORMATS, default="spdx-json", help="default: spdx-json")
    p.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE", help="default: stdout"
    )
    add_globals(p)
    p.set_defaults(handler=cmd_sbom)

    p = sub.add_parser(
        "provenance",
        help="the provenance of an image: an in-toto statement, SLSA v1 predicate",
        description="State how IMAGE was made: its stage keys and layers, the digests (never "
        "the contents) of its state trees, pillars and projects, the Salt version, the "
        "bootstrap's mirror and snapshot, sysbake's version.",
    )
    p.add_argument("image")
    p.add_argument(
        "--subject",
        default=None,
        metavar="NAME",
        help="the subject's name (default: the image's name without its tag)",
    )
    p.add_argument(
        "-o", "--output", type=Path, default=None, metavar="FILE", help="default: stdout"
    )
    add_globals(p)
    p.set_defaults(handler=cmd_provenance)

    p = sub.add_parser("key", help="signing keys (sigstore, as cosign and skopeo use)")
    keys = p.add_subparsers(dest="key_command", metavar="ACTION", required=True)
    g = keys.add_parser(
        "generate",
        help="write PREFIX.key and PREFIX.pub",
        description="Write a new ECDSA P-256 key pair: PREFIX.key (mode 0600, encrypted with a "
        "passphrase as cosign and skopeo --sign-by-sigstore-private-key read it) and PREFIX.pub "
        "(for podman's sigstoreSigned policy). The passphrase comes from --passphrase-file, "
        f"else ${PASSPHRASE_ENV}, else is asked twice on the terminal.",
    )
    g.add_argument("prefix")
    g.add_argument("--passphrase-file", type=Path, default=None, metavar="FILE")
    add_globals(g)
    g.set_defaults(handler=cmd_key_generate)


def read_passphrase(path: Path | None, *, confirm: bool) -> bytes:
    """The passphrase of a signing key: the first line of `path`, else $SYSBAKE_KEY_PASSPHRASE,
    else asked on the terminal (twice with `confirm`)."""
    if path is not None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise SysbakeError(f"--passphrase-file {path}: {exc.strerror or exc}") from exc
        return data.split(b"\n", 1)[0].removesuffix(b"\r")
    if PASSPHRASE_ENV in os.environ:
        return os.environ[PASSPHRASE_ENV].encode()
    if not sys.stdin.isatty():
        raise SysbakeError(
            f"no passphrase for the signing key: give --passphrase-file, set ${PASSPHRASE_ENV}, "
            "or run on a terminal"
        )
    import getpass

    first = getpass.getpass("Passphrase for the signing key: ")
    if confirm and getpass.getpass("Again: ") != first:
        raise SysbakeError("the passphrases differ: no key written")
    return first.encode()


def load_key(path: Path, passphrase_file: Path | None) -> Any:
    """The private key of `path` (an encrypted sigstore key file), decrypted."""
    from sysbake.supply import signing

    try:
        text = path.read_bytes()
    except OSError as exc:
        raise SysbakeError(f"--sign-by {path}: {exc.strerror or exc}") from exc
    return signing.load_private_key(
        text, read_passphrase(passphrase_file, confirm=False), str(path)
    )


def _write(data: bytes, output: Path | None) -> None:
    if output is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    from sysbake.fsutil import atomic_write

    try:
        atomic_write(output, data)
    except OSError as exc:
        raise SysbakeError(f"{output}: cannot write: {exc.strerror or exc}") from exc


def cmd_sbom(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake import log
    from sysbake.supply import sbom
    from sysbake.supply.inventory import inventory

    inv = inventory(ctx.store(), args.image)
    _write(sbom.render(inv, args.format), args.output)
    if args.output is not None:
        log.info(f"wrote {args.output}: {len(inv.packages)} packages ({args.format})")
    return 0


def cmd_provenance(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.oci.reference import InvalidReference, Reference
    from sysbake.supply import provenance

    store = ctx.store()
    image = store.resolve(args.image)
    subject = args.subject
    if subject is None:
        try:
            subject = Reference.parse(args.image).name
        except InvalidReference:
            subject = image.id
    _write(provenance.render(provenance.statement(store, image, subject)), args.output)
    return 0


def cmd_key_generate(ctx: Any, args: argparse.Namespace) -> int:
    from sysbake.supply import signing

    passphrase = read_passphrase(args.passphrase_file, confirm=True)
    private, public = signing.write_key_pair(args.prefix, passphrase)
    if ctx.json:
        ctx.emit({"private": private, "public": public})
    else:
        print(f"wrote {private} (private, encrypted) and {public} (public)")
    return 0
