"""Layer tarballs: deterministic writing, overlayfs diffs, safe extraction and flattening.

Tars are PAX, names relative without "./" (`etc/`, `etc/passwd`), numeric owners only,
mtimes clamped to a SOURCE_DATE_EPOCH-style `mtime`, no atime/ctime, xattrs as
`SCHILY.xattr.*` records minus host- or mount-specific ones (SELinux labels, NFSv4 ACLs,
overlayfs' own). Entries come in bytewise name order, except that in a diff the whiteouts of
a directory's children directly follow the directory (the image spec asks for whiteouts
before their siblings). The archive ends with two zero blocks and no record padding, as
Go's archive/tar (hence docker) writes it.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sysbake.compress import Readable, Writable
from sysbake.errors import LayerError
from sysbake.layers_apply import Extractor, Flattener, LayerOpener
from sysbake.layers_tar import (
    OVERLAY_XATTRS,
    WH_OPAQUE,
    WH_PREFIX,
    Entry,
    Meta,
    TarWriter,
    clamp,
    clean_name,
    fsencode,
    is_opaque,
    join,
    keep_xattr,
    read_entries,
    read_xattrs,
    write_all,
)

__all__ = ["HashingWriter", "LayerOpener", "clamp_mtimes", "clean_name", "extract", "flatten",
           "keep_xattr", "write_overlay_diff", "write_tree_tar"]

# overlayfs features whose upper dir alone does not describe the change.
_UNSUPPORTED_OVERLAY = ("redirect", "metacopy")


class HashingWriter:
    """Forwards writes to `inner` while computing their sha256 digest and byte count."""

    def __init__(self, inner: Writable) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes, /) -> int:
        self._hash.update(data)
        self.size += len(data)
        write_all(self._inner, data)
        return len(data)

    @property
    def digest(self) -> str:
        """'sha256:<hex>' of everything written so far."""
        return "sha256:" + self._hash.hexdigest()


def write_tree_tar(
    root: Path,
    out: Writable,
    *,
    mtime: int | None,
    exclude: Callable[[str], bool] | None = None,
) -> None:
    """Write the tree under `root` (not root itself) to `out` as a deterministic tar.

    `exclude(relpath)` (no "./", no trailing "/") drops an entry, and a directory's subtree.
    """
    _Archiver(Path(root), TarWriter(out), mtime, exclude, diff=False).run()


def clamp_mtimes(root: Path, limit: int) -> None:
    """Set every mtime under `root` (root included) that is later than `limit` to `limit`,
    symlinks themselves included: the tree then holds what a layer clamped to `limit` holds."""
    for top, dirs, files in os.walk(root, topdown=False):
        for name in (*files, *dirs):
            _clamp_one(os.path.join(top, name), limit)
    _clamp_one(os.fspath(root), limit)


def _clamp_one(path: str, limit: int) -> None:
    st = os.lstat(path)
    if st.st_mtime > limit:
        os.utime(path, ns=(st.st_atime_ns, limit * 1_000_000_000), follow_symlinks=False)


def write_overlay_diff(upper: Path, out: Writable, *, mtime: int | None) -> None:
    """Write an overlayfs upper dir as an OCI diff layer (whiteouts, opaque markers).

    The overlay must be mounted with redirect_dir=off and metacopy=off: otherwise the upper
    dir alone does not hold the change, and this raises LayerError.
    """
    _Archiver(Path(upper), TarWriter(out), mtime, None, diff=True).run()


def extract(src: Readable, dest: Path, *, overlay: bool, allow_devices: bool = True) -> None:
    """Apply the uncompressed layer tar `src` onto `dest`, never writing outside it.

    overlay=False applies whiteouts to what `dest` holds; overlay=True writes them in
    overlayfs form (0/0 char devices, trusted.overlay.opaque) for a lowerdir. A leading "/"
    is stripped from names (as docker does); "..", writing through a symlink, hardlinks
    leaving `dest`, and devices unless `allow_devices` raise LayerError naming the entry.
    """
    extractor = Extractor(Path(dest), overlay=overlay, allow_devices=allow_devices)
    try:
        for info, data in read_entries(src):
            extractor.entry(info, data)
    except tarfile.TarError as exc:
        raise LayerError(f"malformed layer tar for {dest}: {exc}") from exc
    extractor.finish()


def flatten(layers: Sequence[LayerOpener], out: Writable, *, mtime: int | None) -> None:
    """Merge uncompressed layer tars (bottom to top) into one rootfs tar, streaming.

    Layers are read top-down and an entry is written unless an upper layer replaced or
    deleted it, so memory grows with the number of paths only. A hardlink whose target an
    upper layer replaced gets the target's content (that layer is then read twice).
    """
    try:
        Flattener(TarWriter(out), mtime).run(layers)
    except tarfile.TarError as exc:
        raise LayerError(f"malformed layer tar: {exc}") from exc


class _Archiver:
    """Walks a tree in canonical order and writes its entries."""

    def __init__(self, root: Path, writer: TarWriter, mtime: int | None,
                 exclude: Callable[[str], bool] | None, *, diff: bool) -> None:
        self.root = os.fspath(root)
        self.writer = writer
        self.mtime = mtime
        self.exclude = exclude
        self.diff = diff
        self.links: dict[tuple[int, int], str] = {}

    def run(self) -> None:
        if not os.path.isdir(self.root):
            raise LayerError(f"cannot archive {self.root}: not a directory")
        if self.diff and is_opaque(read_xattrs(self.root)):
            self._whiteout(WH_OPAQUE, os.lstat(self.root))
        stack = [self._children("")]
        while stack:
            item = next(stack[-1], None)
            if item is None:
                stack.pop()
            elif self.exclude is None or not self.exclude(item[0]):
                try:
                    descend = self._add(*item)
                except OSError as exc:
                    raise LayerError(f"cannot archive {self.root}/{item[0]}: "
                                     f"{exc.strerror or exc}") from exc
                if descend:
                    stack.append(self._children(item[0]))
        self.writer.close()

    def _children(self, rel: str) -> Iterator[tuple[str, os.stat_result]]:
        base = os.path.join(self.root, rel)
        try:
            with os.scandir(base) as it:
                found = [(entry.name, entry.stat(follow_symlinks=False)) for entry in it]
        except OSError as exc:
            raise LayerError(f"cannot read directory {base}: {exc.strerror}") from exc
        keyed = []
        for name, st in found:
            if self.diff and self._is_whiteout(os.path.join(base, name), st):
                key = (0, fsencode(WH_PREFIX + name))
            else:
                # In tar names "a.b" < "a/x": a directory sorts as its name plus "/".
                key = (1, fsencode(name + "/" if stat.S_ISDIR(st.st_mode) else name))
            keyed.append((key, name, st))
        keyed.sort(key=lambda k: k[0])
        return ((join(rel, name), st) for _, name, st in keyed)

    @staticmethod
    def _is_whiteout(path: str, st: os.stat_result) -> bool:
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            return True
        # Kernels >= 6.7 may also mark whiteouts as empty files with an xattr.
        return stat.S_ISREG(st.st_mode) and st.st_size == 0 and any(
            name.endswith("overlay.whiteout") for name in read_xattrs(path))

    def _meta(self, st: os.stat_result, xattrs: dict[str, bytes] | None = None) -> Meta:
        kept = tuple(sorted((k, v) for k, v in xattrs.items() if keep_xattr(k))) \
            if xattrs else ()
        return Meta(stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                     clamp(st.st_mtime, self.mtime), kept)

    def _whiteout(self, rel: str, st: os.stat_result) -> None:
        self.writer.entry(Entry(rel, tarfile.REGTYPE, self._meta(st)))

    def _add(self, rel: str, st: os.stat_result) -> bool:
        """Write one entry; True when it is a directory to descend into."""
        path = f"{self.root}/{rel}"
        mode = st.st_mode
        if self.diff and self._is_whiteout(path, st):
            head, _, base = rel.rpartition("/")
            self._whiteout(join(head, WH_PREFIX + base), st)
            return False
        if stat.S_ISSOCK(mode):
            return False
        xattrs = read_xattrs(path)
        if self.diff and any(k.startswith(OVERLAY_XATTRS) and k.endswith(_UNSUPPORTED_OVERLAY)
                             for k in xattrs):
            raise LayerError(f"{path}: overlayfs redirect/metacopy xattrs in the upper dir; "
                             "mount the overlay with redirect_dir=off,metacopy=off")
        meta = self._meta(st, xattrs)
        if stat.S_ISDIR(mode):
            self.writer.entry(Entry(rel, tarfile.DIRTYPE, meta))
            if self.diff and is_opaque(xattrs):
                self._whiteout(join(rel, WH_OPAQUE), st)
            return True
        if st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), rel)
            if first != rel:
                self.writer.entry(Entry(rel, tarfile.LNKTYPE, meta, linkname=first))
                return False
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self.writer.entry(Entry(rel, tarfile.REGTYPE, meta, size=st.st_size), fd)
            finally:
                os.close(fd)
        elif stat.S_ISLNK(mode):
            target = os.readlink(path)
            self.writer.entry(Entry(rel, tarfile.SYMTYPE, meta, linkname=target))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            kind = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
            self.writer.entry(Entry(rel, kind, meta, dev=dev))
        elif stat.S_ISFIFO(mode):
            self.writer.entry(Entry(rel, tarfile.FIFOTYPE, meta))
        return False

