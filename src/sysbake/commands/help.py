"""completion and man: shell completion (bash, zsh, fish) and man pages, both generated
from the command line's own parsers, so they never disagree with it.

`describe` reads a parser into plain values (commands, options, positionals); the writers
below turn those into text. Image and container names are completed live, from `sysbake
images` and `sysbake ps -a` (silent when the store cannot be read); paths by the shell.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from sysbake import __version__

SHELLS = ("bash", "zsh", "fish")
IMAGES_COMMAND = "sysbake images --format '{{.Repository}}:{{.Tag}}' 2>/dev/null"
CONTAINERS_COMMAND = "sysbake ps -a --format '{{.Names}}' 2>/dev/null"


def register(sub: Any, add_globals: Callable[[argparse.ArgumentParser], None]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a shell completion script: bash, zsh or fish",
        description="Print a completion script for SHELL. bash: `sysbake completion bash > "
        "/etc/bash_completion.d/sysbake`; zsh: into a directory of $fpath as _sysbake; "
        "fish: into ~/.config/fish/completions/sysbake.fish.",
    )
    p.add_argument("shell", choices=SHELLS)
    add_globals(p)
    p.set_defaults(handler=cmd_completion)

    p = sub.add_parser(
        "man",
        help="write the man pages (sysbake.1, sysbake-COMMAND.1) into a directory",
        description="Write sysbake.1 and a sysbake-COMMAND.1 page for each command into DIR "
        "(made if missing), e.g. /usr/local/share/man/man1.",
    )
    p.add_argument("dir", type=Path, metavar="DIR")
    add_globals(p)
    p.set_defaults(handler=cmd_man)


def _full_parser() -> argparse.ArgumentParser:
    from sysbake.cli import build_parser

    return build_parser()


def cmd_completion(ctx: Any, args: argparse.Namespace) -> int:
    writer = {"bash": bash_script, "zsh": zsh_script, "fish": fish_script}[args.shell]
    sys.stdout.write(writer(describe(_full_parser())))
    return 0


def cmd_man(ctx: Any, args: argparse.Namespace) -> int:
    written = write_man_pages(describe(_full_parser()), args.dir)
    if ctx.json:
        ctx.emit([str(p) for p in written])
    else:
        print(f"wrote {len(written)} man pages to {args.dir}")
    return 0


# -- the parsers as values -------------------------------------------------------------------


class Option(NamedTuple):
    """An option: its flags, its value's name (None for a flag), choices, help, and what
    completes its value ("path" or "any")."""

    flags: tuple[str, ...]
    metavar: str | None
    help: str
    choices: tuple[str, ...] = ()
    kind: str = "any"


class Positional(NamedTuple):
    """A positional argument: its name, what completes it ("image", "container", "path",
    "any"), whether it repeats, its choices and help."""

    name: str
    kind: str
    many: bool
    help: str
    choices: tuple[str, ...] = ()


class Command(NamedTuple):
    """A command (the program itself at the top) with its usage, options, positionals
    and sub-commands."""

    name: str
    help: str
    description: str
    usage: str
    options: tuple[Option, ...]
    positionals: tuple[Positional, ...]
    commands: tuple[Command, ...] = ()

    def walk(self, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Command]]:
        """Every command below this one, with the words that name it."""
        for command in self.commands:
            words = (*prefix, command.name)
            yield words, command
            yield from command.walk(words)


def describe(
    parser: argparse.ArgumentParser, name: str = "sysbake", help_text: str = ""
) -> Command:
    """The command `parser` parses, its sub-commands included."""
    options: list[Option] = []
    positionals: list[Positional] = []
    commands: list[Command] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for sub_name, sub in action.choices.items():
                commands.append(describe(sub, sub_name, helps.get(sub_name, "")))
        elif action.help == argparse.SUPPRESS:
            continue
        elif action.option_strings:
            options.append(_option(action))
        else:
            positionals.append(_positional(action))
    return Command(
        name=name,
        help=help_text or parser.description or "",
        description=parser.description or help_text,
        usage=_usage(parser),
        options=tuple(options),
        positionals=tuple(positionals),
        commands=tuple(commands),
    )


def _option(action: argparse.Action) -> Option:
    takes_value = action.nargs != 0
    metavar = action.metavar or action.dest.upper()
    return Option(
        flags=tuple(action.option_strings),
        metavar=str(metavar) if takes_value else None,
        help=_help_text(action),
        choices=tuple(str(c) for c in action.choices or ()),
        kind="path" if _is_path(action, str(metavar)) else "any",
    )


def _is_path(action: argparse.Action, label: str) -> bool:
    words = ("PATH", "FILE", "DIR", "SRC", "DEST", "STORE", "OUTPUT")
    return action.type is Path or any(w in label.upper() for w in words)


def _positional(action: argparse.Action) -> Positional:
    label = str(action.metavar or action.dest)
    lower = f"{action.dest} {label}".lower()
    if "container" in lower and "image" in lower:
        kind = "container|image"
    elif "container" in lower or action.dest in ("name", "names"):
        kind = "container"
    elif "image" in lower:
        kind = "image"
    elif _is_path(action, label):
        kind = "path"
    else:
        kind = "any"
    return Positional(
        name=label,
        kind=kind,
        many=action.nargs in ("+", "*", argparse.REMAINDER),
        help=_help_text(action),
        choices=tuple(str(c) for c in action.choices or ()),
    )


def _help_text(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(" in text:
        text = text % {"default": action.default, "prog": "sysbake"}
    return " ".join(text.split())


def _usage(parser: argparse.ArgumentParser) -> str:
    # A fixed width: the pages and scripts do not depend on the terminal they were made on.
    formatter = argparse.HelpFormatter(parser.prog, width=78)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, "")
    return formatter.format_help().strip()


# -- bash ------------------------------------------------------------------------------------


def _words(items: Sequence[str]) -> str:
    return " ".join(items)


def _value_flags(command: Command) -> list[str]:
    return [f for o in command.options if o.metavar for f in o.flags]


def _bash_case(words: tuple[str, ...], command: Command) -> list[str]:
    """The bash `case` branch completing `command`'s options, values and arguments."""
    lines = [f'        "{" ".join(words)}")']
    values = [o for o in command.options if o.metavar]
    lines.append('            case "$prev" in')
    for option in values:
        pattern = "|".join(option.flags)
        if option.choices:
            lines.append(
                f'                {pattern}) _sysbake_words "{_words(option.choices)}"; return;;'
            )
        elif option.kind == "path":
            lines.append(f"                {pattern}) _sysbake_files; return;;")
        else:
            lines.append(f"                {pattern}) return;;")
    lines.append("            esac")
    flags = [f for o in command.options for f in o.flags]
    lines.append(
        f'            if [[ "$cur" == -* ]]; then _sysbake_words "{_words(flags)}"; return; fi'
    )
    if command.commands:
        names = [c.name for c in command.commands]
        lines.append(f'            _sysbake_words "{_words(names)}"; return;;')
        return lines
    lines.append(f"            _sysbake_positional $args {_bash_kinds(command)}; return;;")
    return lines


