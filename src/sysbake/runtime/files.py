"""Files between the host and a container (`sysbake cp`), and what a container or a layer
changed (`sysbake diff`).

The container side is always a sysbake.rootfs.Root: a running container's file system as
its processes see it (through PID 1's root, its tmpfs and bind mounts included), else its
overlay mounted for the copy. Every path in it resolves inside it, so its symlinks never
lead to host files. The host side is the path the user named: it is followed as named,
but nothing below it is: what a copy writes under it never passes through a symlink that
is there, and what comes out of a container is never a device node nor setuid/setgid.

Where a copy lands follows `docker cp` (`target`): a file onto a missing path is that path,
into a directory it keeps its name; a directory onto a missing path becomes it, into an
existing directory it goes with its name, or only its contents when the source ends in
"/.".
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from sysbake import log
from sysbake.errors import SysbakeError
from sysbake.rootfs import ImageTreeError, Root, kind_name

_STRIPPED = stat.S_ISUID | stat.S_ISGID  # never carried out of a container


class CopyError(SysbakeError):
    """A copy that cannot be made as asked (a missing source, a directory onto a file)."""


class Target(NamedTuple):
    """Where a copy goes: `path`, and whether a directory source's contents go into it
    (else the source itself becomes `path`)."""

    path: str
    contents: bool


def target(source: str, source_is_dir: bool, dest: str, dest_kind: str | None) -> Target:
    """Where `source` (a directory or not) lands when copied to `dest`, whose kind is
    "dir", "file" or None (missing), as `docker cp` decides. CopyError otherwise."""
    name = PurePosixPath(source.rstrip("/") or "/").name
    if dest_kind == "dir":
        into = f"{dest.rstrip('/')}/{name}" if name and name != "." else dest
        if not source_is_dir:
            return Target(into, False)
        whole = not (source.endswith("/.") or source in (".", "/") or not name)
        return Target(into if whole else dest, True)
    if source_is_dir:
        if dest_kind == "file":
            raise CopyError(f"cannot copy the directory {source} onto the file {dest}")
        return Target(dest, True)
    if dest_kind is None and dest.endswith("/"):
        raise CopyError(f"{dest}: no such directory (a file is copied into an existing one)")
    return Target(dest, False)


def _kind(st: os.stat_result | None) -> str | None:
    if st is None:
        return None
    return "dir" if stat.S_ISDIR(st.st_mode) else "file"


# -- host to container -------------------------------------------------------------------------


def copy_in(
    root: Root, source: Path, dest: str, *, follow: bool = False, keep_owner: bool = False
) -> str:
    """Copy the host path `source` to `dest` in the container `root` (`docker cp SRC
    CONTAINER:DEST`); the path written, inside the container. A symlink `source` is
    copied as a symlink unless `follow`; owners become root's unless `keep_owner`."""
    try:
        st = os.stat(source) if follow else os.lstat(source)
    except FileNotFoundError:
        raise CopyError(f"{source}: no such file or directory") from None
    if follow:  # the user named it: followed on the host, as `cp -L` does
        source = Path(os.path.realpath(source))
    where = target(str(source), stat.S_ISDIR(st.st_mode), dest, _kind(root.stat(dest)))
    parent = os.path.dirname(root.resolve(where.path))
    if not root.is_dir(parent):
        raise CopyError(f"{os.path.dirname(where.path) or '/'}: no such directory in the container")
    if stat.S_ISLNK(st.st_mode):
        root.symlink(os.readlink(source), where.path)
    else:
        root.copy_in(source, where.path, keep_owner=keep_owner)
    return "/" + _parent_resolved(root, where.path)


# -- container to host -------------------------------------------------------------------------


def copy_out(root: Root, source: str, dest: Path, *, follow: bool = False) -> Path:
    """Copy `source` of the container `root` to the host path `dest` (`docker cp
    CONTAINER:SRC DEST`); the host path written. A symlink is copied as a symlink (its
    target text, never followed on the host) unless `follow` names the last one, which
    is then followed inside the container."""
    st = root.stat(source) if follow else root.lstat(source)
    if st is None:
        raise CopyError(f"{source}: no such file or directory in the container")
    try:
        dest_kind = _kind(os.stat(dest))
    except FileNotFoundError:
        dest_kind = None
    where = target(source, stat.S_ISDIR(st.st_mode), str(dest), dest_kind)
    path = Path(where.path)
    if stat.S_ISDIR(st.st_mode):
        top = _host_top(path)
        try:
            _copy_tree_out(root, root.resolve(source), top)
        finally:
            os.close(top)
        return path
    src = root.resolve(source) if follow else _parent_resolved(root, source)
    parent = _open_host(path.parent)
    try:
        _copy_entry_out(root, src, parent, path.name)
    finally:
        os.close(parent)
    return path


