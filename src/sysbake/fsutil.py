"""File-system primitives shared by the store and everything that keeps state on disk:
atomic replacement of a file, removal of a tree, disk errors as one clear line. Kept
apart from the store so that light commands (stop, exec, ps) do not import it."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Any, NoReturn

from sysbake.errors import StoreError


def fsync_dir(path: Path) -> None:
    """fsync a directory: a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def raise_disk(exc: OSError, what: str) -> NoReturn:
    """A StoreError for `exc` met while doing `what` ("no space left" said plainly),
    naming the file the error names when `what` does not already."""
    where = f" ({exc.filename})" if exc.filename and str(exc.filename) not in what else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        raise StoreError(f"{what}{where}: no space left on device") from exc
    raise StoreError(f"{what}{where}: {exc.strerror or exc}") from exc


# How tar, dpkg, apt, cp, Python and Salt say that a write found the disk full.
_NO_SPACE = ("No space left on device", "Disk quota exceeded", "[Errno 28]", "(28: ")


def no_space_line(output: str) -> str | None:
    """The first line of a command's `output` saying that the disk is full (the cause;
    what follows is its fallout), stripped of apt's "E: " prefix and cut to what leads
    to the message when long (JSON on one line); None if none does."""
    for raw in output.splitlines():
        found = [(raw.index(sign), sign) for sign in _NO_SPACE if sign in raw]
        if not found:
            continue
        line = raw.strip()
        line = line[3:] if line[:3] in ("E: ", "W: ") else line
        if len(line) > 300:
            at, sign = min(found)
            at = line.find(sign)
            line = "..." + line[max(0, at - 200):at + len(sign) + 60]
        return line
    return None


def raise_if_no_space(output: bytes, what: str) -> None:
    """StoreError "`what`: no space left on device: LINE" when a failed command's
    `output` says the disk was full."""
    line = no_space_line(output.decode(errors="replace"))
    if line is not None:
        raise StoreError(f"{what}: no space left on device: {line}")


def atomic_write(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically (temp file in the same dir, fsync, rename),
    with permissions `mode` (0644: blobs and state are for every reader).
    `durable=False` skips the fsync: for state that cannot outlive a reboot anyway (a
    running container's files), where a journal commit per write costs milliseconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh name of our own (what tempfile.mkstemp does, without its import cost).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{os.urandom(6).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
    except OSError as exc:
        raise_disk(exc, f"writing {path}")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise_disk(exc, f"writing {path}")
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_tree(path: Path) -> None:
    """Remove a file or tree, including read-only dirs and immutable-free special files."""
    if not os.path.lexists(path):
        return
    if path.is_symlink() or not path.is_dir():
        path.unlink()
        return

    def onerror(func: Any, p: str, exc_info: Any) -> None:
        try:
            os.chmod(os.path.dirname(p), 0o700)
            func(p)
        except FileNotFoundError:
            pass

    import shutil  # here: not every command removes trees (start-up cost)

    shutil.rmtree(path, onerror=onerror)
