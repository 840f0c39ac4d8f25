"""File-system primitives shared by the store and everything that keeps state on disk:
atomic replacement of a file, atomic publication of a finished tree, removal of a tree,
disk errors as one clear line, whether a process holds a lock file. Kept apart from the
store so that light commands (stop, exec, ps) do not import it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from sysbake.errors import StoreError


def fsync_dir(path: Path) -> None:
    """fsync a directory: a rename into it survives a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_held(path: Path) -> bool:
    """Whether a process holds an exclusive flock on `path` (False when it does not exist);
    asking never takes the lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


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
            line = "..." + line[max(0, at - 200) : at + len(sign) + 60]
        return line
    return None


def raise_if_no_space(output: bytes, what: str) -> None:
    """StoreError "`what`: no space left on device: LINE" when a failed command's
    `output` says the disk was full."""
    line = no_space_line(output.decode(errors="replace"))
    if line is not None:
        raise StoreError(f"{what}: no space left on device: {line}")


@contextlib.contextmanager
def atomic_file(
    path: Path, *, durable: bool = True, mode: int | None = 0o644
) -> Iterator[BinaryIO]:
    """A file to write the new content of `path` to. When the block ends normally it
    replaces `path` in one rename, with permissions `mode` (None: 0666 minus the umask, as
    for any new file), fsynced first unless not `durable`; when it raises, `path` is left
    as it was and the temp file removed. OSError propagates as is. No parent is made."""
    # A fresh name of our own, hidden, in the same directory (what tempfile.mkstemp does,
    # without its import cost); the name is cut so that the temp name stays a valid one.
    tmp = path.parent / f".{path.name[:200]}.{os.getpid()}.{os.urandom(6).hex()}"
    with _named(path):
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), _new_file_mode() if mode is None else mode)
            if durable:
                os.fsync(f.fileno())
        with _named(path):
            os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _named(path: Path) -> Iterator[None]:
    # An error on the temp file is one on `path` to whoever reads it: nobody sees the temp.
    try:
        yield
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, os.fspath(path)) from None


def _new_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Replace `path` with `data` atomically (`atomic_file`), making its parent dirs, with
    permissions `mode` (0644: blobs and state are for every reader). StoreError naming
    `path` on failure. `durable=False` skips the fsync: for state that cannot outlive a
    reboot anyway (a running container's files), where a journal commit per write costs
    milliseconds."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, durable=durable, mode=mode) as f:
            f.write(data)
    except OSError as exc:
        raise_disk(exc, f"writing {path}")


def publish_dir(tree: Path, final: Path) -> bool:
    """Move the finished directory `tree` to `final` in one rename: readers see all of it
    or nothing (an empty directory at `final` is replaced). False when `final` already
    holds a tree (another process published the same one first): `tree` is then removed.
    Nothing is fsynced: what is published this way is rebuilt if a crash loses it."""
    try:
        os.rename(tree, final)
    except OSError as exc:
        if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not final.is_dir():
            raise
        remove_tree(tree)
        return False
    return True


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

    import shutil

    shutil.rmtree(path, onerror=onerror)
