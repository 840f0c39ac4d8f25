"""Live progress of long work on stderr: bootstrap, Salt, exports, pushes and pulls.

Where it shows (`mode()`):
* "tty": stderr is a terminal (and TERM is not "dumb"). One status line at the bottom,
  rewritten in place ("\\r", erase to the end of line; no colour) at most ten times a
  second, never wider than the terminal, erased when the work ends. Lines printed meanwhile
  (sysbake.log) go above it.
* "plain": anything else (a pipe, a file, CI). The same status text as ordinary lines, at
  most one every PLAIN_EVERY seconds, never an escape code.
* "off": -q, or --json without --debug (sysbake.log.quiet()).
A summary line when a piece of work ends is an ordinary log line (not shown when off).

What feeds it: `Meter` counts bytes toward a total (exports, blobs); `transfer` and `Blob`
count a push's or pull's blobs one by one and together; `AptWatch` reads mmdebstrap's
--verbose output (apt's and dpkg's lines) for packages fetched, unpacked and configured;
`PipWatch` reads pip's; `StepWatch` follows a provision step's output and Salt's log file
("Running state [...]" / "Completed state [...]") for the states done.
"""

from __future__ import annotations

import _thread
import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

from sysbake import log

PLAIN_EVERY = 5.0  # seconds between two plain status lines
TTY_EVERY = 0.1  # seconds between two redraws of the terminal's status line
INDENT = "    "


def mode() -> str:
    """Where progress shows: "tty", "plain" or "off" (see the module docstring)."""
    if log.quiet():
        return "off"
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return "tty" if tty and os.environ.get("TERM", "") != "dumb" else "plain"


def size(n: float) -> str:
    """A byte count for humans, in decimal units as docker prints them: 512B, 12.3MB."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1000
    raise AssertionError("unreachable")


def percent(done: int, total: int) -> int:
    """`done` of `total` in whole percent, 0..100 (100 for an empty total)."""
    if total <= 0:
        return 100
    return max(0, min(100, done * 100 // total))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


_shown: list[Status] = []  # open statuses, innermost last: only that one is on screen
_shown_lock = _thread.allocate_lock()


class Status:
    """One status line of a piece of work (see the module docstring for where it shows).
    `update` may be called from any thread, as often as wanted: it is throttled; `close`
    erases it and prints `final`, if any, as an ordinary line."""

    def __init__(self, *, indent: str = INDENT, plain_every: float = PLAIN_EVERY) -> None:
        self.mode = mode()
        self.indent = indent
        self.every = TTY_EVERY if self.mode == "tty" else plain_every
        self.text = ""
        # When the text was last shown: a first plain line only once the work has gone on
        # for a while (short work prints none), a terminal's at once.
        self._last = time.monotonic() if self.mode == "plain" else 0.0
        self._lock = _thread.allocate_lock()
        self._open = False

    def __enter__(self) -> Status:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> None:
        if self.mode == "tty" and not self._open:
            with _shown_lock:
                _shown.append(self)
        self._open = True

    def update(self, text: str, *, force: bool = False) -> None:
        """Show `text` now if the last showing is old enough (or `force`)."""
        with self._lock:
            self.text = text
            now = time.monotonic()
            if self.mode == "off" or not (force or now - self._last >= self.every):
                return
            self._last = now
            self._show(text)

    def _show(self, text: str) -> None:
        line = f"{self.indent}{text}"
        if self.mode == "plain":
            log.info(line)
            return
        with _shown_lock:
            if not _shown or _shown[-1] is not self:
                return  # an inner status is on screen
        width = max(_columns() - 1, 10)
        log.show_live(line if len(line) <= width else line[: width - 1] + "…")

    def close(self, final: str | None = None) -> None:
        """Erase the status line (showing the enclosing status again) and print `final`."""
        if self.mode == "tty" and self._open:
            with _shown_lock:
                if self in _shown:
                    _shown.remove(self)
                outer = _shown[-1] if _shown else None
            log.show_live("")
            if outer is not None and outer.text:
                outer._show(outer.text)
        self._open = False
        if final is not None and self.mode != "off":
            log.info(f"{self.indent}{final}")


# -- bytes ------------------------------------------------------------------------------------


class Meter:
    """Bytes of one piece of work toward `total` (None: unknown), shown on a Status as
    "LABEL: 12.3MB of 45.6MB (27%)"."""

    def __init__(self, label: str, total: int | None, status: Status | None = None) -> None:
        self.label, self.total = label, total
        self.done = 0
        self.status = status if status is not None else Status()
        self.start = time.monotonic()

    def __enter__(self) -> Meter:
        self.status.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.close()

    def add(self, n: int) -> None:
        self.set(self.done + n)

    def set(self, done: int) -> None:
        self.done = done
        self.status.update(self.text())

    def text(self) -> str:
        if self.total is None:
            return f"{self.label}: {size(self.done)}"
        return (
            f"{self.label}: {size(self.done)} of {size(self.total)} "
            f"({percent(self.done, self.total)}%)"
        )

    def reader(self, inner: Readable) -> CountingReader:
        """`inner`, its reads counted here."""
        return CountingReader(inner, self.add)

    def writer(self, inner: Writable) -> CountingWriter:
        """`inner`, its writes counted here."""
        return CountingWriter(inner, self.add)


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...


class CountingReader:
    """A reader passing each chunk's length to `count`."""

    def __init__(self, inner: Readable, count: Callable[[int], None]) -> None:
        self._inner, self._count = inner, count

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        self._count(len(data))
        return data


