"""Owner locks: containers that live only as long as the sysbake process that made them
(a build step's, `sysbake test`'s), so that one whose owner was killed (kill -9
included) is an orphan any later command finds and removes (`runtime.reap_orphans`).

The owner holds an exclusive flock on `containers/<name>.owner`, which names its pid,
from before the container exists until after it is removed; the kernel drops the lock
however the owner dies. The file appears under that name only once locked (made under a
hidden temporary name, then linked), so a free lock never belongs to a live owner.
Imported by every command line (the CLI's reap check): os and fcntl only.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

from sysbake.errors import RuntimeFailure

SUFFIX = ".owner"
_PARTIAL = f"{SUFFIX}-"  # in the hidden name an owner file has before it is locked


class Orphan(NamedTuple):
    """A container whose owner is gone: its name, the owner's pid, its image, and what
    kept it from being removed ("" once removed)."""

    name: str
    owner_pid: int | None
    image: str = ""
    error: str = ""

    def describe(self) -> str:
        """'orphaned: owner pid 1234 gone' (and why it is still there, if it is)."""
        pid = "" if self.owner_pid is None else f" pid {self.owner_pid}"
        text = f"orphaned: owner{pid} gone"
        return f"{text}; not removed: {self.error}" if self.error else text


def owner_file(containers_dir: Path, name: str) -> Path:
    return containers_dir / f"{name}{SUFFIX}"


class OwnerLock:
    """The owner lock of container `name`, held from `acquire` until `release` (or the
    end of a `with` block), or until this process dies."""

    def __init__(self, containers_dir: Path, name: str) -> None:
        self.containers_dir = containers_dir
        self.name = name
        self._fd = -1

    def acquire(self) -> None:
        """Take the lock (the containers dir is made if missing, never its parents)."""
        if self._fd >= 0:
            return
        self.containers_dir.mkdir(exist_ok=True)
        for attempt in range(3):
            try:
                self._fd = self._link_locked()
                return
            except FileNotFoundError:
                # A reaper took the hidden file for a dead owner's before we locked it.
                if attempt == 2:
                    raise

    def _link_locked(self) -> int:
        final = owner_file(self.containers_dir, self.name)
        partial = self.containers_dir / f".{self.name}{_PARTIAL}{os.getpid()}"
        fd = os.open(
            partial, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.link(partial, final)  # fails if the name is taken: never another's lock
        except FileExistsError:
            os.close(fd)
            raise RuntimeFailure(
                f"container {self.name!r} already has an owner ({final})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        finally:
            partial.unlink(missing_ok=True)
        return fd

    def release(self) -> None:
        """Give the container up (it stays, if it still exists, as a user's container):
        the file goes before the lock. Idempotent."""
        fd, self._fd = self._fd, -1
        if fd >= 0:
            owner_file(self.containers_dir, self.name).unlink(missing_ok=True)
            os.close(fd)

    def __enter__(self) -> OwnerLock:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()


def owned(containers_dir: Path, name: str) -> OwnerLock:
    """An acquired OwnerLock of container `name`, for a `with` block."""
    lock = OwnerLock(containers_dir, name)
    lock.acquire()
    return lock


def _names(containers_dir: Path) -> list[str]:
    try:
        return os.listdir(containers_dir)
    except OSError:  # no store yet, or not ours to read
        return []


def _take_if_free(path: Path) -> int | None:
    """A descriptor of `path` with its lock taken if nobody holds it and the file is
    still there (not released meanwhile); None otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink > 0:
            return fd
    except OSError:  # held: its owner lives
        pass
    os.close(fd)
    return None


def any_orphan(containers_dir: Path) -> bool:
    """Whether a container's owner is gone: a listing and a non-blocking flock per
    owner file, all a command pays when there is nothing to reap."""
    for name in _names(containers_dir):
        if name.endswith(SUFFIX) or (name.startswith(".") and _PARTIAL in name):
            fd = _take_if_free(containers_dir / name)
            if fd is not None:
                os.close(fd)
                return True
    return False


def claim_orphans(containers_dir: Path) -> Iterator[Orphan]:
    """Each container whose owner is gone, its owner lock held by us until the next one
    is asked for: the caller removes it, then `forget`s it (a failed removal keeps the
    owner file, so that the next command tries again)."""
    for name in sorted(_names(containers_dir)):
        path = containers_dir / name
        if name.startswith(".") and _PARTIAL in name:  # its owner died before linking it
            fd = _take_if_free(path)
            if fd is not None:
                path.unlink(missing_ok=True)
                os.close(fd)
            continue
        if not name.endswith(SUFFIX):
            continue
        fd = _take_if_free(path)
        if fd is None:
            continue
        try:
            yield Orphan(name.removesuffix(SUFFIX), _pid(fd))
        finally:
            os.close(fd)


def forget(containers_dir: Path, name: str) -> None:
    """Drop the owner file of a removed orphan (called while `claim_orphans` holds it)."""
    owner_file(containers_dir, name).unlink(missing_ok=True)


def owner_pid(containers_dir: Path, name: str) -> int | None:
    """The pid an owner file names; None when the container has no owner."""
    try:
        fd = os.open(owner_file(containers_dir, name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _pid(fd)
    finally:
        os.close(fd)


def _pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
