"""Reading TOML tables strictly: unknown keys refused, types checked, values normalized.

The building blocks of `sysbake.project.load`: a `Reader` per table, and checks that turn a
raw value into a normalized one or raise `Invalid` (the reader adds the file and the dotted key).
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Callable, Sequence
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

from sysbake import signals
from sysbake.errors import ConfigError
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.records import record

Pairs = tuple[tuple[str, str], ...]
Check = Callable[[str], str]
MISSING: Any = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


class Invalid(Exception):
    """A value is wrong; the reader prefixes the file and the key."""


def join_key(parent: str, name: str) -> str:
    """`parent.name`, quoting `name` as TOML would when it is not a bare key."""
    part = name if _BARE_KEY.fullmatch(name) else json.dumps(name)
    return f"{parent}.{part}" if parent else part


def got(value: object) -> str:
    """What a value is, for 'expected X, got Y' messages: `integer 12`, `string "x"`."""
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'float'} {value}"
    if isinstance(value, str):
        text = json.dumps(value)
        return f"string {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, datetime | date | time):
        return f"{type(value).__name__} {value.isoformat()}"
    return "an array" if isinstance(value, list) else "a table"


def did_you_mean(name: str, options: Sequence[str]) -> str:
    """` (did you mean 'x'?)` when one option is close to `name`, else ''."""
    import difflib

    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def rel_path(root: Path, path: Path) -> str:
    """`path` relative to `root` when inside it (POSIX form), else absolute."""
    if path == root or root in path.parents:
        return path.relative_to(root).as_posix()
    return path.as_posix()


def display_path(path: Path) -> str:
    """The file as the user would type it: relative to the current directory when inside it."""
    cwd = Path.cwd()
    return rel_path(cwd, path) if cwd in path.parents else str(path)


def _is(value: object, kinds: tuple[type, ...]) -> bool:
    # TOML booleans are Python ints: `true` must not pass for a number.
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


@record
class Source:
    """The file being read: how to name it in errors, and where relative paths start."""

    display: str
    root: Path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.display}: {key}: {message}")


class Reader:
    """A TOML table being read: refuses unknown keys up front, then hands out typed values."""

    def __init__(self, src: Source, key: str, data: object, allowed: Sequence[str]) -> None:
        if not isinstance(data, dict):
            raise src.error(key, f"expected a table, got {got(data)}")
        for name in data:
            if name not in allowed:
                hint = did_you_mean(name, allowed).strip(" ()")
                raise src.error(
                    join_key(key, name),
                    f"unknown key{', ' + hint if hint else ''}"
                    f" (expected one of: {', '.join(sorted(allowed))})",
                )
        self.src, self.key, self.data = src, key, data

    def at(self, name: str) -> str:
        return join_key(self.key, name)

    def fail(self, name: str, message: str) -> ConfigError:
        return self.src.error(self.at(name), message)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, kinds: tuple[type, ...], what: str, default: Any = MISSING) -> Any:
        """The raw value of `name`, which must be one of `kinds` (bool is not an int here)."""
        value = self.data.get(name, MISSING)
        if value is MISSING:
            if default is MISSING:
                raise self.fail(name, f"missing: expected {what}")
            return default
        if not _is(value, kinds):
            raise self.fail(name, f"expected {what}, got {got(value)}")
        return value

    def checked(self, key: str, value: Any, check: Callable[[Any], Any] | None) -> Any:
        try:
            return check(value) if check else value
        except Invalid as exc:
            raise self.src.error(key, str(exc)) from None

    def string(self, name: str, default: str | None = "", check: Check | None = None) -> str:
        """A string (required when `default` is None), normalized by `check` when given."""
        value = self.get(name, (str,), "a string", MISSING if default is None else default)
        return str(self.checked(self.at(name), value, check)) if self.has(name) else value

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self.get(name, (bool,), "a boolean (true or false)", default))

    def scalar(
        self,
        name: str,
        kinds: tuple[type, ...],
        what: str,
        default: Any,
        check: Callable[[Any], Any],
    ) -> Any:
        return self.checked(self.at(name), self.get(name, kinds, what, default), check)

    def items(
        self,
        name: str,
        check: Callable[[Any], Any] | None = None,
        kinds: tuple[type, ...] = (str,),
        what: str = "a string",
    ) -> tuple[Any, ...]:
        """An array (default empty) of scalars, each type-checked and passed through `check`."""
        out = []
        plural = f"an array of {what.split(' ', 1)[1]}s"  # "a port" -> "an array of ports"
        for i, item in enumerate(self.get(name, (list,), plural, []), 1):
            key = f"{self.at(name)}[{i}]"
            if not _is(item, kinds):
                raise self.src.error(key, f"expected {what}, got {got(item)}")
            out.append(self.checked(key, item, check))
        return tuple(out)

    def mapping(self, name: str, check_key: Check | None = None) -> Pairs:
        """A table of strings (default empty) as key-sorted pairs."""
        out = []
        for k, v in self.get(name, (dict,), "a table of strings", {}).items():
            key = join_key(self.at(name), k)
            if not isinstance(v, str):
                raise self.src.error(key, f"expected a string, got {got(v)}")
            out.append((self.checked(key, k, check_key), v))
        return tuple(sorted(out))

    def table(self, name: str, allowed: Sequence[str]) -> Reader:
        """The sub-table `name` (empty when absent)."""
        return Reader(self.src, self.at(name), self.data.get(name, {}), allowed)

    def paths(self, name: str, kind: str, required: bool = False) -> tuple[Path, ...]:
        """A path or an array of paths, relative to the project, that must exist as `kind`."""
        if isinstance(self.data.get(name), str) or (required and not self.has(name)):
            found: tuple[str, ...] = (self.get(name, (str,), "a path or an array of paths"),)
            keys = [self.at(name)]
        else:
            found = self.items(name, what="a path")
            keys = [f"{self.at(name)}[{i}]" for i in range(1, len(found) + 1)]
        return tuple(
            self.checked(k, v, existing(self.src.root, kind))
            for k, v in zip(keys, found, strict=True)
        )

    def path(self, name: str, kind: str) -> Path | None:
        """An optional path relative to the project that must exist as `kind`; "" is None."""
        value = self.get(name, (str,), "a path (a string)", "")
        return self.required_path(name, kind) if value else None

    def required_path(self, name: str, kind: str) -> Path:
        """A path relative to the project that must exist as `kind` ("dir", "file", "any")."""
        value = self.get(name, (str,), "a path (a string)")
        return Path(self.checked(self.at(name), value, existing(self.src.root, kind)))


# ---------------------------------------------------------------- value checks


def pattern(regex: str, what: str) -> Check:
    """A check that the whole string matches `regex`, described as `what` when it does not."""
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise Invalid(f"expected {what}, got {got(value)}")
        return value

    return check


def choice(*options: str) -> Check:
    def check(value: str) -> str:
        if value not in options:
            raise Invalid(
                f"expected one of {', '.join(map(json.dumps, options))}, got "
                f"{got(value)}{did_you_mean(value, options)}"
            )
        return value

    return check


_NOUNS = {"dir": "directory", "file": "file", "any": "file or directory"}


def existing(root: Path, kind: str) -> Callable[[str], Path]:
    """A check resolving a path against `root`; it must exist as a dir, file or either ('any'),
    and, when it is named inside the project, resolve inside it (see `escaping_link`)."""

    def check(value: str) -> Path:
        if not value:
            raise Invalid("expected a path, got an empty string")
        if "\0" in value:
            raise Invalid(f"expected a path, got {got(value)} (it holds a NUL character)")
        path = Path(os.path.normpath(root / value))
        escape = escaping_link(root, path)
        if escape:
            raise Invalid(
                f"{json.dumps(value)} resolves outside the project ({escape}): name "
                "the outside path explicitly if you mean it"
            )
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise Invalid(f"{_NOUNS[kind]} not found: {path}") from None
        except OSError as exc:
            raise Invalid(f"cannot use {path}: {exc.strerror}") from None
        is_dir, is_file = stat.S_ISDIR(mode), stat.S_ISREG(mode)
        if not {"dir": is_dir, "file": is_file, "any": is_dir or is_file}[kind]:
            raise Invalid(f"not a {_NOUNS[kind]}: {path}")
        return path

    return check


def within(root: Path | str, path: Path | str) -> bool:
    """Whether `path` is `root` or under it, by name only (both absolute and normalized)."""
    root, path = Path(root), Path(path)
    return path == root or root in path.parents


def escaping_link(root: Path, path: Path) -> str | None:
    """Why `path`, named inside the project `root`, resolves outside it through a symlink
    ("a symlink to /etc", "salt is a symlink to /etc"); None when it stays inside, or when it
    is named outside the project (absolute elsewhere, or up with '..'): the user's choice."""
    if not within(root, path):
        return None
    real_root = os.path.realpath(root)
    parts = path.relative_to(root).parts
    for end in range(1, len(parts) + 1):
        # Each component is looked up through the ones before it, as the kernel would.
        prefix = root.joinpath(*parts[:end])
        if not os.path.islink(prefix):
            continue
        try:
            target = os.path.realpath(prefix)
        except (OSError, ValueError):
            return f"{Path(*parts[:end]).as_posix()} is a symlink that cannot be resolved"
        if not within(real_root, target):
            link = (
                "a symlink"
                if end == len(parts)
                else f"{Path(*parts[:end]).as_posix()} is a symlink"
            )
            return f"{link} to {target}"
    return None