def _open_host(path: Path) -> int:
    """The host directory `path` (as named: followed), opened."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CopyError(f"{path}: {exc.strerror} (expected an existing directory)") from None


def _host_top(path: Path) -> int:
    """The host directory a tree is copied into: `path`, made if missing (its parent must
    exist)."""
    if not os.path.isdir(path):
        parent = _open_host(path.parent)
        try:
            os.close(_host_dir(parent, path.name))
        finally:
            os.close(parent)
    return _open_host(path)


def _parent_resolved(root: Root, path: str) -> str:
    # The last component kept as written: a symlink is copied, not followed.
    parts = PurePosixPath("/" + path.lstrip("/"))
    parent = root.resolve(str(parts.parent))
    return f"{parent}/{parts.name}" if parent else parts.name


def _copy_entry_out(root: Root, src: str, dirfd: int, name: str) -> None:
    """Copy the non-directory `src` of the container to `name` in the host dir `dirfd`."""
    parent, _, base = src.rpartition("/")
    fd = root.open(parent, os.O_PATH | os.O_DIRECTORY)
    try:
        st = os.stat(base, dir_fd=fd, follow_symlinks=False)
        _write_out(fd, base, st, dirfd, name, "/" + src)
    finally:
        os.close(fd)


def _copy_tree_out(root: Root, src: str, top: int) -> None:
    """Copy what the container directory `src` (resolved) holds into the host dir `top`,
    merged with what is there."""
    modes: list[tuple[tuple[str, ...], os.stat_result]] = []
    for rel, dirs, others, fd in root.walk(src):
        parts = _relative(rel, src)
        host = _open_below(top, parts)
        try:
            modes.append((parts, os.stat(fd)))
            for sub in dirs:
                os.close(_host_dir(host, sub))
            for other in others:
                with contextlib.suppress(FileNotFoundError):  # gone meanwhile
                    st = os.stat(other, dir_fd=fd, follow_symlinks=False)
                    _write_out(fd, other, st, host, other, f"/{rel}/{other}")
        finally:
            os.close(host)
    # Modes and times last: writing into a directory changes its mtime.
    for parts, st in reversed(modes):
        host = _open_below(top, parts)
        try:
            os.chmod(host, stat.S_IMODE(st.st_mode) & ~_STRIPPED)
            os.utime(host, ns=(st.st_atime_ns, st.st_mtime_ns))
        finally:
            os.close(host)


def _relative(rel: str, top: str) -> tuple[str, ...]:
    inner = rel[len(top) :] if top else rel
    return tuple(p for p in inner.split("/") if p)


def _host_dir(dirfd: int, name: str) -> int:
    """A descriptor of the directory `name` of the host dir `dirfd`, made if missing;
    a symlink or anything else there is refused, never followed."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, 0o700, dir_fd=dirfd)
    try:
        return os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd
        )
    except (NotADirectoryError, OSError) as exc:
        raise CopyError(f"{name}: cannot copy a directory onto it ({exc.strerror})") from None


def _open_below(top: int, parts: Sequence[str]) -> int:
    fd = os.dup(top)
    for part in parts:
        try:
            nxt = os.open(
                part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
            )
        finally:
            os.close(fd)
        fd = nxt
    return fd


def _write_out(
    src_dir: int, name: str, st: os.stat_result, dirfd: int, dest: str, shown: str
) -> None:
    """Write the container entry `name` of `src_dir` (a file or symlink) as `dest` of the
    host dir `dirfd`, replacing a non-directory there; other kinds are skipped."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        log.warn(f"{shown}: {kind_name(st.st_mode)} not copied (only files, dirs and symlinks)")
        return
    with contextlib.suppress(FileNotFoundError):
        old = os.stat(dest, dir_fd=dirfd, follow_symlinks=False)
        if stat.S_ISDIR(old.st_mode):
            raise CopyError(f"{dest}: a directory, not replaced by {shown}")
        os.unlink(dest, dir_fd=dirfd)
    if stat.S_ISLNK(st.st_mode):
        os.symlink(os.readlink(name, dir_fd=src_dir), dest, dir_fd=dirfd)
    else:
        _copy_file_out(src_dir, name, dirfd, dest, st)
    os.utime(dest, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dirfd, follow_symlinks=False)


def _copy_file_out(src_dir: int, name: str, dirfd: int, dest: str, st: os.stat_result) -> None:
    fin = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=src_dir)
    try:
        if not stat.S_ISREG(os.fstat(fin).st_mode):
            raise ImageTreeError(f"{name}: changed while copied (no longer a regular file)")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fout = os.open(dest, flags, 0o600, dir_fd=dirfd)
        try:
            while os.sendfile(fout, fin, None, 1 << 30):
                pass
            os.fchmod(fout, stat.S_IMODE(st.st_mode) & ~_STRIPPED)
        finally:
            os.close(fout)
    finally:
        os.close(fin)


# -- changes -------------------------------------------------------------------------------------


class Change(NamedTuple):
    """One change as `docker diff` prints it: "A" added, "C" changed, "D" deleted."""

    kind: str
    path: str

    def __str__(self) -> str:
        return f"{self.kind} {self.path}"


def changes(upper: Path, lowers: Sequence[Path]) -> list[Change]:
    """What the overlay upper dir (or layer tree) `upper` changes over the layer trees
    `lowers` (bottom to top), sorted by path: whiteouts are deletions, entries the lowers
    hold are changes, the rest additions."""
    found: list[Change] = []
    with contextlib.ExitStack() as stack:
        below = [stack.enter_context(Root(p)) for p in reversed(lowers)]
        top = stack.enter_context(Root(upper))
        for rel, dirs, others, fd in top.walk(""):
            for name in [*dirs, *others]:
                path = f"{rel}/{name}" if rel else name
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                if _is_whiteout(st):
                    found.append(Change("D", "/" + path))
                else:
                    found.append(Change("C" if _present(below, path) else "A", "/" + path))
    return sorted(found, key=lambda c: c.path)


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _present(lowers: Sequence[Root], path: str) -> bool:
    """Whether `path` is in the merged view of `lowers` (top first)."""
    for lower in lowers:
        st = lower.lstat(path)
        if st is not None:
            return not _is_whiteout(st)
    return False
