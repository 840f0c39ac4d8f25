"""The command line builds only the parsers of its command's module (sysbake.commands:
start-up), and they parse as the full parser does."""

from __future__ import annotations

import argparse

import pytest

from sysbake import cli
from sysbake.commands import COMMANDS, all_command_modules, first_command, modules_for


def _registered(module: object) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    module.register(sub, lambda p: None)  # type: ignore[attr-defined]
    return set(sub.choices)


def test_the_command_table_says_exactly_what_each_module_registers() -> None:
    seen: set[str] = set()
    for name, module in zip(COMMANDS, all_command_modules(), strict=True):
        declared = set(COMMANDS[name])
        assert declared == _registered(module), module.__name__
        assert not declared & seen, f"{module.__name__} repeats {declared & seen}"
        seen |= declared


@pytest.mark.parametrize(
    ("argv", "command"),
    [
        (["run", "-d", "base"], "run"),
        (["--store", "/tmp/s", "--json", "stop", "x"], "stop"),
        (["--store", "stop", "ps"], "ps"),  # "stop" is the store path here
        (["--sto", "test", "run", "img"], "run"),  # argparse's abbreviation of --store
        (["-h", "stop"], None),  # top-level help: every command
        (["--debug"], None),
        ([], None),
    ],
)
def test_first_command(argv: list[str], command: str | None) -> None:
    assert first_command(argv) == command


def test_a_command_line_registers_only_its_module() -> None:
    modules = modules_for(["--store", "/tmp/s", "exec", "c", "ls"])
    assert [m.__name__ for m in modules] == ["sysbake.commands.runtime"]
    assert len(modules_for(["--help"])) == len(all_command_modules())
    assert len(modules_for(["no-such-command"])) == len(all_command_modules())


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(actions[0].choices)


def test_a_command_line_builds_only_its_modules_parsers() -> None:
    assert _subcommands(cli.build_parser(["--json", "stop", "x"])) == set(COMMANDS["runtime"])
    assert "build" in _subcommands(cli.build_parser(["--help"]))
    assert len(_subcommands(cli.build_parser(["no-such-command"]))) == len(
        _subcommands(cli.build_parser())
    )


def test_partial_and_full_parsers_agree() -> None:
    argv = ["--store", "/tmp/s", "stop", "--timeout", "3", "a", "b"]
    partial = vars(cli.build_parser(argv).parse_args(argv))
    full = vars(cli.build_parser().parse_args(argv))
    assert partial == full
    assert partial["timeout"] == 3


def test_unknown_command_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    err = capsys.readouterr().err
    for word in ("build", "run", "export", "init", "flags"):
        assert word in err
