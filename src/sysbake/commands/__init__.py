"""Sub-commands, one module per group; each module has `register(subparsers, add_globals)`
and `COMMANDS`, the names it registers (so that a command line builds only its own parser).

A command's handler is set with `parser.set_defaults(handler=fn)` where
`fn(ctx: Context, args: argparse.Namespace) -> int` returns the exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Sequence
from types import ModuleType

_MODULES = ("project", "build", "images", "runtime", "host", "registry")


def all_command_modules() -> list[ModuleType]:
    """Every command module that is installed, in help order."""
    found = []
    for name in _MODULES:
        try:
            found.append(importlib.import_module(f"sysbake.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"sysbake.commands.{name}":
                raise
    return found


def modules_for(argv: Sequence[str]) -> list[ModuleType]:
    """The command modules a command line needs: the one owning its command, or all of
    them when it names none (top-level --help, a typo that argparse must list)."""
    modules = all_command_modules()
    for module in modules:
        names = getattr(module, "COMMANDS", None)
        if names is None:
            continue
        if first_command(argv) in names:
            return [module]
    return modules


def first_command(argv: Sequence[str]) -> str | None:
    """The sub-command word of `argv` (global options may come before it)."""
    args = iter(argv)
    for arg in args:
        if arg == "--store":
            next(args, None)
        elif not arg.startswith("-"):
            return arg
    return None


def lazy_module(name: str) -> ModuleType:
    """`name`, imported on first attribute access: command modules register their parsers
    without paying for the imports of every other command (start-up is on the no-op path)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module
