"""Layer tarballs: deterministic writing, overlayfs diffs, safe extraction and flattening.

Tars are PAX, names relative without "./" (`etc/`, `etc/passwd`), numeric owners only,
mtimes clamped to a SOURCE_DATE_EPOCH-style `mtime`, no atime/ctime, xattrs as
`SCHILY.xattr.*` records minus host- or mount-specific ones (SELinux labels, NFSv4 ACLs,
overlayfs' own). Entries come in bytewise name order, except that in a diff the whiteouts of
a directory's children directly follow the directory (the image spec asks for whiteouts
before their siblings). The archive ends with two zero blocks and no record padding, as
Go's archive/tar (hence docker) writes it.

Reading, one check applies everywhere: EntryCheck (layers_tar) vets each entry for the
Extractor, the Flattener and validate_layer alike: what validation refuses, they refuse
too, and they add only what needs the other layers or the disk (a hardlink's target, a
lower layer's symlink). Names that are not UTF-8 are carried as surrogate escapes and
written back byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from sysbake.errors import LayerError
from sysbake.oci.compress import CHUNK, Readable, Writable
from sysbake.oci.layers.apply import Extractor, Flattener, LayerOpener
from sysbake.oci.layers.tar import (
    OVERLAY_XATTRS,
    STANDARD_DEVICES,
    WH_OPAQUE,
    WH_PREFIX,
    Entry,
    EntryCheck,
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

__all__ = [
    "STANDARD_DEVICES",
    "EntryCheck",
    "HashingWriter",
    "LayerOpener",
    "clamp_mtimes",
    "clean_name",
    "extract",
    "flatten",
    "keep_xattr",
    "validate_layer",
    "write_overlay_diff",
    "write_tree_tar",
]

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
) -> bool:
    """Write the tree under `root` (not root itself) to `out` as a deterministic tar.

    `exclude(relpath)` (no "./", no trailing "/") drops an entry, and a directory's subtree.
    True when the tar passes EntryCheck (False: it holds a device node that EntryCheck
    refuses; a directory walk gives no other reason).
    """
    return _Archiver(Path(root), TarWriter(out), mtime, exclude, diff=False).run()


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


def write_overlay_diff(upper: Path, out: Writable, *, mtime: int | None) -> bool:
    """Write an overlayfs upper dir as an OCI diff layer (whiteouts, opaque markers).

    The overlay must be mounted with redirect_dir=off and metacopy=off: otherwise the upper
    dir alone does not hold the change, and this raises LayerError. Returns what
    write_tree_tar returns.
    """
    return _Archiver(Path(upper), TarWriter(out), mtime, None, diff=True).run()


def validate_layer(
    src: Readable, what: str, *, diff_id: str | None = None, allow_devices: bool = True
) -> None:
    """Read the uncompressed layer tar `src` to its end through the EntryCheck that
    extraction and flattening apply; raise LayerError "<what>: ..." if it is not a tar,
    holds an entry they would refuse, or (given `diff_id`) does not hash to `diff_id`."""
    hashed = _HashingReader(src)
    check = EntryCheck(allow_devices=allow_devices)
    try:
        for info, _ in read_entries(hashed):
            check.entry(info)
        while hashed.read(CHUNK):  # what follows the end-of-archive blocks counts too
            pass
    except LayerError as exc:
        raise LayerError(f"{what}: {exc}") from exc
    except tarfile.TarError as exc:
        raise LayerError(f"{what}: not a valid tar ({exc})") from exc
    if diff_id is not None and hashed.digest != diff_id:
        raise LayerError(
            f"{what}: its content hashes to {hashed.digest}, not to its diff_id {diff_id}"
        )


class _HashingReader:
    """Passes reads through, hashing them (sha256)."""

    def __init__(self, inner: Readable) -> None:
        self._inner = inner
        self._hash = hashlib.sha256()

    def read(self, size: int = -1, /) -> bytes:
        data = self._inner.read(size)
        self._hash.update(data)
        return data

    @property
    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


def extract(
    src: Readable,
    dest: Path,
    *,
    overlay: bool,
    allow_devices: bool = True,
    diff_id: str | None = None,
) -> None:
    """Apply the uncompressed layer tar `src` onto `dest`, never writing outside it.

    overlay=False applies whiteouts to what `dest` holds; overlay=True writes them in
    overlayfs form (0/0 char devices, trusted.overlay.opaque) for a lowerdir. What
    EntryCheck refuses, writing through a symlink and hardlinks to what `dest` does not
    hold raise LayerError naming the entry; so does content not hashing to `diff_id`.
    """
    hashed = _HashingReader(src)
    extractor = Extractor(Path(dest), overlay=overlay, allow_devices=allow_devices)
    try:
        for info, data in read_entries(hashed):
            extractor.entry(info, data)
        while hashed.read(CHUNK):
            pass
    except tarfile.TarError as exc:
        raise LayerError(f"not a valid tar ({exc})") from exc
    extractor.finish()
    if diff_id is not None and hashed.digest != diff_id:
        raise LayerError(f"its content hashes to {hashed.digest}, not to its diff_id {diff_id}")


def flatten(
    layers: Sequence[LayerOpener], out: Writable, *, mtime: int | None, allow_devices: bool = True
) -> None:
    """Merge uncompressed layer tars (bottom to top) into one rootfs tar, streaming.

    Layers are read top-down and an entry is written unless an upper layer replaced or
    deleted it, so memory grows with the number of paths only. A hardlink whose target an
    upper layer replaced gets the target's content (that layer is then read twice). Every
    layer passes the EntryCheck; a lower layer's file or symlink where an upper layer
    writes into a directory is refused too. Errors name the layer ("layer 2 of 3: ...").
    """
    Flattener(TarWriter(out), mtime, allow_devices=allow_devices).run(layers)


class _Archiver:
    """Walks a tree in canonical order and writes its entries."""

    def __init__(
        self,
        root: Path,
        writer: TarWriter,
        mtime: int | None,
        exclude: Callable[[str], bool] | None,
        *,
        diff: bool,
    ) -> None:
        self.root = os.fspath(root)
        self.writer = writer
        self.mtime = mtime
        self.exclude = exclude
        self.diff = diff
        self.links: dict[tuple[int, int], str] = {}
        self.passes = True  # False once a device node EntryCheck refuses is written

    def run(self) -> bool:
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
                    raise LayerError(
                        f"cannot archive {self.root}/{item[0]}: {exc.strerror or exc}"
                    ) from exc
                if descend:
                    stack.append(self._children(item[0]))
        self.writer.close()
        return self.passes

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
        return (
            stat.S_ISREG(st.st_mode)
            and st.st_size == 0
            and any(name.endswith("overlay.whiteout") for name in read_xattrs(path))
        )

    def _meta(self, st: os.stat_result, xattrs: dict[str, bytes] | None = None) -> Meta:
        kept = tuple(sorted((k, v) for k, v in xattrs.items() if keep_xattr(k))) if xattrs else ()
        return Meta(
            stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, clamp(st.st_mtime, self.mtime), kept
        )

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
        if self.diff and any(
            k.startswith(OVERLAY_XATTRS) and k.endswith(_UNSUPPORTED_OVERLAY) for k in xattrs
        ):
            raise LayerError(
                f"{path}: overlayfs redirect/metacopy xattrs in the upper dir; "
                "mount the overlay with redirect_dir=off,metacopy=off"
            )
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
            self.passes &= kind == tarfile.CHRTYPE and dev in STANDARD_DEVICES
            self.writer.entry(Entry(rel, kind, meta, dev=dev))
        elif stat.S_ISFIFO(mode):
            self.writer.entry(Entry(rel, tarfile.FIFOTYPE, meta))
        return False
