"""The one output tail (sysbake.proc.tail) and the errors of commands that carry it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sysbake import proc
from sysbake.build.salt.run import parse_result
from sysbake.errors import CommandError

OUTPUT = "first\n\n  second  \r\n\t\nthird\nfourth\n   \n"


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (1, "fourth"),
        (3, "second | third | fourth"),
        (4, "first | second | third | fourth"),
        (10, "first | second | third | fourth"),
    ],
)
def test_the_last_non_blank_lines_stripped(lines: int, expected: str) -> None:
    assert proc.tail(OUTPUT, lines) == expected
    assert proc.tail(OUTPUT.encode(), lines) == expected  # bytes as they come from a pipe


def test_the_default_is_three_lines_for_one_line_messages() -> None:
    assert proc.tail(OUTPUT) == "second | third | fourth"
    assert proc.tail(OUTPUT, 2, sep="\n") == "third\nfourth"
    assert proc.tail(b"caf\xe9\n") == "caf\ufffd"  # undecodable bytes do not raise


@pytest.mark.parametrize("blank", ["", "\n\n", " \t \r\n"])
def test_nothing_to_show(blank: str) -> None:
    assert proc.tail(blank) == "no output"
    assert proc.tail(blank, 5, empty="") == ""
    assert proc.tail(blank.encode(), empty="none") == "none"


def _py(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_failed_command_says_its_tail_and_carries_more() -> None:
    lines = "".join(f"print('line {i}', file=sys.stderr); " for i in range(30))
    with pytest.raises(CommandError) as caught:
        proc.run(_py(f"import sys; print('out'); {lines}sys.exit(4)"), what="the tool")
    assert str(caught.value) == "the tool failed (exit 4): line 27 | line 28 | line 29"
    assert caught.value.returncode == 4
    assert caught.value.tail == "\n".join(f"line {i}" for i in range(10, 30))


def test_stdout_speaks_when_stderr_is_silent() -> None:
    with pytest.raises(CommandError, match=r"^x failed \(exit 1\): b \| c \| d$"):
        proc.run(_py("print('a\\nb\\n\\nc\\nd'); raise SystemExit(1)"), what="x")
    result = subprocess.CompletedProcess(["x"], 1, b"out\n", b"  \n")
    assert proc.tail_of(result) == "out"
    assert proc.tail_of(subprocess.CompletedProcess(["x"], 1, b"", b"")) == "no output"
    assert proc.tail_of(subprocess.CompletedProcess(["x"], 1, None, None)) == "no output"


def test_a_streamed_command_keeps_its_tail() -> None:
    with pytest.raises(CommandError) as caught:
        proc.run(
            _py("import sys; print('\\n'.join(map(str, range(50)))); sys.exit(2)"),
            what="s",
            stream=True,
        )
    assert str(caught.value) == "s failed (exit 2): 47 | 48 | 49"
    assert caught.value.tail == "\n".join(str(i) for i in range(30, 50))


def test_salt_without_a_result_says_its_stderr_tail() -> None:
    result = parse_result(b"", 1, b"one\ntwo\n\nthree\nfour\n")
    assert result.errors == ("salt-call printed no result (exit 1): two | three | four",)
    assert parse_result(b"", 0, b"").errors == ("salt-call printed no result (exit 0): no output",)