def _bash_kinds(command: Command) -> str:
    kinds = []
    for positional in command.positionals:
        kind = "choices:" + ",".join(positional.choices) if positional.choices else positional.kind
        kinds.append('"' + kind + ("+" if positional.many else "") + '"')
    return " ".join(kinds) or "none"


_BASH_PRELUDE = """\
# bash completion for sysbake, generated by `sysbake completion bash`
_sysbake_words() { COMPREPLY=($(compgen -W "$1" -- "$cur")); }
_sysbake_files() {
    COMPREPLY=($(compgen -f -- "$cur"))
    compopt -o filenames 2>/dev/null
}
_sysbake_images() { IMAGES; }
_sysbake_containers() { CONTAINERS; }
_sysbake_values() {
    case "$1" in
VALUES_CASES
    esac
}
_sysbake_positional() {
    # The kind of argument number $1 (the last kind repeats when it ends in +).
    local n=$1 kind; shift
    local kinds=("$@"); local last=$(( ${#kinds[@]} - 1 ))
    if [[ $n -gt $last ]]; then
        kind=${kinds[$last]}; [[ $kind == *+ ]] || return
    else
        kind=${kinds[$n]}
    fi
    kind=${kind%+}
    case "$kind" in
        image) _sysbake_words "$(_sysbake_images)";;
        container) _sysbake_words "$(_sysbake_containers)";;
        "container|image") _sysbake_words "$(_sysbake_containers) $(_sysbake_images)";;
        path) _sysbake_files;;
        choices:*) local c=${kind#choices:}; _sysbake_words "${c//,/ }";;
    esac
}
_sysbake() {
    COMPREPLY=()
    local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]}
    local cmd="" i w args=0 nested=" NESTED " values=" TOP_VALUES "
    for ((i=1; i<COMP_CWORD; i++)); do
        w=${COMP_WORDS[i]}
        if [[ $w == -* ]]; then
            # An option that takes a value (for this command): skip the value too.
            [[ $values == *" $w "* ]] && ((i++))
        elif [[ -z $cmd || ( $nested == *" $cmd "* && $args -eq 0 ) ]]; then
            cmd=${cmd:+$cmd }$w
            values=" TOP_VALUES $(_sysbake_values "$cmd") "
        else
            ((args++))
        fi
    done
    case "$cmd" in
        "")
            case "$prev" in --store) _sysbake_files; return;; esac
            if [[ "$cur" == -* ]]; then _sysbake_words "TOP_FLAGS"; return; fi
            _sysbake_words "TOP_COMMANDS"; return;;
"""


