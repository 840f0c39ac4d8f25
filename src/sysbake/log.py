"""Progress output for long work: steps on stderr, timed; silent when --json or --quiet."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

_state = {"quiet": False, "debug": False}


def configure(*, quiet: bool = False, debug: bool = False) -> None:
    _state["quiet"] = quiet
    _state["debug"] = debug


def debug_enabled() -> bool:
    return _state["debug"]


def info(message: str) -> None:
    """A line of progress for humans (stderr, so stdout stays machine-readable)."""
    if not _state["quiet"]:
        print(message, file=sys.stderr, flush=True)


def debug(message: str) -> None:
    if _state["debug"]:
        print(f"debug: {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


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
