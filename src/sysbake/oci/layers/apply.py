"""Applying layers: onto a directory (extraction) or onto a stream (flattening).

Helpers of sysbake.oci.layers.archive; the contracts are documented there.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from sysbake.errors import LayerError
from sysbake.oci.compress import CHUNK, Readable
from sysbake.oci.layers.tar import (
    WH_META,
    WH_OPAQUE,
    WH_PREFIX,
    Entry,
    EntryCheck,
    Meta,
    TarWriter,
    clamp,
    clean_name,
    join,
    keep_xattr,
    read_entries,
    tar_xattrs,
)

LayerOpener = Callable[[], AbstractContextManager[Readable]]


def _mtime_ns(info: tarfile.TarInfo) -> int:
    mtime = info.mtime
    return mtime * 10**9 if isinstance(mtime, int) else int(mtime * 1e9)


class Extractor:
    """Applies entries one by one, each checked by an EntryCheck first, then against what
    the disk holds; directories get their mode and mtime at the end."""

    def __init__(self, dest: Path, *, overlay: bool, allow_devices: bool) -> None:
        self.dest = os.fspath(dest)
        if not os.path.isdir(self.dest):
            raise LayerError(f"cannot extract into {self.dest}: not a directory")
        self.overlay = overlay
        self.check = EntryCheck(allow_devices=allow_devices)
        self.chown = os.geteuid() == 0
        self.created: set[str] = set()  # what this layer wrote: whiteouts spare it
        self.whited: set[str] = set()  # overlay=True: whiteouts this layer made
        self.dirs: dict[str, tuple[int, int]] = {}  # rel -> (mode, mtime ns)
        self.known_dirs: set[str] = {""}  # checked: real directories, not symlinks

    def entry(self, info: tarfile.TarInfo, data: Readable | None) -> None:
        rel = self.check.entry(info)
        if not rel:
            return  # the root itself: `dest` keeps its own attributes
        try:
            head, _, base = rel.rpartition("/")
            if base.startswith(WH_PREFIX):
                self._whiteout(info, head, base)
            else:
                self._create(info, rel, data)
                self.created.add(rel)
        except OSError as exc:
            raise LayerError(f"layer entry {info.name!r}: {exc.strerror or exc}") from exc
        except (tarfile.TarError, ValueError) as exc:
            raise LayerError(f"layer entry {info.name!r}: {exc}") from exc

    def finish(self) -> None:
        """Give directories their mode and mtime, now that nothing is written into them."""
        for rel, (mode, mtime_ns) in sorted(self.dirs.items(), reverse=True):
            path = os.path.join(self.dest, rel)
            try:
                if stat.S_ISDIR(os.lstat(path).st_mode):
                    os.chmod(path, mode)
                    os.utime(path, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
            except FileNotFoundError:
                continue  # replaced by a later entry of the same layer
            except OSError as exc:
                raise LayerError(f"layer entry {rel}/: {exc.strerror or exc}") from exc

    def _error(self, info: tarfile.TarInfo, problem: str) -> LayerError:
        return LayerError(f"layer entry {info.name!r}: {problem}")

    def _parents(self, info: tarfile.TarInfo, rel: str, *, create: bool) -> bool:
        """Check that rel's parents are real directories (made if `create`); False: missing."""
        parts = rel.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            cur = "/".join(parts[:depth])
            if cur in self.known_dirs:
                continue
            path = os.path.join(self.dest, cur)
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                if not create:
                    return False
                os.mkdir(path, 0o755)
                mode = stat.S_IFDIR
            if stat.S_ISLNK(mode):
                raise self._error(info, f"{cur} is a symlink: refusing to write through it")
            if not stat.S_ISDIR(mode):
                raise self._error(info, f"{cur} is not a directory")
            self.known_dirs.add(cur)
        return True

    def _remove(self, rel: str, *, keep_dir: bool = False) -> bool:
        """Remove rel (unless both it and the new entry are dirs); True if it was a dir."""
        path = os.path.join(self.dest, rel)
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            return False
        if not stat.S_ISDIR(mode):
            os.unlink(path)
        elif not keep_dir:
            shutil.rmtree(path)
            self.known_dirs = {""}
        return stat.S_ISDIR(mode)

    def _clear_lower(self, rel: str) -> None:
        """Remove what rel holds from lower layers, keeping what this layer wrote."""
        path = os.path.join(self.dest, rel)
        for name in os.listdir(path):
            child = join(rel, name)
            if child not in self.created:
                self._remove(child)
            elif stat.S_ISDIR(os.lstat(os.path.join(path, name)).st_mode):
                self._clear_lower(child)

    def _hide_lower(self, rel: str) -> None:
        if self.overlay:
            from sysbake.userns import overlay_xattr  # rootless: user.overlay.opaque

            os.setxattr(
                os.path.join(self.dest, rel), overlay_xattr("opaque"), b"y", follow_symlinks=False
            )
        else:
            self._clear_lower(rel)

    def _is_dir(self, rel: str) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(os.path.join(self.dest, rel)).st_mode)
        except FileNotFoundError:
            return False

    def _whiteout(self, info: tarfile.TarInfo, head: str, base: str) -> None:
        if base == WH_OPAQUE:
            if self._parents(info, join(head, base), create=self.overlay):
                self._hide_lower(head)
            return
        if base.startswith(WH_META):
            return  # aufs bookkeeping (.wh..wh.plnk...): nothing to apply
        target = join(head, base[len(WH_PREFIX) :])
        if not self._parents(info, target, create=self.overlay):
            return  # its directory is not there: nothing to delete
        if target in self.created:
            # This layer also writes `target`: the whiteout hides only what lower layers had.
            if self._is_dir(target):
                self._hide_lower(target)
            return
        self._remove(target)
        if self.overlay:
            path = os.path.join(self.dest, target)
            os.mknod(path, stat.S_IFCHR | (info.mode & 0o7777), os.makedev(0, 0))
            self._meta(path, info, link=True)
            self.whited.add(target)

    def _create(self, info: tarfile.TarInfo, rel: str, data: Readable | None) -> None:
        path = os.path.join(self.dest, rel)
        if info.islnk():
            target = self._link_target(info)
        self._parents(info, rel, create=True)
        was_whited = rel in self.whited
        self.whited.discard(rel)
        existed = self._remove(rel, keep_dir=info.isdir())
        if info.isdir():
            if not existed:
                os.mkdir(path, 0o700)
            self.known_dirs.add(rel)
            self._meta(path, info, link=True, replace=existed)
            self.dirs[rel] = (info.mode & 0o7777, _mtime_ns(info))
            if was_whited:
                self._hide_lower(rel)  # the whiteout deleted the lower directory
        elif info.isreg():
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            try:
                left = info.size
                while left > 0 and data is not None and (chunk := data.read(min(CHUNK, left))):
                    left -= len(chunk)
                    view = memoryview(chunk)
                    while view:
                        view = view[os.write(fd, view) :]
                self._meta(fd, info)
            finally:
                os.close(fd)
        elif info.issym():
            os.symlink(info.linkname, path)
            self._meta(path, info, link=True)
        elif info.islnk():
            os.link(os.path.join(self.dest, target), path, follow_symlinks=False)
        elif info.isfifo():
            os.mkfifo(path, 0o600)
            self._meta(path, info)
        else:
            kind = stat.S_IFCHR if info.ischr() else stat.S_IFBLK
            os.mknod(path, kind | 0o600, os.makedev(info.devmajor, info.devminor))
            self._meta(path, info)

    def _link_target(self, info: tarfile.TarInfo) -> str:
        target = clean_name(info.linkname)  # EntryCheck vouched for it
        if not self._parents(info, target, create=False) or not os.path.lexists(
            os.path.join(self.dest, target)
        ):
            raise self._error(info, f"hardlink target {target} does not exist")
        if self._is_dir(target):
            raise self._error(info, f"hardlink target {target} is a directory")
        return target

    def _meta(
        self, target: str | int, info: tarfile.TarInfo, *, link: bool = False, replace: bool = False
    ) -> None:
        """Owner, mode, xattrs, mtime, in the order that keeps each (chown drops setuid
        bits and file capabilities). `link`: no chmod (symlinks; dirs get theirs later)."""
        by_path = not isinstance(target, int)
        if self.chown:
            if isinstance(target, int):
                os.fchown(target, info.uid, info.gid)
            else:
                os.lchown(target, info.uid, info.gid)
        if not link:
            os.chmod(target, info.mode & 0o7777)
        xattrs = dict(tar_xattrs(info))
        if replace:
            for name in os.listxattr(target, follow_symlinks=not by_path):
                if keep_xattr(name) and name not in xattrs:
                    os.removexattr(target, name, follow_symlinks=not by_path)
        for name, value in xattrs.items():
            os.setxattr(target, name, value, follow_symlinks=not by_path)
        if not info.isdir():
            mtime_ns = _mtime_ns(info)
            os.utime(target, ns=(mtime_ns, mtime_ns), follow_symlinks=not by_path)


