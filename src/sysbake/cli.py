"""Command line: global options, sub-command registration, one error line per failure.

Only the module of the command named on the command line is imported and registered (the
start-up rule is stated once, in sysbake.commands)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import json
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sysbake import __version__, log
from sysbake.commands import (
    COMMANDS,
    all_command_modules,
    first_command,
    modules_for,
    touches_store,
)
from sysbake.errors import Interrupted, SysbakeError

if TYPE_CHECKING:
    from sysbake.runtime.owners import Orphan

DEFAULT_STORE = Path("/var/lib/sysbake")


class Context(NamedTuple):
    """What every command gets: where the store is, how to talk back, and the orphaned
    containers removed before it ran (sysbake.runtime.owners)."""

    store_path: Path
    json: bool
    debug: bool
    reaped: tuple[Orphan, ...] = ()
    rootless: bool = False  # runs in the user's namespace (sysbake.userns)

    def emit(self, value: Any) -> None:
        """Print a machine-readable result (used when --json is given)."""
        json.dump(value, sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")

    def store(self) -> Any:
        from sysbake.oci.store import Store

        return Store(self.store_path)


Handler = Callable[[Context, argparse.Namespace], int]


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    # Accepted both before and after the sub-command; the sub-command's copies only
    # override the top-level values when given (SUPPRESS leaves them unset).
    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    parser.add_argument(
        "--store",
        type=Path,
        default=default(None),
        help="store directory (default: $SYSBAKE_STORE, else /var/lib/sysbake for root, "
        "~/.local/share/sysbake for other users)",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="machine-readable output on stdout",
    )
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default(False),
        help="log commands and show tracebacks",
    )
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=default(False), help="no progress output"
    )


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for `argv`: the parsers of its command's module only, every module's when
    `argv` is None or names no known command."""
    parser = _TopParser(
        prog="sysbake",
        description="Bake, run, test and publish OCI system-container images (systemd as PID 1).",
        epilog="Run `sysbake COMMAND --help` for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"sysbake {__version__}")
    _global_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in all_command_modules() if argv is None else modules_for(argv):
        module.register(sub, lambda p: _global_options(p, top=False))
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse's parser, and its sub-commands' (add_subparsers makes them of this class),
    with a help formatter that does not import shutil for the terminal width: argparse
    makes a formatter for every argument added."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


# The titles of `sysbake --help`'s groups of commands, one per command module.
GROUP_TITLES = {
    "project": "Projects",
    "build": "Building",
    "images": "Images",
    "runtime": "Containers",
    "registry": "Registries",
    "host": "Docker and podman on this host",
    "supply": "Supply chain",
    "help": "Shell completion and manuals",
}


def command_groups() -> list[tuple[str, tuple[str, ...]]]:
    """(title, commands) of every group, in help order (a module without a title in
    GROUP_TITLES is titled by its name)."""
    return [
        (GROUP_TITLES.get(module, module.capitalize()), names) for module, names in COMMANDS.items()
    ]


class _TopParser(_Parser):
    """The top-level parser: its help lists the commands in groups, as podman's does."""

    def format_help(self) -> str:
        subparsers = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
        if not subparsers:
            return super().format_help()
        helps = {a.dest: a for a in subparsers[0]._choices_actions}
        formatter = self._get_formatter()
        formatter.add_usage(self.usage, self._actions, self._mutually_exclusive_groups)
        formatter.add_text(self.description)
        for title, names in command_groups():
            shown = [helps[n] for n in names if n in helps]
            if shown:
                formatter.start_section(title)
                formatter.add_arguments(shown)
                formatter.end_section()
        formatter.start_section("Options")
        formatter.add_arguments([a for a in self._actions if a.option_strings])
        formatter.end_section()
        formatter.add_text(self.epilog)
        return formatter.format_help()


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's, as wide as $COLUMNS or the terminal (80 columns when neither is known)."""

    def __init__(
        self,
        prog: str,
        indent_increment: int = 2,
        max_help_position: int = 24,
        width: int | None = None,
    ) -> None:
        super().__init__(
            prog, indent_increment, max_help_position, _columns() - 2 if width is None else width
        )


def _columns() -> int:
    with contextlib.suppress(KeyError, ValueError):
        return int(os.environ["COLUMNS"])
    with contextlib.suppress(AttributeError, ValueError, OSError):
        return os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
    return 80


def default_store() -> Path:
    """The store without --store or $SYSBAKE_STORE: root's /var/lib/sysbake, a user's own
    under $XDG_DATA_HOME (sysbake.userns.user_store)."""
    if os.geteuid() == 0:
        return DEFAULT_STORE
    from sysbake import userns

    return userns.user_store()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def reap_orphans(ctx: Context, command: str | None) -> Context:
    """Remove the containers whose owning sysbake process died (a build step's, a
    `sysbake test`'s, kill -9 included) before `command` looks at the store; `ctx` with
    what was found. Costs a listing and a non-blocking flock per owner when there is
    nothing to remove."""
    from sysbake.runtime import owners

    containers = ctx.store_path / "containers"
    if not touches_store(command) or not owners.any_orphan(containers):
        return ctx
    from sysbake.runtime import containers as runtime

    reaped = tuple(runtime.reap_orphans(containers))
    for orphan in reaped:
        if orphan.error:
            log.warn(f"container {orphan.name}: {orphan.describe()}")
        else:
            log.info(f"removed container {orphan.name} ({orphan.describe()})")
    return ctx._replace(reaped=reaped)


def _rootless(ctx: Context, command: str | None, args: argparse.Namespace) -> Context:
    """A non-root user's store command goes on as root of the user's own user namespace
    (sysbake.userns), after its up-front checks; `flags` without an image reads no store
    and stays as it is."""
    if command == "flags" and not getattr(args, "image", None):
        return ctx
    from sysbake import userns

    userns.prepare(command or "", ctx.store_path)
    return ctx._replace(rootless=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    store = args.store or Path(os.environ.get("SYSBAKE_STORE") or default_store())
    ctx = Context(store_path=store.absolute(), json=bool(args.json), debug=bool(args.debug))
    log.configure(quiet=bool(args.quiet) or (ctx.json and not ctx.debug), debug=ctx.debug)
    handler: Handler = args.handler
    # `kill PID` cleans up like Ctrl-C does: containers, mounts and staging are removed.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        # Not args.command: a sub-command's own `command` argument (exec's) shadows it.
        command = first_command(argv)
        if os.geteuid() != 0 and touches_store(command):
            ctx = _rootless(ctx, command, args)
        if os.geteuid() == 0:  # root, or rootless inside the user's namespace
            ctx = reap_orphans(ctx, command)
        return handler(ctx, args)
    except KeyboardInterrupt:
        if ctx.debug:
            raise
        print("sysbake: interrupted", file=sys.stderr)
        return Interrupted.exit_code
    except SysbakeError as exc:
        if ctx.debug:
            raise
        print(f"sysbake: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:
        return 1
    except OSError as exc:  # a disk filled where no caller said what it was writing
        if ctx.debug or exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = exc.filename or f"to the store {ctx.store_path} or the output"
        print(f"sysbake: error: no space left on device writing {where}", file=sys.stderr)
        return 1


def entry() -> None:
    """The `sysbake` executable: main(), then exit without the interpreter's tear-down of
    every module. Everything is flushed first; sysbake registers no atexit work. The cyclic
    garbage collector runs less often: nearly all that sysbake allocates is freed by
    reference counting, and at its default pace it ran ~30 times while a command's modules
    loaded (sysbake.commands: start-up)."""
    gc.set_threshold(20_000, 10, 10)
    code = main()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (BrokenPipeError, ValueError):
            code = code or 1
    os._exit(code)


if __name__ == "__main__":
    entry()