def bash_script(top: Command) -> str:
    """A bash completion script for `top` (`complete -F _sysbake sysbake`)."""
    nested = sorted(" ".join(w) for w, c in top.walk() if c.commands)
    cases = [
        f'        "{" ".join(words)}") echo "{_words(_value_flags(command))}";;'
        for words, command in top.walk()
        if _value_flags(command)
    ]
    prelude = (
        _BASH_PRELUDE.replace("IMAGES;", IMAGES_COMMAND + ";")
        .replace("CONTAINERS;", CONTAINERS_COMMAND + ";")
        .replace("NESTED", " ".join(nested))
        .replace("VALUES_CASES", "\n".join(cases))
        .replace("TOP_VALUES", _words(_value_flags(top)))
        .replace("TOP_FLAGS", _words([f for o in top.options for f in o.flags]))
        .replace("TOP_COMMANDS", _words([c.name for c in top.commands]))
    )
    lines = prelude.rstrip("\n").split("\n")
    for words, command in top.walk():
        lines += _bash_case(words, command)
    lines += ["    esac", "}", "complete -F _sysbake sysbake", ""]
    return "\n".join(lines)


# -- zsh -------------------------------------------------------------------------------------


def _zsh_text(text: str) -> str:
    """`text` safe inside a single-quoted _arguments spec's [description]."""
    return re.sub(r"[\[\]:\\]", "", text).replace("'", "'\\''")[:120]


def _zsh_action(kind: str, choices: Sequence[str]) -> str:
    if choices:
        return f"({' '.join(choices)})"
    return {
        "image": "_sysbake_images",
        "container": "_sysbake_containers",
        "container|image": "_sysbake_any",
        "path": "_files",
    }.get(kind, " ")


