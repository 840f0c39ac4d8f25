"""Listing output as docker and podman users write it: `--format json` (one JSON object a
line), Go-template-like `--format '{{.ID}}\t{{.Names}}'` (with a `table ` prefix: aligned
columns under headers) and docker's wording of durations ("Up 2 minutes", "Exited (0) 3
minutes ago").

A template is only substituted, never evaluated: `{{.Field}}`, `{{.Field.Sub}}` and `{{.}}`,
optionally through one of `json`, `upper`, `lower` or `join .Field ", "`. Anything else
in braces is a FormatError naming the action and what was expected. Imports nothing that
`ps` does not already load (sysbake.commands: start-up).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from sysbake.errors import SysbakeError

EXPECTED = (
    "'json', 'table', or a template of {{.Field}}, {{json .Field}}, {{upper .Field}}, "
    '{{lower .Field}}, {{join .Field ", "}}'
)
_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)
_PATH = re.compile(r"\.|(?:\.[A-Za-z_][A-Za-z0-9_]*)+")
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')


class FormatError(SysbakeError):
    """A --format value that is not json, table or a template sysbake substitutes."""

    exit_code = 2


class _Field(NamedTuple):
    """One `{{...}}` action: a function ("" for none), the field path, join's separator."""

    function: str
    path: tuple[str, ...]
    separator: str = ""


class Template(NamedTuple):
    """A parsed --format: literal text and fields, alternating (`parts`); whether it makes
    a table (the `table ` prefix) or JSON lines (`json`)."""

    parts: tuple[str | _Field, ...]
    table: bool = False
    json: bool = False

    def fields(self) -> list[tuple[str, ...]]:
        return [p.path for p in self.parts if isinstance(p, _Field)]


def parse(text: str) -> Template:
    """The template of a --format value; FormatError when it is none."""
    if text.strip() == "json":
        return Template((), json=True)
    table = text.startswith("table")
    if table:
        text = text[len("table") :].lstrip() or "{{json .}}"
    # Shells pass \t and \n literally: they mean a tab and a newline, as under docker.
    text = text.replace("\\t", "\t").replace("\\n", "\n")
    parts: list[str | _Field] = []
    position = 0
    for match in _ACTION.finditer(text):
        parts.append(text[position : match.start()])
        parts.append(_action(match[1]))
        position = match.end()
    parts.append(text[position:])
    if "{{" in "".join(p for p in parts if isinstance(p, str)):
        raise FormatError(f"--format {text!r}: an unclosed {{{{ (expected {EXPECTED})")
    return Template(tuple(p for p in parts if p != ""), table=table)


def _action(body: str) -> _Field:
    words = body.split(None, 1)
    function = words[0] if words and not words[0].startswith(".") else ""
    rest = words[1] if function and len(words) > 1 else body
    separator = ""
    if function == "join":
        path_text, _, quoted = rest.partition(" ")
        found = _QUOTED.fullmatch(quoted.strip())
        if found is None:
            raise FormatError(f'--format {{{{{body}}}}}: expected {{{{join .Field ", "}}}}')
        separator, rest = json.loads(f'"{found[1]}"'), path_text
    if function not in ("", "json", "upper", "lower", "join") or not _PATH.fullmatch(rest):
        raise FormatError(f"--format {{{{{body}}}}}: expected {EXPECTED}")
    path = tuple(p for p in rest.split(".") if p)
    return _Field(function, path, separator)


def lookup(row: Mapping[str, Any], path: Sequence[str]) -> Any:
    """The value at `path` in `row` (keys matched exactly, else case-insensitively);
    FormatError naming the field and those there are."""
    value: Any = row
    for depth, name in enumerate(path):
        if not isinstance(value, Mapping):
            where = "." + ".".join(path[:depth])
            raise FormatError(f"--format: {where} has no fields (asked for .{'.'.join(path)})")
        if name not in value:
            folded = [k for k in value if isinstance(k, str) and k.lower() == name.lower()]
            if len(folded) != 1:
                known = ", ".join(sorted(str(k) for k in value))
                raise FormatError(f"--format: no field .{'.'.join(path)} (fields: {known})")
            name = folded[0]
        value = value[name]
    return value


