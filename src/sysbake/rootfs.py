"""The one way host code touches an image tree: every path resolved inside the tree's root.

An image tree (a bootstrap, an overlay mount of a build step, a container's rootfs) holds
files that somebody else wrote: its symlinks may point at host paths (`/var/log ->
/etc`), its `..` may climb. Host code never opens such a path with the host's view.
A `Root` holds a file descriptor of the tree's top and lets the kernel resolve each path
with openat2(2) and RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS: absolute symlinks and `..`
stay inside the tree, exactly as a process chrooted there would see them, and /proc's
magic links are refused. Operations that name a last component (unlink, mkdir, symlink,
chown, readlink) act on that name inside its resolved parent directory and never follow
it; reads and writes of file contents follow it (inside the root) but refuse anything
that is not a regular file, so a device node of the image is never opened.

Paths are strings relative to the root; a leading "/" means the same thing.
"""

from __future__ import annotations

import ctypes
import errno
import fnmatch
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from sysbake.errors import SysbakeError

_SYS_OPENAT2 = 437  # the same number on every architecture Debian builds for
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
_MAX_HOPS = 40  # symlinks followed in one resolution, as the kernel allows


class _Missing(OSError):
    """What resolving a path that leads nowhere raises: it does not exist, a component
    is not a directory, or its symlinks loop (as a process inside the image would see)."""


class ImageTreeError(SysbakeError):
    """A path inside an image tree is not what host code may act on."""


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def _openat2(dirfd: int, path: str, flags: int, mode: int = 0) -> int:
    how = _OpenHow(
        flags | os.O_CLOEXEC,
        mode if flags & os.O_CREAT else 0,
        _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS,
    )
    while True:
        fd = _syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(dirfd),
            ctypes.c_char_p(os.fsencode(path or ".")),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        )
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err == errno.ENOSYS:
            raise ImageTreeError(
                "this kernel has no openat2(2) (Linux 5.6 or newer is needed "
                "to resolve paths inside image trees safely)"
            )
        kind = _Missing if err in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP) else OSError
        raise kind(err, os.strerror(err), path)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