def _zsh_specs(command: Command) -> list[str]:
    specs = []
    for option in command.options:
        text = _zsh_text(option.help)
        action = _zsh_action(option.kind, option.choices)
        value = f":{_zsh_text(option.metavar)}:{action}" if option.metavar else ""
        if len(option.flags) > 1:
            exclusive = " ".join(option.flags)
            flags = "{" + ",".join(option.flags) + "}"
            specs.append(f"'({exclusive})'{flags}'[{text}]{value}'")
        else:
            specs.append(f"'{option.flags[0]}[{text}]{value}'")
    for n, positional in enumerate(command.positionals, 1):
        action = _zsh_action(positional.kind, positional.choices)
        where = "*" if positional.many else str(n)
        specs.append(f"'{where}:{_zsh_text(positional.name)}:{action}'")
    return specs


def _zsh_function(words: tuple[str, ...], command: Command) -> list[str]:
    name = "_".join(["_sysbake", *(re.sub(r"\W", "_", w) for w in words)])
    lines = [f"{name}() {{"]
    if command.commands:
        subs = " ".join(f"'{c.name}:{_zsh_text(c.help)}'" for c in command.commands)
        lines += [
            "    local line state",
            f"    _arguments -C {' '.join(_zsh_specs(command))} '1: :->cmd' '*:: :->args'",
            "    case $state in",
            f"        cmd) local -a subs; subs=({subs}); _describe command subs;;",
            f"        args) (( $+functions[{name}_$line[1]] )) && {name}_$line[1];;",
            "    esac",
        ]
    else:
        lines.append(f"    _arguments -s {' '.join(_zsh_specs(command))}")
    lines.append("}")
    return lines


def zsh_script(top: Command) -> str:
    """A zsh completion function file for `top` (#compdef sysbake)."""
    lines = [
        "#compdef sysbake",
        "# zsh completion for sysbake, generated by `sysbake completion zsh`",
        "_sysbake_images() {",
        f'    local -a found; found=(${{(f)"$({IMAGES_COMMAND})"}}); _describe image found',
        "}",
        "_sysbake_containers() {",
        f'    local -a found; found=(${{(f)"$({CONTAINERS_COMMAND})"}}); _describe container found',
        "}",
        "_sysbake_any() { _sysbake_containers; _sysbake_images; }",
    ]
    for words, command in top.walk():
        lines += _zsh_function(words, command)
    lines += _zsh_function((), top)
    lines += ['_sysbake "$@"', ""]
    return "\n".join(lines)


# -- fish ------------------------------------------------------------------------------------


def _fish_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("'", "\\'")[:120]


def _fish_args(kind: str, choices: Sequence[str]) -> str:
    if choices:
        return f" -f -a '{' '.join(choices)}'"
    # fish reports a missing command itself: ask only when there is a sysbake to ask.
    images, containers = (
        f"command -q sysbake; and {_fish_text(c)}" for c in (IMAGES_COMMAND, CONTAINERS_COMMAND)
    )
    return {
        "image": f" -f -a '({images})'",
        "container": f" -f -a '({containers})'",
        "container|image": f" -f -a '({containers}; {images})'",
        "path": " -F",
    }.get(kind, " -f")


def _fish_option(condition: str, option: Option) -> str:
    parts = [f"complete -c sysbake -n '{condition}'"]
    for flag in option.flags:
        if flag.startswith("--"):
            parts.append(f"-l {flag[2:]}")
        elif len(flag) == 2:
            parts.append(f"-s {flag[1]}")
        else:
            parts.append(f"-o {flag[1:]}")
    if option.metavar:
        parts.append("-r" + _fish_args(option.kind, option.choices))
    parts.append(f"-d '{_fish_text(option.help)}'")
    return " ".join(parts)


def fish_script(top: Command) -> str:
    """A fish completion file for `top`."""
    names = " ".join(c.name for c in top.commands)
    lines = [
        "# fish completion for sysbake, generated by `sysbake completion fish`",
        "complete -c sysbake -f",
    ]
    lines += [_fish_option("true", o) for o in top.options]
    for command in top.commands:
        lines.append(
            f"complete -c sysbake -n 'not __fish_seen_subcommand_from {names}' "
            f"-a {command.name} -d '{_fish_text(command.help)}'"
        )
    for words, command in top.walk():
        condition = " && ".join(f"__fish_seen_subcommand_from {w}" for w in words)
        lines += [_fish_option(condition, o) for o in command.options]
        if command.commands:
            subs = " ".join(c.name for c in command.commands)
            lines.append(
                f"complete -c sysbake -n '{condition} && not __fish_seen_subcommand_from {subs}' "
                f"-a '{subs}'"
            )
        for positional in command.positionals[:1]:
            args = _fish_args(positional.kind, positional.choices)
            lines.append(f"complete -c sysbake -n '{condition}'{args}")
    return "\n".join([*lines, ""])


