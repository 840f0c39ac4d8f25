"""Sub-commands, one module per group; each module has `register(subparsers, add_globals)`.

A command's handler is set with `parser.set_defaults(handler=fn)` where
`fn(ctx: Context, args: argparse.Namespace) -> int` returns the exit code.

Start-up, the one rule: a command line imports only its own command's module (`COMMANDS`
says which module registers which command; sysbake.cli registers that one alone), and a
module imports at its top only what all of its callers need. What only some paths need is
imported by the function that needs it: what one command alone uses, in its handler; what
makes a layer or runs a container, in the function that does it (a cache hit never gets
there); subprocess, tarfile, tempfile, shutil, datetime and the like, where they are used.
Why: `run`, `stop`, `exec` and `ps` are timed against podman (bench/bench_run.py) and a
no-op `build` against a cached `podman build` (bench/bench_noop.py), and most of their time
is Python starting. tests/unit/test_startup.py holds the budget (the modules each of those
command lines may import) and fails on a module new on their path. Measured for the same
budget, and kept for it: records are sysbake.records classes, not dataclasses (whose module
and generated code cost more than a no-op build's own work); small digests skip OpenSSL
(sysbake.oci.model.sha256_digest); argparse is kept from importing shutil, the collector
runs less often and the process exits without tearing its modules down (sysbake.cli).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

# module -> the commands it registers, in help order (a unit test checks both agree)
COMMANDS: dict[str, tuple[str, ...]] = {
    "project": ("init", "validate"),
    "build": ("build",),
    "images": (
        "images",
        "inspect",
        "history",
        "tag",
        "rmi",
        "squash",
        "import",
        "export",
        "verify",
        "cache",
    ),
    "runtime": (
        "run",
        "shell",
        "exec",
        "stop",
        "start",
        "restart",
        "kill",
        "ps",
        "logs",
        "cp",
        "diff",
        "rm",
        "test",
    ),
    "host": ("flags", "apparmor", "load", "setup-rootless"),
    "registry": ("push", "pull", "login", "logout"),
    "supply": ("sbom", "provenance", "key"),
    "help": ("completion", "man"),
}

# Commands that never open the store: the only ones that do not reap orphans first.
STORELESS = frozenset(
    {"init", "validate", "apparmor", "login", "logout", "completion", "man", "key"}
    | {"setup-rootless"}
)


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
