"""Sub-commands, one module per group; each module has `register(subparsers, add_globals)`.
`COMMANDS` says which module registers which command, so that a command line imports and
builds only its own module's parser (start-up cost: `run` and `stop` are timed against Go).

A command's handler is set with `parser.set_defaults(handler=fn)` where
`fn(ctx: Context, args: argparse.Namespace) -> int` returns the exit code.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

# module -> the commands it registers, in help order (a unit test checks both agree)
COMMANDS: dict[str, tuple[str, ...]] = {
    "project": ("init", "validate"),
    "build": ("build",),
    "images": ("images", "inspect", "tag", "rmi", "export", "cache"),
    "runtime": ("run", "shell", "exec", "stop", "ps", "logs", "rm", "test"),
    "host": ("flags", "apparmor", "load"),
    "registry": ("push", "pull", "login", "logout"),
}

# Commands that never open the store: the only ones that do not reap orphans first.
STORELESS = frozenset({"init", "validate", "apparmor", "login", "logout"})


def touches_store(command: str | None) -> bool:
    """Whether `command` opens the store (and so first removes orphaned containers)."""
    return command is not None and command not in STORELESS


def all_command_modules() -> list[ModuleType]:
    """Every command module, in help order."""
    return [importlib.import_module(f"sysbake.commands.{name}") for name in COMMANDS]


def modules_for(argv: Sequence[str]) -> list[ModuleType]:
    """The command modules a command line needs: the one owning its command, or all of
    them when it names none (top-level --help, a typo that argparse must list)."""
    command = first_command(argv)
    for name, commands in COMMANDS.items():
        if command in commands:
            return [importlib.import_module(f"sysbake.commands.{name}")]
    return all_command_modules()


def first_command(argv: Sequence[str]) -> str | None:
    """The sub-command word of `argv` (global options may come before it); None when there
    is none, or when top-level help comes first (it lists every command)."""
    args = iter(argv)
    for arg in args:
        if arg in ("-h", "--help"):
            return None
        if len(arg) >= 3 and "--store".startswith(arg):  # argparse takes "--sto" too
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


class _Lazy:
    """A module's stand-in that imports it on first attribute access (and looks each
    attribute up in the real module, so that a patched attribute is seen)."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attr)


def lazy_module(name: str) -> Any:
    """`name`, imported on first attribute access: command modules register their parsers
    without paying for the imports of every other command (start-up is on the no-op path)."""
    return _Lazy(name)
