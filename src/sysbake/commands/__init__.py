"""Sub-commands, one module per group; each module has `register(subparsers, add_globals)`.

A command's handler is set with `parser.set_defaults(handler=fn)` where
`fn(ctx: Context, args: argparse.Namespace) -> int` returns the exit code.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = ("project", "build", "images", "runtime", "host")


def all_command_modules() -> list[ModuleType]:
    found = []
    for name in _MODULES:
        try:
            found.append(importlib.import_module(f"sysbake.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"sysbake.commands.{name}":
                raise
    return found
