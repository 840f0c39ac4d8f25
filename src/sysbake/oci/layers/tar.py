"""The tar format of layers: canonical PAX headers out, tarfile's stream reader in.

Helpers of sysbake.oci.layers.archive; see there for the format's rules.
"""

from __future__ import annotations

import errno
import os
import struct
import sys
import tarfile
from collections.abc import Iterator
from typing import NamedTuple

from sysbake.errors import LayerError
from sysbake.oci.compress import CHUNK, Readable, Writable, file_descriptor

WH_PREFIX = ".wh."
WH_META = ".wh..wh."
WH_OPAQUE = ".wh..wh..opq"
OPAQUE_XATTR = "trusted.overlay.opaque"
OVERLAY_XATTRS = ("trusted.overlay.", "user.overlay.")
_DROPPED_XATTRS = ("security.selinux", "system.nfs4_acl")
_XATTR_RECORD = "SCHILY.xattr."
_TYPES = {
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
}


def fsencode(name: str) -> bytes:
    """os.fsencode for a str, without its type checks (called ~3 times per tar entry)."""
    return name.encode(_FS_ENCODING, _FS_ERRORS)


_FS_ENCODING, _FS_ERRORS = sys.getfilesystemencoding(), sys.getfilesystemencodeerrors()


def keep_xattr(name: str) -> bool:
    """Whether an xattr belongs in a layer (not a host label, not overlayfs bookkeeping)."""
    return name not in _DROPPED_XATTRS and not name.startswith(OVERLAY_XATTRS)


def clean_name(name: str) -> str:
    """A tar member name in canonical form ("./", "//" and a trailing "/" dropped; "" for
    the root); "..", an absolute name or a NUL byte is a LayerError."""
    rel, problem = _canonical(name)
    if problem:
        raise LayerError(f"layer entry {name!r}: {problem}")
    return rel


def _canonical(name: str) -> tuple[str, str]:
    """(canonical name, "") or ("", what is wrong with `name`)."""
    if name.startswith("/"):
        return "", "absolute names are not allowed"
    if "\0" in name:
        return "", "a NUL byte is not allowed in a name"
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        return "", "'..' is not allowed in a path"
    return "/".join(parts), ""


# The pseudo devices a root file system may carry (mmdebstrap creates them in /dev): they
# grant nothing. Any other node (a disk, /dev/mem, a 0:0 overlay whiteout) is refused.
STANDARD_DEVICES = {
    (1, 3): "null",
    (1, 5): "zero",
    (1, 7): "full",
    (1, 8): "random",
    (1, 9): "urandom",
    (5, 0): "tty",
    (5, 1): "console",
    (5, 2): "ptmx",
}