class CountingWriter:
    """A writer passing each chunk's length to `count`."""

    def __init__(self, inner: Writable, count: Callable[[int], None]) -> None:
        self._inner, self._count = inner, count

    def write(self, data: bytes, /) -> int:
        n = self._inner.write(data)
        self._count(len(data))
        return n


def tree_bytes(root: Path) -> int:
    """About how many bytes a tar of the tree under `root` holds (a header per entry,
    regular files' sizes rounded to blocks): the total of an export's meter. Links are
    never followed and nothing is read."""
    total = 1024
    todo = [os.fspath(root)]
    while todo:  # no recursion: a tree may be deeper than Python's limit
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    total += 512
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += -(-entry.stat(follow_symlinks=False).st_size // 512) * 512
        except OSError:
            continue  # an estimate: what cannot be listed is left out
    return total


@contextlib.contextmanager
def file_position(meter: Meter, fd: int, *, every: float = 0.2) -> Iterator[None]:
    """Meter the reading of the file open on `fd` by another process (a decompressor given
    it as stdin): its shared file offset, sampled every `every` seconds meanwhile."""
    if meter.status.mode == "off":
        yield
        return
    done = _thread.allocate_lock()
    done.acquire()

    def sample() -> None:
        while not done.acquire(timeout=every):
            with contextlib.suppress(OSError):
                meter.set(os.lseek(fd, 0, os.SEEK_CUR))
        done.release()

    _thread.start_new_thread(sample, ())
    try:
        yield
    finally:
        done.release()
        with contextlib.suppress(OSError):
            meter.set(os.lseek(fd, 0, os.SEEK_CUR))


# -- pushes and pulls -----------------------------------------------------------------------


class Described(Protocol):
    """A blob as a descriptor names it."""

    @property
    def digest(self) -> str: ...
    @property
    def size(self) -> int: ...


def short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


class Transfer:
    """The blobs of one push or pull, in the order they are handled: the bytes moved in
    all of them. A blob handled without moving (present, mounted) counts as done when a
    later one starts or the transfer ends."""

    def __init__(self, verb: str, blobs: Sequence[Described]) -> None:
        self.verb = verb
        self.digests = [b.digest for b in blobs]
        self.total = sum(b.size for b in blobs)
        self.sizes = {b.digest: b.size for b in blobs}
        self.settled = 0  # bytes of the blobs before the current one
        self.index = -1
        self.status = Status()

    def start(self, digest: str) -> int:
        """Blob `digest` starts moving: its 1-based number (0 when not in the list)."""
        if digest not in self.digests:
            return 0
        index = self.digests.index(digest)
        if index > self.index:
            self.settled = sum(self.sizes[d] for d in self.digests[:index])
            self.index = index
        return index + 1

    def line(self, blob: str, done: int) -> str:
        return (
            f"{blob} · all: {size(self.settled + done)} of {size(self.total)} "
            f"({percent(self.settled + done, self.total)}%)"
        )


_transfers: list[Transfer] = []


@contextlib.contextmanager
def transfer(verb: str, blobs: Sequence[Described]) -> Iterator[Transfer]:
    """The push or pull of `blobs` (in order) in progress: `Blob` meters report to it."""
    current = Transfer(verb, blobs)
    _transfers.append(current)
    try:
        with current.status:
            yield current
    finally:
        _transfers.remove(current)


class Blob:
    """One blob moving ("pushing", "pulling"): its bytes and, within `transfer`, those of
    all; `finish` prints the blob's line ("1a2b3c4d5e6f: pushed (12.3MB, 1.2s)")."""

    def __init__(self, verb: str, desc: Described) -> None:
        self.verb, self.desc = verb, desc
        self._done = 0
        self.start = time.monotonic()
        self.transfer = _transfers[-1] if _transfers else None
        self.number = self.transfer.start(desc.digest) if self.transfer else 0
        self.status = self.transfer.status if self.transfer else Status()

    @property
    def done(self) -> int:
        return self._done

    @done.setter
    def done(self, value: int) -> None:
        # Set back when an upload or download starts over or resumes.
        self._done = value
        self._show()

    def add(self, n: int) -> None:
        self.done = self._done + n

    def _show(self) -> None:
        count = f" {self.number}/{len(self.transfer.digests)}" if self.transfer else ""
        blob = (
            f"{self.verb}{count} {short(self.desc.digest)}: {size(self._done)} of "
            f"{size(self.desc.size)} ({percent(self._done, self.desc.size)}%)"
        )
        self.status.update(self.transfer.line(blob, self._done) if self.transfer else blob)

    def finish(self, what: str) -> None:
        secs = time.monotonic() - self.start
        log.info(f"{INDENT}{short(self.desc.digest)}: {what} ({size(self.desc.size)}, {secs:.1f}s)")


# -- mmdebstrap, apt and dpkg ---------------------------------------------------------------

_APT_TOTAL = re.compile(r"^\d+ upgraded, (\d+) newly installed")
# A package download: "Get:1 URI SUITE/COMPONENT ARCH PACKAGE ARCH VERSION [SIZE]" (index
# files have fewer fields).
_APT_GET = re.compile(r"^Get:\d+ \S+ \S+ \S+ \S+ \S+ \S+ \[")
_DPKG_UNPACK = re.compile(r"^Unpacking (\S+)")
_DPKG_SETUP = re.compile(r"^Setting up (\S+)")
_PHASE = re.compile(r"^I: (downloading|extracting|installing)\b(.*?)\.*$")


class AptWatch:
    """Packages a bootstrap fetched, unpacked and configured, read from mmdebstrap's
    --verbose output line by line (`line`); `summary()` is the closing line."""

    def __init__(self, status: Status | None = None) -> None:
        self.status = status if status is not None else Status()
        self.phase = ""
        self.totals: dict[str, int] = {}  # phase -> packages apt said it installs then
        self.fetched = self.unpacked = self.configured = 0
        self.echo = log.debug_enabled()  # --debug: every line, as before there was a status

    def __enter__(self) -> AptWatch:
        self.status.open()
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        self.status.close(self.summary() if kind is None and self.unpacked else None)

    @property
    def total(self) -> int:
        return max(sum(self.totals.values()), self.unpacked)

    def line(self, text: str) -> None:
        if self.echo:
            log.info(f"{INDENT}{text}")
        text = text.strip()
        if (m := _PHASE.match(text)) is not None:
            self.phase = (m[1] + m[2]).strip()
        elif (m := _APT_TOTAL.match(text)) is not None:
            self.totals[self.phase] = int(m[1])  # apt may say it twice: once per phase
        elif _DPKG_UNPACK.match(text):
            self.unpacked += 1
        elif _DPKG_SETUP.match(text):
            self.configured += 1
        elif _APT_GET.match(text) and self.phase.startswith(("downloading", "installing")):
            self.fetched += 1  # not a hook's own downloads (eatmydata's, while extracting)
        else:
            return
        self.status.update(self.text())

    def text(self) -> str:
        total = self.total
        parts = [
            f"{self.fetched} fetched",
            f"{self.unpacked}/{total} unpacked",
            f"{self.configured}/{total} configured",
        ]
        return f"packages: {', '.join(parts)}" + (f" ({self.phase})" if self.phase else "")

    def summary(self) -> str:
        return (
            f"{self.total} packages: {self.fetched} fetched, {self.total - self.fetched} "
            f"from the .deb cache, {self.unpacked} unpacked, {self.configured} configured"
        )


_PIP_PROCESSING = re.compile(r"^\s*Processing \S+")


class PipWatch:
    """Distributions pip installed, of `total` (the wheelhouse's), from its output."""

    def __init__(self, total: int, status: Status | None = None) -> None:
        self.total = total
        self.done = 0
        self.status = status if status is not None else Status()

    def __enter__(self) -> PipWatch:
        self.status.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.close()

    def line(self, text: str) -> None:
        if _PIP_PROCESSING.match(text):
            self.done += 1
            self.status.update(f"pip: {self.done}/{self.total} distributions processed")
        elif text.startswith("Installing collected packages"):
            self.status.update("pip: installing", force=self.status.mode == "tty")


# -- provision steps: their output and Salt's log -------------------------------------------

_SALT_RUNNING = re.compile(r"Running state \[(.*)\] at time")
_SALT_EXECUTING = re.compile(r"Executing state (\S+) for \[(.*)\]")
_SALT_COMPLETED = re.compile(r"Completed state \[(.*)\] at time")
# Salt's other log records, on the console ("[WARNING ] ...") or in its log file
# ("2026-01-01 10:00:00,001 [salt.state :2431][INFO ][42] ..."): not the step's output.
_SALT_CONSOLE = re.compile(
    r"\[(DEBUG|INFO|WARNING|ERROR|CRITICAL|PROFILE|TRACE) *\]|\d{4}-\d\d-\d\d [\d:,]+ \[\S+ *:"
)
_FOLLOW_EVERY = 0.2  # seconds between two looks at the followed files
_READ_MAX = 1 << 20  # bytes read from a followed file per look


class StepWatch:
    """What a provision step is doing, for its status line: the states Salt completed
    (from its log file), else the step's last line of output. Lines come from `line`
    (a chroot step's pipes) or from files a booted step writes, followed while it runs
    (`follow`)."""

    def __init__(self, where: str, status: Status | None = None) -> None:
        self.where = where
        self.status = status if status is not None else Status()
        self.states = 0
        self.running = ""
        self.last = ""
        self._pending: dict[str, bytes] = {}
        self._lock = _thread.allocate_lock()  # lines come from a pipe and a follower

    def line(self, text: str) -> None:
        text = text.strip()
        with self._lock:
            if _SALT_COMPLETED.search(text) is not None:
                self.states += 1
                self.running = ""
            elif (m := _SALT_EXECUTING.search(text)) is not None:
                self.running = f"{m[1]} {m[2]}"
            elif (m := _SALT_RUNNING.search(text)) is not None:
                self.running = m[1]
            elif text and _SALT_CONSOLE.match(text) is None:
                self.last = text
            else:
                return
            shown = self.text()
        self.status.update(shown)

    def text(self) -> str:
        if self.states or self.running:
            doing = f", running {self.running}" if self.running else ""
            return f"salt: {self.states} states done{doing}"
        return f"| {self.last}"

    def summary(self) -> str | None:
        return f"salt: {self.states} states done" if self.states else None

    @contextlib.contextmanager
    def follow(self, paths: Sequence[Path]) -> Iterator[StepWatch]:
        """Feed `line` with what is appended to `paths` (regular files, never through a
        link: an image's step writes them) while the block runs."""
        if self.status.mode == "off":
            yield self
            return
        offsets = dict.fromkeys(map(str, paths), 0)
        stop = _thread.allocate_lock()
        stop.acquire()
        ended = _thread.allocate_lock()
        ended.acquire()

        def run() -> None:
            try:
                while not stop.acquire(timeout=_FOLLOW_EVERY):
                    self._look(offsets)
                self._look(offsets)
            finally:
                ended.release()

        _thread.start_new_thread(run, ())
        with self.status:
            try:
                yield self
            finally:
                stop.release()
                ended.acquire()

    def _look(self, offsets: dict[str, int]) -> None:
        for path, offset in offsets.items():
            data = read_appended(path, offset)
            if not data:
                continue
            offsets[path] = offset + len(data)
            text = self._pending.pop(path, b"") + data
            *lines, rest = text.split(b"\n")
            if rest:
                self._pending[path] = rest[-4096:]
            for raw in lines:
                self.line(raw.decode(errors="replace"))


def read_appended(path: str, offset: int) -> bytes:
    """What regular file `path` holds past `offset` (at most 1 MiB); b"" when it is
    missing, not a regular file, a symlink, or holds no more."""
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return b""
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return b""
        return os.pread(fd, _READ_MAX, offset)
    except OSError:
        return b""
    finally:
        os.close(fd)
