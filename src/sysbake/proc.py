"""The one way sysbake runs external commands: logged, typed errors, never orphaned."""

from __future__ import annotations

import functools
import os
import signal
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sysbake import log
from sysbake.errors import CommandError

if TYPE_CHECKING:
    import subprocess

_PR_SET_PDEATHSIG = 1
_TAIL_LINES = 20


@functools.cache
def die_with_parent_hook() -> Callable[[], None]:
    """A preexec_fn: children of a build must not outlive sysbake (kill -9 included), the
    kernel sends them SIGKILL when we die."""
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def hook() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    return hook


# Prefix for commands that mount or spawn trees of processes (mmdebstrap, chroot steps):
# a private mount namespace and a PID namespace whose init is SIGKILLed when unshare dies.
# Since unshare dies with us (die_with_parent), kill -9 of sysbake takes every process
# inside down, and their mounts vanish with the namespace.
ISOLATED = ("unshare", "--mount", "--propagation", "private", "--pid", "--kill-child")


def which(program: str) -> str | None:
    import shutil

    return shutil.which(program)


def require(program: str, package: str) -> str:
    """Path of `program`, or a clear error naming the Debian package that provides it."""
    path = which(program)
    if path is None:
        raise CommandError(f"{program} not found: install the Debian package '{package}'")
    return path


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    what: str | None = None,
    check: bool = True,
    capture: bool = True,
    stream: bool = False,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | Path | None = None,
    timeout: float | None = None,
    die_with_parent: bool = True,
    setup: Callable[[], None] | None = None,
    on_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd`; on failure raise CommandError naming `what` with the output's last lines.

    `stream=True` copies output to stderr as it comes (progress for long steps) while
    keeping its tail for the error message; otherwise stdout and stderr are captured.
    `setup` runs in the child before it execs (a mount namespace of its own, say).
    `on_line` is called with each line of either as it comes (sysbake.progress reads
    them), both still captured whole and apart.
    """
    import subprocess

    argv = [os.fspath(c) for c in cmd]
    label = what or os.path.basename(argv[0])
    log.debug("run: " + " ".join(argv))
    preexec = die_with_parent_hook() if die_with_parent else None
    if setup is not None:
        preexec = _then(preexec, setup)
    if on_line is not None:
        result = _run_watched(argv, label, on_line, input, env, cwd, timeout, preexec)
    elif stream:
        last: deque[str] = deque(maxlen=_TAIL_LINES)
        with _popen(argv, input, subprocess.STDOUT, env, cwd, preexec) as proc:
            _feed(proc, input)
            assert proc.stdout is not None
            for raw in proc.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                last.append(line)
                log.info(f"    {line}")
            rc = proc.wait(timeout=timeout)
        out = "\n".join(last).encode()
        result = subprocess.CompletedProcess(argv, rc, out, b"")
    else:
        try:
            result = subprocess.run(
                argv,
                input=input,
                stdin=None if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                env=None if env is None else dict(env),
                cwd=cwd,
                timeout=timeout,
                preexec_fn=preexec,
            )
        except subprocess.TimeoutExpired as exc:
            raise CommandError(f"{label}: timed out after {timeout:.0f}s") from exc
        except FileNotFoundError as exc:
            raise CommandError(f"{label}: command not found: {argv[0]}") from exc
    if check and result.returncode != 0:
        output = _telling_output(result)
        raise CommandError(
            f"{label} failed (exit {result.returncode}): {tail(output)}",
            returncode=result.returncode,
            tail=tail(output, _TAIL_LINES, sep="\n", empty=""),
        )
    return result


def _then(first: Callable[[], None] | None, then: Callable[[], None]) -> Callable[[], None]:
    def both() -> None:
        if first is not None:
            first()
        then()

    return both


def _popen(
    argv: list[str],
    input: bytes | None,
    stderr: int,
    env: Mapping[str, str] | None,
    cwd: str | Path | None,
    preexec: Callable[[], None] | None,
) -> subprocess.Popen[bytes]:
    """`argv` started with its stdout piped and its stderr to `stderr` (a pipe, or
    stdout); its stdin a pipe when there is `input` (for `_feed`), else /dev/null."""
    import subprocess

    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=None if env is None else dict(env),
        cwd=cwd,
        preexec_fn=preexec,
    )


def _feed(child: subprocess.Popen[bytes], input: bytes | None) -> None:
    """Write `input` to the stdin of `child` and close it, before any output is read
    (so small inputs only)."""
    if input is not None and child.stdin is not None:
        child.stdin.write(input)
        child.stdin.close()


def _run_watched(
    argv: list[str],
    label: str,
    on_line: Callable[[str], None],
    input: bytes | None,
    env: Mapping[str, str] | None,
    cwd: str | Path | None,
    timeout: float | None,
    preexec: Callable[[], None] | None,
) -> subprocess.CompletedProcess[bytes]:
    """`run` with stdout and stderr read as they come: each line goes to `on_line`."""
    import selectors
    import subprocess
    import time

    try:
        child = _popen(argv, input, subprocess.PIPE, env, cwd, preexec)
    except FileNotFoundError as exc:
        raise CommandError(f"{label}: command not found: {argv[0]}") from exc
    with child:
        _feed(child, input)
        assert child.stdout is not None and child.stderr is not None
        fds = (child.stdout.fileno(), child.stderr.fileno())
        kept: dict[int, list[bytes]] = {fd: [] for fd in fds}
        partial = dict.fromkeys(kept, b"")
        deadline = None if timeout is None else time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            for fd in kept:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    child.kill()
                    raise CommandError(f"{label}: timed out after {timeout:.0f}s")
                for key, _ in sel.select(left):
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        chunk = b"\n" if partial[key.fd] else b""
                    else:
                        kept[key.fd].append(chunk)
                    *lines, partial[key.fd] = (partial[key.fd] + chunk).split(b"\n")
                    for line in lines:
                        on_line(line.decode(errors="replace").rstrip("\r"))
        rc = child.wait()
    out, err = (b"".join(kept[fd]) for fd in fds)
    return subprocess.CompletedProcess(argv, rc, out, err)


def tail(output: str | bytes, lines: int = 3, *, sep: str = " | ", empty: str = "no output") -> str:
    """The last `lines` non-blank lines of `output`, stripped and joined by `sep` (one line
    for an error message by default); `empty` when it has none."""
    text = output.decode(errors="replace") if isinstance(output, bytes) else output
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return sep.join(kept) if kept else empty


def _telling_output(result: subprocess.CompletedProcess[bytes]) -> bytes:
    # A failing command says why on stderr; some say it on stdout only.
    stderr = result.stderr or b""
    return stderr if stderr.strip() else result.stdout or b""


def tail_of(result: subprocess.CompletedProcess[bytes], *, lines: int = 3) -> str:
    """`tail` of a finished command's stderr, or of its stdout when stderr is blank."""
    return tail(_telling_output(result), lines)