# -- man pages -------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """`text` as roff body text: backslashes and dashes escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line) if line.startswith((".", "'")) else line for line in text.split("\n")
    )


def man_page(
    words: tuple[str, ...], command: Command, groups: Sequence[tuple[str, Sequence[str]]] = ()
) -> str:
    """The man page of `command` (named by `words` below sysbake; () for sysbake.1)."""
    title = "-".join(("sysbake", *words))
    lines = [
        f'.TH {title.upper()} 1 "" "sysbake {__version__}" "sysbake manual"',
        ".SH NAME",
        f"{_roff(title)} \\- {_roff(command.help)}",
        ".SH SYNOPSIS",
        ".nf",
        _roff(command.usage),
        ".fi",
        ".SH DESCRIPTION",
        _roff(command.description or command.help),
    ]
    if command.commands:
        lines += _man_commands(command, groups)
    if command.positionals:
        lines.append(".SH ARGUMENTS")
        for positional in command.positionals:
            lines += [
                ".TP",
                f".I {_roff(positional.name)}",
                _roff(positional.help or positional.kind),
            ]
    if command.options:
        lines.append(".SH OPTIONS")
        for option in command.options:
            flags = ", ".join(f"\\fB{_roff(f)}\\fR" for f in option.flags)
            value = f" \\fI{_roff(option.metavar)}\\fR" if option.metavar else ""
            choices = f" (one of: {_roff(', '.join(option.choices))})" if option.choices else ""
            lines += [".TP", flags + value, _roff(option.help) + choices]
    if words:
        lines += [".SH SEE ALSO", "\\fBsysbake\\fR(1)"]
    else:
        lines += [
            ".SH ENVIRONMENT",
            ".TP",
            ".B SYSBAKE_STORE",
            "the store directory (default: /var/lib/sysbake; \\fB\\-\\-store\\fR overrides it)",
            ".SH SEE ALSO",
            ", ".join(f"\\fB{_roff('-'.join(('sysbake', *w)))}\\fR(1)" for w, _ in command.walk()),
        ]
    return "\n".join([*lines, ""])


def _man_commands(command: Command, groups: Sequence[tuple[str, Sequence[str]]]) -> list[str]:
    by_name = {c.name: c for c in command.commands}
    sections = [(t, [n for n in names if n in by_name]) for t, names in groups] or [
        ("COMMANDS", list(by_name))
    ]
    listed = {n for _, names in sections for n in names}
    rest = [n for n in by_name if n not in listed]
    lines = [".SH COMMANDS"]
    for title, names in [*sections, *([("Other", rest)] if rest else [])]:
        if names:
            lines.append(f".SS {_roff(title)}")
        for name in names:
            lines += [".TP", f".B {_roff(name)}", _roff(by_name[name].help)]
    return lines


def write_man_pages(top: Command, directory: Path) -> list[Path]:
    """sysbake.1 and sysbake-COMMAND[-SUB].1 for every command, into `directory`."""
    from sysbake.cli import command_groups
    from sysbake.fsutil import atomic_write

    directory.mkdir(parents=True, exist_ok=True)
    pages = [((), top), *top.walk()]
    written = []
    for words, command in pages:
        path = directory / ("-".join(("sysbake", *words)) + ".1")
        groups = command_groups() if not words else ()
        atomic_write(path, man_page(words, command, groups).encode(), durable=False)
        written.append(path)
    return written
