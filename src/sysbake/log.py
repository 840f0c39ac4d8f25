"""Progress output for long work: steps on stderr, timed; silent when --json or --quiet.

A live status line (sysbake.progress) may sit at the bottom of a terminal: every line
printed here first clears it and then shows it again below, so the two never mix."""

from __future__ import annotations

import _thread
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"quiet": False, "debug": False}
_lock = _thread.allocate_lock()  # one writer at a time: progress lines come from threads too
_live = [""]  # the status line sysbake.progress shows on the terminal ("" when none)


def configure(*, quiet: bool = False, debug: bool = False) -> None:
    _state["quiet"] = quiet
    _state["debug"] = debug


def debug_enabled() -> bool:
    return _state["debug"]


def quiet() -> bool:
    """Whether progress output is off (-q, or --json without --debug)."""
    return _state["quiet"]


def _emit(message: str) -> None:
    with _lock:
        live = _live[0]
        # "\r\x1b[K": back to the start of the status line and erase it (terminals only:
        # a status line is shown only there).
        text = f"\r\x1b[K{message}\n{live}" if live else f"{message}\n"
        try:
            sys.stderr.write(text)
            sys.stderr.flush()
        except ValueError:  # stderr closed at exit
            pass


def show_live(text: str) -> None:
    """Show `text` as the terminal's status line in place of the previous one; "" erases
    it (for sysbake.progress, which decides that stderr is a terminal)."""
    with _lock:
        _live[0] = text
        try:
            sys.stderr.write(f"\r\x1b[K{text}")
            sys.stderr.flush()
        except ValueError:
            pass


def info(message: str) -> None:
    """A line of progress for humans (stderr, so stdout stays machine-readable)."""
    if not _state["quiet"]:
        _emit(message)


def debug(message: str) -> None:
    if _state["debug"]:
        _emit(f"debug: {message}")


def warn(message: str) -> None:
    _emit(f"warning: {message}")


@contextmanager
def step(title: str) -> Iterator[None]:
    """Announce a step, then report how long it took (or that it failed)."""
    info(f"==> {title}")
    start = time.monotonic()
    try:
        yield
    except BaseException:
        info(f"    failed after {time.monotonic() - start:.1f}s: {title}")
        raise
    info(f"    done in {time.monotonic() - start:.1f}s")