class EntryCheck:
    """The one check of a layer's entries, shared by extraction, flattening and validation:
    feed it every entry of one layer in order; `entry()` returns the canonical name or
    raises LayerError naming the entry.

    Refused: unknown entry types, "..", absolute names, NUL bytes, paths through a symlink
    of the same layer, hardlinks whose target is not a clean name, goes through such a
    symlink or is a directory of the layer, whiteouts of "." or "..", and device nodes
    other than STANDARD_DEVICES (all of them unless `allow_devices`). Links to lower
    layers can only be checked against those layers (the Extractor checks the disk).
    """

    def __init__(self, *, allow_devices: bool = True) -> None:
        self.allow_devices = allow_devices
        self.symlinks: set[str] = set()  # this layer's symlinks, as they stand
        self.dirs: set[str] = set()  # this layer's directories, as they stand

    def entry(self, info: tarfile.TarInfo) -> str:
        """Check `info`; its canonical name ("" for the root itself, which has no effect)."""
        if info.type not in _TYPES:
            raise _refused(info, f"unsupported tar entry type {info.type!r}")
        rel = clean_name(info.name)
        if not rel:
            return rel
        _check_numbers(info)
        head, _, base = rel.rpartition("/")
        self._not_through_symlink(info, head)
        if base.startswith(WH_PREFIX):
            self._whiteout(info, base)
            return rel
        if info.ischr() or info.isblk():
            self._device(info)
        elif info.islnk():
            self._hardlink(info, rel)
        elif info.issym() and "\0" in info.linkname:
            raise _refused(info, "a NUL byte in the symlink target")
        self._replace(rel, symlink=info.issym(), directory=info.isdir())
        return rel

    def _not_through_symlink(self, info: tarfile.TarInfo, head: str) -> None:
        if not self.symlinks or not head:
            return
        cut = head.find("/")
        while True:
            parent = head if cut == -1 else head[:cut]
            if parent in self.symlinks:
                raise _refused(info, f"{parent} is a symlink: refusing to write through it")
            if cut == -1:
                return
            cut = head.find("/", cut + 1)

    @staticmethod
    def _whiteout(info: tarfile.TarInfo, base: str) -> None:
        if base == WH_OPAQUE or base.startswith(WH_META):
            return  # an opaque marker hides lower layers only; aufs bookkeeping: nothing
        if base[len(WH_PREFIX) :] in ("", ".", ".."):
            raise _refused(info, "not a valid whiteout name")
        # Nothing else to note: a whiteout spares what its own layer writes.

    def _device(self, info: tarfile.TarInfo) -> None:
        if not self.allow_devices:
            raise _refused(info, "device nodes are not allowed in this layer")
        number = (info.devmajor, info.devminor)
        if not info.ischr() or number not in STANDARD_DEVICES:
            kind = "character" if info.ischr() else "block"
            raise _refused(
                info,
                f"{kind} device {number[0]}:{number[1]} is not allowed in "
                "a layer (only " + ", ".join(STANDARD_DEVICES.values()) + ")",
            )

    def _hardlink(self, info: tarfile.TarInfo, rel: str) -> None:
        target, problem = _canonical(info.linkname)
        if problem:
            raise _refused(info, f"hardlink target {info.linkname!r}: {problem}")
        if not target or target == rel:
            raise _refused(info, f"invalid hardlink target {info.linkname!r}")
        self._not_through_symlink(info, target.rpartition("/")[0])
        if target in self.dirs:
            raise _refused(info, f"hardlink target {target} is a directory")

    def _replace(self, rel: str, *, symlink: bool, directory: bool) -> None:
        """Record that `rel` now holds an entry of that kind."""
        if rel in self.dirs and not directory:
            # Whatever the directory held is gone with it.
            below = rel + "/"
            self.dirs = {d for d in self.dirs if not d.startswith(below)}
            self.symlinks = {s for s in self.symlinks if not s.startswith(below)}
        (self.dirs.add if directory else self.dirs.discard)(rel)
        (self.symlinks.add if symlink else self.symlinks.discard)(rel)


_MAX_ID = 2**32 - 2  # (uid_t)-1 means "unchanged" to chown
_MAX_SECONDS = 2**62  # a time_t, even in nanoseconds' arithmetic


def _check_numbers(info: tarfile.TarInfo) -> None:
    """Owners and mtime that files can have (PAX records may hold any number)."""
    for what, value in (("uid", info.uid), ("gid", info.gid)):
        if not 0 <= value <= _MAX_ID:
            raise _refused(info, f"{what} {value} is out of range")
    if not -_MAX_SECONDS < info.mtime < _MAX_SECONDS:  # also false for NaN
        raise _refused(info, f"mtime {info.mtime} is out of range")


def _refused(info: tarfile.TarInfo, problem: str) -> LayerError:
    return LayerError(f"layer entry {info.name!r}: {problem}")


# NamedTuples, not frozen dataclasses: a rootfs is ~10k entries, and a frozen dataclass's
# __init__ (one object.__setattr__ per field) is several times slower to build.
class Meta(NamedTuple):
    mode: int
    uid: int
    gid: int
    mtime: int
    xattrs: tuple[tuple[str, bytes], ...] = ()