def kind_name(mode: int) -> str:
    """What a stat mode is, for a message: "a directory", "a symlink", ..., "a regular file"."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a regular file"


class Root:
    """An image tree opened for host-side work (a context manager: closes its descriptor)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    def __enter__(self) -> Root:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # -- resolution --------------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """A descriptor of `path` resolved inside the root (add O_NOFOLLOW to not follow
        a last-component symlink)."""
        return _openat2(self.fd, path.lstrip("/"), flags, mode)

    def _parent(self, path: str) -> tuple[int, str]:
        """(descriptor of the parent dir resolved inside the root, last name): the caller
        closes the descriptor. The root itself has no parent."""
        parts = _parts(path)
        if not parts or parts[-1] == "..":
            raise ImageTreeError(f"image path {path!r}: names no entry of a directory")
        return self.open("/".join(parts[:-1]), os.O_PATH | os.O_DIRECTORY), parts[-1]

    def lstat(self, path: str) -> os.stat_result | None:
        """The entry `path` itself (a last symlink not followed), or None if missing."""
        if not _parts(path):
            return os.stat(self.fd)
        try:
            fd, name = self._parent(path)
        except _Missing:
            return None
        try:
            return os.stat(name, dir_fd=fd, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            return None
        finally:
            os.close(fd)

    def stat(self, path: str) -> os.stat_result | None:
        """What `path` leads to inside the root, or None if it leads nowhere."""
        try:
            fd = self.open(path, os.O_PATH)
        except _Missing:
            return None
        try:
            return os.fstat(fd)
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return self.stat(path) is not None

    def is_dir(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and stat.S_ISDIR(st.st_mode)

    def is_file(self, path: str) -> bool:
        st = self.stat(path)
        return st is not None and stat.S_ISREG(st.st_mode)

    def is_symlink(self, path: str) -> bool:
        st = self.lstat(path)
        return st is not None and stat.S_ISLNK(st.st_mode)

    def readlink(self, path: str) -> str | None:
        """The target of the symlink `path`, or None if it is not a symlink."""
        if not self.is_symlink(path):
            return None
        fd, name = self._parent(path)
        try:
            return os.readlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def resolve(self, path: str) -> str:
        """`path` with every symlink followed inside the root, relative to it ("" for the
        root). Components that do not exist (yet) are kept as written."""
        done: list[str] = []
        todo = _parts(path)
        hops = 0
        while todo:
            part = todo.pop(0)
            if part == "..":
                if done:
                    done.pop()
                continue
            link = self.readlink("/".join([*done, part]))
            if link is None:
                done.append(part)
                continue
            hops += 1
            if hops > _MAX_HOPS:
                raise ImageTreeError(
                    f"image path /{path.lstrip('/')}: too many levels of symbolic links"
                )
            if link.startswith("/"):
                done = []
            todo = _parts(link) + todo
        return "/".join(done)

    # -- contents ----------------------------------------------------------------------

    def _open_regular(self, path: str, flags: int) -> int:
        """`path` opened with `flags`, refused (before opening it for I/O) unless it is a
        regular file: a device or FIFO of the image is never opened."""
        probe = self.open(path, os.O_PATH)
        try:
            before = os.fstat(probe)
        finally:
            os.close(probe)
        if not stat.S_ISREG(before.st_mode):
            raise ImageTreeError(
                f"image path /{path.lstrip('/')}: expected a regular file, "
                f"found {kind_name(before.st_mode)}"
            )
        fd = self.open(path, flags | os.O_NONBLOCK)
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            os.close(fd)
            raise ImageTreeError(f"image path /{path.lstrip('/')}: changed while opened")
        return fd

    def read_bytes(self, path: str) -> bytes:
        fd = self._open_regular(path, os.O_RDONLY)
        with os.fdopen(fd, "rb") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes, mode: int | None = None) -> None:
        """Write `data` to the regular file `path` (created if missing, with `mode`, 0644
        by default; an existing file keeps its mode unless `mode` is given)."""
        if self.stat(path) is None:
            fd = self.open(
                self.resolve(path),
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW,
                0o644 if mode is None else mode,
            )
        else:
            fd = self._open_regular(path, os.O_WRONLY | os.O_TRUNC)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            if mode is not None:
                os.fchmod(f.fileno(), mode)

    # -- names -------------------------------------------------------------------------

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        """`mkdir -p` inside the root: missing directories are created, existing ones
        (or symlinks to directories inside the root) kept; anything else is an error."""
        parts = _parts(self.resolve(path))
        for n in range(1, len(parts) + 1):
            here = "/".join(parts[:n])
            st = self.lstat(here)
            if st is None:
                fd, name = self._parent(here)
                try:
                    os.mkdir(name, mode, dir_fd=fd)
                finally:
                    os.close(fd)
            elif not stat.S_ISDIR(st.st_mode):
                raise ImageTreeError(
                    f"image path /{here}: expected a directory, found {kind_name(st.st_mode)}"
                )

    def symlink(self, target: str, path: str) -> None:
        """Make `path` a symlink to `target`, replacing whatever is there (a tree too)."""
        fd, name = self._parent(path)
        try:
            st = _lstat_at(fd, name)
            if st is not None:
                if stat.S_ISLNK(st.st_mode) and os.readlink(name, dir_fd=fd) == target:
                    return
                _remove_at(fd, name, st)
            os.symlink(target, name, dir_fd=fd)
        finally:
            os.close(fd)

    def unlink(self, path: str) -> None:
        """Remove the non-directory `path` (a symlink itself, not its target); missing is fine."""
        try:
            fd, name = self._parent(path)
        except _Missing:
            return
        try:
            os.unlink(name, dir_fd=fd)
        except FileNotFoundError:
            pass
        finally:
            os.close(fd)

    def remove(self, path: str) -> None:
        """Remove `path` and, if it is a directory (not a symlink to one), all it holds.
        Missing is fine."""
        try:
            fd, name = self._parent(path)
        except _Missing:
            return
        try:
            st = _lstat_at(fd, name)
            if st is not None:
                _remove_at(fd, name, st)
        finally:
            os.close(fd)

    def clear_dir(self, path: str, keep: tuple[str, ...] = ()) -> None:
        """Remove everything in the directory `path` but the names in `keep`."""
        try:
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except _Missing:
            return
        try:
            for name in os.listdir(fd):
                st = _lstat_at(fd, name)
                if name not in keep and st is not None:
                    _remove_at(fd, name, st)
        finally:
            os.close(fd)

    def listdir(self, path: str) -> list[str]:
        """The names in the directory `path` ([] if it is missing or not a directory)."""
        try:
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except _Missing:
            return []
        try:
            return os.listdir(fd)
        finally:
            os.close(fd)

    def walk(self, path: str) -> Iterator[tuple[str, list[str], list[str], int]]:
        """Walk the directory `path` top-down, never through a symlink: (dir relative to
        the root, names of its real subdirectories, names of everything else, a
        descriptor of the dir, valid until the next step). Pruning the names of
        subdirectories skips them, as with os.walk."""
        try:
            fd = self.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except _Missing:
            return
        yield from _walk_fd(fd, self.resolve(path))

    def glob(self, pattern: str) -> list[str]:
        """The paths matching a shell pattern inside the root (`*`, `?`, `[...]` per
        component; names starting with "." only matched by a pattern starting with
        one), sorted, relative to the root."""
        found = [""]
        for part in _parts(pattern):
            nxt: list[str] = []
            for base in found:
                prefix = f"{base}/" if base else ""
                if not any(c in part for c in "*?["):
                    if self.lstat(prefix + part) is not None:
                        nxt.append(prefix + part)
                    continue
                for name in self.listdir(base):
                    if (not name.startswith(".") or part.startswith(".")) and fnmatch.fnmatchcase(
                        name, part
                    ):
                        nxt.append(prefix + name)
            found = nxt
        return sorted(p for p in found if p)

    def copy_in(self, source: Path, dest: str, *, keep_owner: bool = False) -> list[str]:
        """Copy the host file or tree `source` (followed if it is itself a symlink: the
        caller named it) to `dest` inside the root, as docker's COPY does: below `source`
        symlinks are copied as symlinks, never followed; modes and mtimes are kept,
        owners only with `keep_owner` (else root's). A directory merges into an existing
        one (`dest` resolved inside the root); other entries replace what is there.
        Returns the paths written, relative to the root (`dest` itself when `source` is
        a file)."""
        if not os.path.isdir(source):
            target = self.resolve(dest)
            self.mkdir(os.path.dirname(target))
            self._copy_entry(source, target, os.stat(source), keep_owner)
            return [target]
        self.mkdir(dest)
        top = self.resolve(dest)
        written: list[str] = []
        pending = [(source, top)]
        while pending:
            src_dir, dest_dir = pending.pop()
            with os.scandir(src_dir) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                target = f"{dest_dir}/{entry.name}" if dest_dir else entry.name
                st = entry.stat(follow_symlinks=False)
                self._copy_entry(Path(entry.path), target, st, keep_owner)
                written.append(target)
                if stat.S_ISDIR(st.st_mode):
                    pending.append((Path(entry.path), target))
        return written

    def _copy_entry(self, src: Path, target: str, st: os.stat_result, keep_owner: bool) -> None:
        fd, name = self._parent(target)
        try:
            old = _lstat_at(fd, name)
            if stat.S_ISDIR(st.st_mode):
                if old is None or not stat.S_ISDIR(old.st_mode):
                    if old is not None:
                        _remove_at(fd, name, old)
                    os.mkdir(name, 0o700, dir_fd=fd)
                self._set_meta(fd, name, st, keep_owner)
                return
            if old is not None:
                if stat.S_ISDIR(old.st_mode):
                    raise ImageTreeError(
                        f"image path /{target}: a directory, not replaced by "
                        f"{src} ({kind_name(st.st_mode)})"
                    )
                os.unlink(name, dir_fd=fd)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), name, dir_fd=fd)
            elif stat.S_ISREG(st.st_mode):
                _copy_data(src, fd, name)
            else:
                raise ImageTreeError(
                    f"{src}: {kind_name(st.st_mode)} is not copied into an image "
                    "(only files, directories and symlinks)"
                )
            self._set_meta(fd, name, st, keep_owner)
        finally:
            os.close(fd)

    @staticmethod
    def _set_meta(dirfd: int, name: str, st: os.stat_result, keep_owner: bool) -> None:
        uid, gid = (st.st_uid, st.st_gid) if keep_owner else (0, 0)
        os.chown(name, uid, gid, dir_fd=dirfd, follow_symlinks=False)
        if not stat.S_ISLNK(st.st_mode):
            os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dirfd)
        os.utime(name, ns=(st.st_mtime_ns, st.st_mtime_ns), dir_fd=dirfd, follow_symlinks=False)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """chown of `path` itself (a symlink's own owner, not its target's)."""
        fd, name = self._parent(path)
        try:
            os.chown(name, uid, gid, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)

    def chmod(self, path: str, mode: int) -> None:
        """chmod of `path` itself; a symlink has no mode of its own and is left as it is."""
        fd, name = self._parent(path)
        try:
            st = _lstat_at(fd, name)
            if st is not None and not stat.S_ISLNK(st.st_mode):
                os.chmod(name, mode, dir_fd=fd)
        finally:
            os.close(fd)

    def utime(self, path: str, ns: tuple[int, int]) -> None:
        fd, name = self._parent(path)
        try:
            os.utime(name, ns=ns, dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)


def _lstat_at(dirfd: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def _remove_at(dirfd: int, name: str, st: os.stat_result) -> None:
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dirfd)
        return
    fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        os.fchmod(fd, stat.S_IMODE(st.st_mode) | 0o700)  # a read-only dir of the image
        for child in os.listdir(fd):
            cst = _lstat_at(fd, child)
            if cst is not None:
                _remove_at(fd, child, cst)
    finally:
        os.close(fd)
    os.rmdir(name, dir_fd=dirfd)


def _walk_fd(fd: int, rel: str) -> Iterator[tuple[str, list[str], list[str], int]]:
    try:
        dirs: list[str] = []
        other: list[str] = []
        with os.scandir(fd) as it:
            for entry in it:
                (dirs if entry.is_dir(follow_symlinks=False) else other).append(entry.name)
        yield rel, dirs, other, fd
        for name in dirs:
            try:
                sub = os.open(
                    name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd
                )
            except OSError:  # gone, or a symlink swapped in: not walked
                continue
            yield from _walk_fd(sub, f"{rel}/{name}" if rel else name)
    finally:
        os.close(fd)


def _copy_data(src: Path, dirfd: int, name: str) -> None:
    """Copy the regular file `src` (not followed) to a new file `name` of `dirfd`."""
    fin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fin).st_mode):
            raise ImageTreeError(f"{src}: changed while copied (no longer a regular file)")
        fout = os.open(
            name,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=dirfd,
        )
        try:
            while os.copy_file_range(fin, fout, 1 << 30):
                pass
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                raise
            while chunk := os.read(fin, 1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fout, view) :]
        finally:
            os.close(fout)
    finally:
        os.close(fin)
