"""Sub-commands, one module per group; each module has `register(subparsers, add_globals)`.

A command's handler is set with `parser.set_defaults(handler=fn)` where
`fn(ctx: Context, args: argparse.Namespace) -> int` returns the exit code.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
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