class Entry(NamedTuple):
    """One tar member as written: the canonical header fields."""

    name: str
    kind: bytes
    meta: Meta
    size: int = 0
    linkname: str = ""
    dev: tuple[int, int] = (0, 0)

    def header(self) -> bytes:
        """The ustar block, preceded by a PAX block for what ustar cannot hold.

        Xattr values go in raw (as GNU tar and Go write them): no 'hdrcharset', which
        GNU tar warns about.
        """
        name = fsencode(self.name + "/" if self.kind == tarfile.DIRTYPE else self.name)
        link = fsencode(self.linkname)
        meta = self.meta
        uid, gid, size, mtime = meta.uid, meta.gid, self.size, meta.mtime
        # The common case first (~10k entries a rootfs): everything fits the ustar block.
        if (
            len(name) <= 100
            and len(link) <= 100
            and name.isascii()
            and link.isascii()
            and not meta.xattrs
            and 0 <= uid <= _MAX7
            and 0 <= gid <= _MAX7
            and 0 <= size <= _MAX11
            and 0 <= mtime <= _MAX11
        ):
            return _ustar(
                name, self.kind, meta.mode & 0o7777, uid, gid, size, mtime, link, *self.dev
            )
        records: list[tuple[bytes, bytes]] = []
        if len(name) > 100 or not name.isascii():
            records.append((b"path", name))
        if len(link) > 100 or not link.isascii():
            records.append((b"linkpath", link))
        numbers = []
        for key, value, limit in (
            (b"uid", uid, _MAX7),
            (b"gid", gid, _MAX7),
            (b"size", size, _MAX11),
            (b"mtime", mtime, _MAX11),
        ):
            if not 0 <= value <= limit:
                records.append((key, b"%d" % value))
                value = 0
            numbers.append(value)
        records += [(b"SCHILY.xattr." + os.fsencode(k), v) for k, v in meta.xattrs]
        uid, gid, size, mtime = numbers
        block = _ustar(name, self.kind, meta.mode & 0o7777, uid, gid, size, mtime, link, *self.dev)
        if not records:
            return block
        payload = b"".join(_pax_record(key, value) for key, value in records)
        pax = _ustar(b"././@PaxHeader", tarfile.XHDTYPE, 0o644, 0, 0, len(payload), 0, b"", 0, 0)
        return pax + payload + bytes(-len(payload) % 512) + block


_MAX7, _MAX11 = 0o7777777, 0o77777777777  # the largest numbers 8- and 12-byte fields hold
# name mode uid gid size mtime chksum type linkname magic+version uname+gname dev prefix
_USTAR = struct.Struct("100s8s8s8s12s12s8sc100s8s64s8s8s167s")


def _ustar(
    name: bytes,
    kind: bytes,
    mode: int,
    uid: int,
    gid: int,
    size: int,
    mtime: int,
    link: bytes,
    major: int,
    minor: int,
) -> bytes:
    fields = (
        name[:100],
        b"%07o" % mode,
        b"%07o" % uid,
        b"%07o" % gid,
        b"%011o" % size,
        b"%011o" % mtime,
        kind,
        link[:100],
        b"ustar\x0000",
        (b"%07o" % major)[:8],
        (b"%07o" % minor)[:8],
    )
    # The checksum counts its own field as 8 spaces (256); the zero padding adds nothing,
    # so the fields' bytes are summed rather than the 512-byte block.
    checksum = 256 + sum(map(sum, fields))
    return _USTAR.pack(*fields[:6], b"%06o\0 " % checksum, *fields[6:9], b"", *fields[9:], b"")


def _pax_record(key: bytes, value: bytes) -> bytes:
    body = b" " + key + b"=" + value + b"\n"
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # the length counts its own digits
    return b"%d" % length + body


def tar_xattrs(info: tarfile.TarInfo) -> tuple[tuple[str, bytes], ...]:
    found = (
        (key[len(_XATTR_RECORD) :], value)
        for key, value in info.pax_headers.items()
        if key.startswith(_XATTR_RECORD)
    )
    return tuple(
        sorted(
            (key, value.encode("utf-8", "surrogateescape"))
            for key, value in found
            if keep_xattr(key)
        )
    )


def clamp(value: float, limit: int | None) -> int:
    seconds = int(value)
    return seconds if limit is None else min(seconds, limit)