def go_text(value: Any) -> str:
    """`value` printed as Go's templates print it: lists as [a b], maps as map[k:v]."""
    if value is None:
        return "<nil>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{go_text(v)}" for k, v in sorted(value.items())) + "]"
    if isinstance(value, list | tuple):
        return "[" + " ".join(go_text(v) for v in value) + "]"
    return str(value)


_FUNCTIONS: dict[str, Callable[[Any, str], str]] = {
    "": lambda v, _: go_text(v),
    "json": lambda v, _: json.dumps(v, sort_keys=True),
    "upper": lambda v, _: go_text(v).upper(),
    "lower": lambda v, _: go_text(v).lower(),
    "join": lambda v, sep: sep.join(go_text(x) for x in v) if isinstance(v, list) else go_text(v),
}


def render(template: Template, row: Mapping[str, Any]) -> str:
    """One row through the template (a JSON object for `json`)."""
    if template.json:
        return json.dumps(row, sort_keys=True)
    out = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
        else:
            out.append(_FUNCTIONS[part.function](lookup(row, part.path), part.separator))
    return "".join(out)


def header(template: Template, headers: Mapping[str, str]) -> str:
    """The header line of a table template: each field's header (`headers`, else its
    name in capitals)."""
    out = []
    for part in template.parts:
        if isinstance(part, str):
            out.append(part)
        else:
            name = part.path[-1] if part.path else ""
            out.append(headers.get(name, name.upper()))
    return "".join(out)


def write_rows(
    text: str, rows: Iterable[Mapping[str, Any]], headers: Mapping[str, str] | None = None
) -> list[str]:
    """The lines of `rows` as --format `text` asks: one per row, a table aligned on tabs
    under its headers."""
    template = parse(text)
    lines = [render(template, row) for row in rows]
    if not template.table:
        return lines
    return aligned([header(template, headers or {}), *lines])


def aligned(lines: Sequence[str], gap: int = 3) -> list[str]:
    """Tab-separated `lines` as columns `gap` spaces apart."""
    cells = [line.split("\t") for line in lines]
    count = max((len(c) for c in cells), default=0)
    widths = [max((len(c[i]) for c in cells if i < len(c)), default=0) for i in range(count)]
    return [
        (" " * gap).join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in cells
    ]


# -- durations -------------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """A duration as docker writes it: "Less than a second", "5 seconds", "About a
    minute", "3 minutes", "About an hour", "7 hours", "4 days", "3 weeks", "5 months",
    "2 years"."""
    if seconds < 1:
        return "Less than a second"
    if seconds < 60:
        n = int(seconds)
        return "1 second" if n == 1 else f"{n} seconds"
    minutes = seconds / 60
    if minutes < 2:
        return "About a minute"
    if minutes < 60:
        return f"{int(minutes)} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    for unit, size, limit in (("day", 24, 24 * 7 * 2), ("week", 24 * 7, 24 * 30 * 2)):
        if hours < limit:
            return f"{hours // size} {unit}s"
    if hours < 24 * 365 * 2:
        return f"{hours // (24 * 30)} months"
    return f"{hours // (24 * 365)} years"


def container_status(state: str, exit_code: int | None, since: float | None, now: float) -> str:
    """docker's STATUS column: "Up 2 minutes", "Exited (0) 3 minutes ago", "Created"...
    `since` is when it started (running) or ended (exited), in seconds since the epoch."""
    if state == "running":
        return "Up " + human_duration(now - since) if since else "Up"
    if state == "exited":
        code = "" if exit_code is None else f" ({exit_code})"
        ago = f" {human_duration(now - since)} ago" if since else ""
        return f"Exited{code}{ago}"
    return state.capitalize()
