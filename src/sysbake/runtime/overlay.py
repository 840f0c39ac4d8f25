"""Overlay mounts of read-only layer trees with a writable upper dir, and their removal."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

from sysbake.cgroups import MOUNTINFO, mounts
from sysbake.errors import RuntimeFailure

# Renamed directories and metadata-only copy-ups would be recorded in xattrs that an OCI
# diff cannot express: turn both off so the upper dir is a plain changeset.
FEATURES = "redirect_dir=off,metacopy=off"

# The kernel copies mount options into one page; keep a margin for the other options.
_MAX_LOWERDIR = 3800
_MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)  # mount(2) itself: no mount(8) per container


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [m.point for m in mounts(MOUNTINFO.read_text(errors="replace"))]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


def lowerdir_option(lowerdirs: Sequence[Path]) -> str:
    """The overlay `lowerdir=` value for layers given bottom to top (overlay wants top first)."""
    if not lowerdirs:
        raise RuntimeFailure("an overlay needs at least one lower layer")
    for d in lowerdirs:
        if ":" in str(d) or "," in str(d):
            raise RuntimeFailure(f"layer path {d} contains ':' or ',' (overlayfs cannot use it)")
    # A layer may come twice (two steps that changed the same, or nothing): overlayfs
    # refuses a dir given twice (ELOOP), and below its topmost use a layer adds nothing.
    top_first = dict.fromkeys(os.path.abspath(d) for d in reversed(lowerdirs))
    value = ":".join(top_first)
    if len(value) > _MAX_LOWERDIR:
        raise RuntimeFailure(
            f"{len(lowerdirs)} layers are too many for one overlay mount "
            f"(lowerdir= would be {len(value)} bytes, at most "
            f"{_MAX_LOWERDIR}): squash the image"
        )
    return value


def mount_overlay(lowerdirs: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `lowerdirs` (bottom to top, never written) + `upper` at `target`."""
    for d in lowerdirs:
        if not Path(d).is_dir():
            raise RuntimeFailure(f"layer tree {d} is missing: expected an unpacked layer")
    options = (
        f"lowerdir={lowerdir_option(lowerdirs)},upperdir={os.path.abspath(upper)},"
        f"workdir={os.path.abspath(work)},{FEATURES}"
    )
    if _libc.mount(b"overlay", os.fsencode(target), b"overlay", 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise RuntimeFailure(f"mounting the overlay rootfs at {target} failed: {os.strerror(err)}")


def umount(target: Path) -> None:
    """Unmount `target` if mounted (idempotent); a busy mount is detached lazily."""
    if not is_mounted(target):
        return
    path = os.fsencode(os.path.realpath(target))
    if _libc.umount2(path, 0) == 0:
        return
    # Busy (a shell of the user sits in it): detach now, the kernel frees it later.
    if _libc.umount2(path, _MNT_DETACH) != 0 and is_mounted(target):
        err = ctypes.get_errno()
        raise RuntimeFailure(f"unmounting {target} failed: {os.strerror(err)}")