def write_all(out: Writable, data: bytes) -> None:
    written = out.write(data)
    if isinstance(written, int) and 0 <= written < len(data):
        view = memoryview(data)[written:]
        while view:
            view = view[out.write(view.tobytes()) :]


_SPLICE_MIN = 64 << 10  # files from this size on are sent by the kernel (see TarWriter)


class TarWriter:
    """Writes entries to `out` in CHUNK-sized writes: 10k small files must not cost 30k
    calls through every stream layered below (hashing, compression pipe...)."""

    def __init__(self, out: Writable) -> None:
        self._out = out
        self._pieces: list[bytes] = []
        self._pending = 0
        self._sendfile = True  # until `out` turns out to have no descriptor or refuse it

    def entry(self, info: Entry, data: Readable | int | None = None) -> None:
        """A header, then `info.size` bytes from a stream or a file descriptor."""
        self._write(info.header())
        left = info.size
        if isinstance(data, int) and left >= _SPLICE_MIN and self._sendfile:
            left -= self._send(info, data)
            if left:
                os.lseek(data, info.size - left, os.SEEK_SET)  # the rest is read below
        while left > 0:
            want = min(CHUNK, left)
            if isinstance(data, int):
                chunk = os.read(data, want)
            else:
                chunk = data.read(want) if data is not None else b""
            if not chunk:
                raise LayerError(f"{info.name}: {left} bytes short (did it change while read?)")
            self._write(chunk)
            left -= len(chunk)
        if info.size % 512:
            self._write(bytes(512 - info.size % 512))

    def _send(self, info: Entry, fd: int) -> int:
        """Send the file from the page cache to `out` in the kernel (sendfile: no copy
        through Python), after what is buffered; the bytes sent. An output without a
        descriptor, or one sendfile cannot write (O_APPEND, some file systems), is not
        tried again: the caller reads the rest."""
        self._flush()
        out_fd = file_descriptor(self._out)  # flushes what `out` itself buffers
        sent = 0
        while out_fd is not None and sent < info.size:
            try:
                count = os.sendfile(out_fd, fd, sent, info.size - sent)
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    raise
                break
            if not count:
                raise LayerError(
                    f"{info.name}: {info.size - sent} bytes short (did it change while read?)"
                )
            sent += count
        self._sendfile = sent == info.size
        return sent

    def close(self) -> None:
        """The end-of-archive marker; flushes everything to `out`."""
        self._write(bytes(1024))
        self._flush()

    def _write(self, data: bytes) -> None:
        if len(data) >= CHUNK // 4:
            self._flush()
            write_all(self._out, data)
            return
        self._pieces.append(data)
        self._pending += len(data)
        if self._pending >= CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self._pieces:
            write_all(self._out, b"".join(self._pieces))
            self._pieces.clear()
            self._pending = 0


class _TarSource:
    """The read-only face that tarfile's stream mode ("r|") uses."""

    def __init__(self, src: Readable) -> None:
        self._src = src

    def read(self, size: int, /) -> bytes:
        return self._src.read(size)

    def write(self, data: bytes, /) -> int:
        raise OSError("read-only stream")

    def tell(self) -> int:
        raise OSError("not seekable")

    def seek(self, pos: int, /) -> int:
        raise OSError("not seekable")

    def close(self) -> None:
        pass


def read_entries(src: Readable) -> Iterator[tuple[tarfile.TarInfo, Readable | None]]:
    with tarfile.open(fileobj=_TarSource(src), mode="r|") as archive:
        for info in archive:
            yield info, (archive.extractfile(info) if info.isreg() else None)


def read_xattrs(path: str | int) -> dict[str, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
        return {name: os.getxattr(path, name, follow_symlinks=False) for name in names}
    except OSError:
        return {}  # a file system without xattrs


def is_opaque(xattrs: dict[str, bytes]) -> bool:
    return any(xattrs.get(prefix + "opaque") == b"y" for prefix in OVERLAY_XATTRS)


def join(head: str, name: str) -> str:
    return f"{head}/{name}" if head else name