class _LayerPass:
    """What a Flattener collects while reading one layer, merged into its state after."""

    def __init__(self) -> None:
        self.gone: set[str] = set()
        self.masked: set[str] = set()
        self.implied: set[str] = set()
        self.written: dict[str, bool] = {}  # this layer's paths: written, or hidden from above
        self.reread: dict[str, list[Entry]] = {}  # hidden targets of this layer's hardlinks
        self.pending: dict[str, list[Entry]] = {}  # hardlink targets left to lower layers


class Flattener:
    """Top-down merge: `gone` paths and `masked` subtrees are hidden from lower layers;
    each layer's entries pass an EntryCheck."""

    def __init__(self, writer: TarWriter, mtime: int | None, *, allow_devices: bool) -> None:
        self.writer = writer
        self.mtime = mtime
        self.allow_devices = allow_devices
        self.gone: set[str] = set()
        self.masked: set[str] = set()
        # Directories that upper layers write into: a lower layer may not make one of them
        # a symlink or a file (extracting the result would write through it).
        self.implied: set[str] = set()
        # Hardlinks from upper layers to files of lower ones, by target path.
        self.pending: dict[str, list[Entry]] = {}

    def run(self, layers: Sequence[LayerOpener]) -> None:
        for number in range(len(layers), 0, -1):
            try:
                self._layer(layers[number - 1])
            except (LayerError, tarfile.TarError) as exc:
                raise LayerError(f"layer {number} of {len(layers)}: {exc}") from exc
        for target, links in sorted(self.pending.items()):
            raise LayerError(f"hardlink {links[0].name} -> {target}: no lower layer has it")
        self.writer.close()

    def _hidden(self, rel: str, gone: set[str], masked: set[str]) -> bool:
        if rel in gone or "" in masked:
            return True
        cut = rel.find("/")
        while cut != -1:
            if rel[:cut] in masked:
                return True
            cut = rel.find("/", cut + 1)
        return False

    def _entry(self, info: tarfile.TarInfo, name: str) -> Entry:
        meta = Meta(info.mode, info.uid, info.gid, clamp(info.mtime, self.mtime), tar_xattrs(info))
        if info.islnk():
            return Entry(name, tarfile.LNKTYPE, meta, linkname=clean_name(info.linkname))
        kind = tarfile.REGTYPE if info.isreg() else info.type
        dev = (info.devmajor, info.devminor) if info.ischr() or info.isblk() else (0, 0)
        return Entry(
            name,
            kind,
            meta,
            size=info.size if info.isreg() else 0,
            linkname=info.linkname if info.issym() else "",
            dev=dev,
        )

    def _links(self, links: list[Entry], target: str) -> None:
        for link in links:
            self.writer.entry(link._replace(linkname=target))

    def _serve(self, info: tarfile.TarInfo, data: Readable | None, links: list[Entry]) -> None:
        """Write a hidden file under the name of the first link that still needs it."""
        if info.isdir() or info.islnk():
            raise LayerError(
                f"hardlink {links[0].name} -> {info.name}: a "
                f"{'directory' if info.isdir() else 'chain of links'}"
            )
        self.writer.entry(self._entry(info, links[0].name), data)
        self._links(links[1:], links[0].name)

    def _layer(self, opener: LayerOpener) -> None:
        check = EntryCheck(allow_devices=self.allow_devices)
        layer = _LayerPass()
        with opener() as stream:
            for info, data in read_entries(stream):
                rel = check.entry(info)
                if rel and not self._note_whiteout(rel, layer):
                    self._place(info, data, rel, layer)
        if layer.reread:
            self._reread(opener, layer.reread)
        self._merge(layer)

    @staticmethod
    def _note_whiteout(rel: str, layer: _LayerPass) -> bool:
        """Note the whiteout `rel` in `layer` (an opaque one masks its dir, a plain one
        removes its path); False when `rel` is no whiteout."""
        head, _, base = rel.rpartition("/")
        if not base.startswith(WH_PREFIX):
            return False
        if base == WH_OPAQUE:
            layer.masked.add(head)
        elif not base.startswith(WH_META):
            layer.gone.add(join(head, base[len(WH_PREFIX) :]))
            layer.masked.add(join(head, base[len(WH_PREFIX) :]))
        return True

    def _place(
        self, info: tarfile.TarInfo, data: Readable | None, rel: str, layer: _LayerPass
    ) -> None:
        """Write the entry `rel` unless upper layers hide it (then serve only the upper
        hardlinks that wait for it), and note it in `layer`."""
        wanted = self.pending.pop(rel, []) if rel not in layer.written else []
        hidden = self._hidden(rel, self.gone, self.masked)
        layer.written[rel] = not hidden
        if not hidden:
            layer.gone.add(rel)
            if not info.isdir():
                self._not_implied(rel, info)
                layer.masked.add(rel)
            self._imply(rel.rpartition("/")[0], layer.implied)
        if info.islnk():
            self._hardlink(
                clean_name(info.linkname),
                wanted + ([] if hidden else [self._entry(info, rel)]),
                layer,
            )
        elif not hidden:
            self.writer.entry(self._entry(info, rel), data)
            self._links(wanted, rel)
        elif wanted:
            self._serve(info, data, wanted)

    def _hardlink(self, target: str, links: list[Entry], layer: _LayerPass) -> None:
        """Hardlinks `links` to `target`: written now if this layer wrote the target, served
        by a second read if this layer holds it hidden, else left to the layers below."""
        if target not in layer.written:
            layer.pending.setdefault(target, []).extend(links)
        elif layer.written[target]:
            self._links(links, target)
        else:
            layer.reread.setdefault(target, []).extend(links)

    def _merge(self, layer: _LayerPass) -> None:
        """Add what `layer` hides, implies and leaves pending to the merge's state; refuses
        an upper hardlink whose target this layer deleted."""
        for target, links in self.pending.items():
            if self._hidden(target, layer.gone, layer.masked):
                raise LayerError(f"hardlink {links[0].name} -> {target}: deleted before it")
        self.gone |= layer.gone
        self.masked |= layer.masked
        self.implied |= layer.implied
        for target, links in layer.pending.items():
            self.pending.setdefault(target, []).extend(links)

    def _not_implied(self, rel: str, info: tarfile.TarInfo) -> None:
        if rel in self.implied:
            kind = "symlink" if info.issym() else "file"
            raise LayerError(
                f"layer entry {info.name!r}: a {kind}, but an upper layer writes "
                "into it as a directory"
            )

    def _imply(self, head: str, implied: set[str]) -> None:
        """Note `head` and its parents as directories this layer writes into."""
        while head and head not in implied and head not in self.implied:
            implied.add(head)
            head = head.rpartition("/")[0]

    def _reread(self, opener: LayerOpener, wanted: dict[str, list[Entry]]) -> None:
        with opener() as stream:
            for info, data in read_entries(stream):
                links = wanted.pop(clean_name(info.name), None)
                if links:
                    self._serve(info, data, links)