def absolute(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/"):
        raise Invalid(f"expected an absolute path without '..', got {got(value)}")
    return value


def removable(value: str) -> str:
    if absolute(value).strip("/") == "":
        raise Invalid("expected a path to delete, got '/'")
    return value


_UNIT_SUFFIXES = (
    "service",
    "socket",
    "target",
    "timer",
    "mount",
    "automount",
    "path",
    "swap",
    "slice",
    "scope",
    "device",
)


def unit(value: str) -> str:
    """A systemd unit name; without a unit type it means a service, as for systemctl."""
    if not re.fullmatch(r"[A-Za-z0-9:_.\\@-]+", value) or value.startswith("."):
        raise Invalid(f"expected a systemd unit name, got {got(value)}")
    return value if value.rsplit(".", 1)[-1] in _UNIT_SUFFIXES else f"{value}.service"


def maskable(value: str) -> str:
    """What can be masked: a unit (see `unit`) or a generator (a name ending -generator)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+-generator", value) and not value.startswith("."):
        return value
    try:
        return unit(value)
    except Invalid:
        raise Invalid(f"expected a systemd unit or generator name, got {got(value)}") from None


def port(value: int | str) -> str:
    """An exposed port, normalized to "N/tcp" or "N/udp"."""
    match = re.fullmatch(r"(\d+)(?:/(tcp|udp))?", str(value))
    if not match or not 1 <= int(match[1]) <= 65535:
        raise Invalid(f'expected a port like 80, "80/tcp" or "53/udp", got {got(value)}')
    return f"{int(match[1])}/{match[2] or 'tcp'}"


def port_sort_key(value: str) -> tuple[int, str]:
    number, proto = value.split("/")
    return int(number), proto


def tcp_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise Invalid(f"expected a port number in 1..65535, got {got(value)}")
    return value


def stop_signal(value: int | str) -> str:
    """A signal by its canonical name (sysbake.signals): 37 and "RTMIN+3" are "SIGRTMIN+3"."""
    try:
        return signals.canonical(value)
    except ValueError:
        raise Invalid(f"expected {signals.EXPECTED}, got {got(value)}") from None


def owner(value: int | str) -> str:
    """A user or group: a name or a number (kept as text)."""
    if re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?|\d+", str(value)):
        return str(value)
    raise Invalid(f"expected a user/group name or a number, got {got(value)}")


def file_mode(value: str) -> int:
    # Strings only: TOML's `mode = 644` is decimal, the classic silent mistake.
    if not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise Invalid(f'expected an octal string like "0644", got {got(value)}')
    return int(value, 8)


def positive(value: float) -> float:
    if not 0 < value < float("inf"):
        raise Invalid(f"expected a positive number of seconds, got {got(value)}")
    return float(value)


def json_value(value: object) -> object:
    """A TOML value as a JSON value (dates and times become ISO strings)."""
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_value(v) for v in value]
    return value.isoformat() if isinstance(value, datetime | date | time) else value


def tag(value: str) -> str:
    """A reference to tag a result as (sysbake.oci.reference, no digest), normalized as the
    store writes it: ':latest' added when it has no tag, the registry host in lower case."""
    return _reference(value, allow_digest=False).store_name()


def is_tag(value: str) -> bool:
    """Whether `tag` takes `value`."""
    try:
        tag(value)
    except Invalid:
        return False
    return True


def parent_ref(value: str) -> str:
    """A store reference, optionally pinned by digest; kept as written (the cache key holds
    it), the store reads it with the same grammar."""
    _reference(value)
    return value


def _reference(value: str, *, allow_digest: bool = True) -> Reference:
    try:
        return Reference.parse(value, allow_digest=allow_digest)
    except InvalidReference as exc:
        raise Invalid(f"{exc.problem}, got {got(value)}") from None
