"""Overlay mounts of read-only layer trees with a writable upper dir, and their removal.

An image of up to MAX_LAYERS (overlayfs' own stack limit) layers mounts in one of two ways:

- **new** (Linux 6.8+): the new mount API through syscalls, fsopen("overlay"), one
  fsconfig `lowerdir+` per layer, fsmount and move_mount onto the target. Each layer is a
  parameter of its own: the one-page limit of mount(2)'s options does not apply.
- **legacy** (older kernels, or forced by SYSBAKE_OVERLAY_MOUNT=legacy): mount(2) with
  one page of options. Layer trees are named by short links in the store's `l/` (beside
  `trees/`; a link's name is the shortest free prefix of its tree's name, at least
  SHORT_NAME hex digits) given relative to `l/`, as containers/storage does, so that
  MAX_LAYERS layers fit in a page; past a page, one clear error.

SYSBAKE_OVERLAY_MOUNT is `auto` (the default: new where the kernel has it), `new` or
`legacy`. mountinfo lists the layers of a new mount by their paths, those of a legacy one
by their short names (the store's tree sweep knows both).

Three ways to hold one: `mount_overlay` at a path (containers), `in_own_namespace` for a
child process (a chroot step: the mount dies with its namespace), `view` for this process
to read (squash, a step's capture: detached where the new API allows, so a killed
sysbake leaves no mount behind).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from sysbake.cgroups import MOUNTINFO, mounts
from sysbake.errors import RuntimeFailure

# Renamed directories and metadata-only copy-ups would be recorded in xattrs that an OCI
# diff cannot express: turn both off so the upper dir is a plain changeset.
FEATURES = "redirect_dir=off,metacopy=off"


def features() -> str:
    """FEATURES; in a user namespace (rootless, sysbake.userns) with `userxattr`: overlayfs
    keeps its marks in user.overlay.* xattrs there, trusted.* being out of reach, and
    then takes no redirect_dir but `nofollow` (none made, none followed: the same)."""
    from sysbake import userns

    if not userns.inside():
        return FEATURES
    return FEATURES.replace("redirect_dir=off", "redirect_dir=nofollow") + ",userxattr"


MAX_LAYERS = 500  # overlayfs' OVL_MAX_STACK: lower layers of one mount
MOUNT_ENV = "SYSBAKE_OVERLAY_MOUNT"
MODES = ("auto", "new", "legacy")
SHORT_NAME = 6  # hex digits of the shortest link name: 500 of them fit in a page
LINKS_DIR = "l"
SQUASH_HINT = (
    "squash the image (`sysbake squash IMAGE NAME:TAG`, or `squash = true` in its project)"
)

# mount(2) copies its options into one page, the last byte a NUL.
_PAGE = os.sysconf("SC_PAGE_SIZE")
# The absolute-path form keeps a margin for what the kernel may add (a label).
_MAX_LOWERDIR = 3800
_HEX_NAME = re.compile(rf"[0-9a-f]{{{SHORT_NAME},}}")

# The new mount API (the same numbers on every architecture but alpha).
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432
_FSOPEN_CLOEXEC = _FSMOUNT_CLOEXEC = 1
_FSCONFIG_SET_FLAG, _FSCONFIG_SET_STRING, _FSCONFIG_CMD_CREATE = 0, 1, 6
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_FDCWD = -100
_MNT_DETACH = 2
_CLONE_NEWNS = 0x00020000
_MS_REC, _MS_PRIVATE = 0x4000, 1 << 18

_libc = ctypes.CDLL(None, use_errno=True)  # mount(2) itself: no mount(8) per container
_libc.syscall.restype = ctypes.c_long


def mount_points() -> list[str]:
    """Every mount point of this mount namespace, in mount order."""
    return [m.point for m in mounts(MOUNTINFO.read_text(errors="replace"))]


def is_mounted(path: Path) -> bool:
    return os.path.realpath(path) in mount_points()


# -- pure: what a mount is made of -----------------------------------------------------


def layer_stack(lowerdirs: Sequence[Path | str]) -> list[str]:
    """The absolute lower dirs of a mount, top first (overlay's order) from `lowerdirs`
    given bottom to top; a layer given twice counts at its topmost place only (overlayfs
    refuses a dir twice, and below its topmost use it adds nothing). At most MAX_LAYERS."""
    if not lowerdirs:
        raise RuntimeFailure("an overlay needs at least one lower layer")
    stack = list(dict.fromkeys(os.path.abspath(d) for d in reversed(lowerdirs)))
    if len(stack) > MAX_LAYERS:
        raise RuntimeFailure(
            f"{len(stack)} layers are too many for one overlay mount (overlayfs stacks "
            f"at most {MAX_LAYERS}): {SQUASH_HINT}"
        )
    return stack


def mount_mode(environ: dict[str, str] | None = None) -> str:
    """The way overlays are mounted: SYSBAKE_OVERLAY_MOUNT (auto, new or legacy)."""
    value = (os.environ if environ is None else environ).get(MOUNT_ENV, "").strip() or "auto"
    if value not in MODES:
        raise RuntimeFailure(f"{MOUNT_ENV}={value}: expected one of {', '.join(MODES)}")
    return value


def fsconfig_plan(stack: Sequence[str], upper: Path, work: Path) -> list[tuple[str, str]]:
    """The (key, value) strings a new-API mount sets, in order: one `lowerdir+` per layer
    of `stack` (top first), then the upper and work dirs and FEATURES."""
    plan = [("source", "overlay")]
    plan += [("lowerdir+", d) for d in stack]
    plan += [("upperdir", os.path.abspath(upper)), ("workdir", os.path.abspath(work))]
    plan += [(k, v) for k, _, v in (f.partition("=") for f in features().split(","))]
    return plan


def lowerdir_option(lowerdirs: Sequence[Path | str]) -> str:
    """The `lowerdir=` value naming the layers by absolute path, for layers given bottom to
    top (overlay wants top first), when that fits the page."""
    value = ":".join(_checked_names(layer_stack(lowerdirs)))
    if len(value) > _MAX_LOWERDIR:
        raise RuntimeFailure(
            f"{len(lowerdirs)} layers are too many for one overlay mount by path "
            f"(lowerdir= would be {len(value)} bytes, at most {_MAX_LOWERDIR}): {SQUASH_HINT}"
        )
    return value


def legacy_options(names: Sequence[str], upper: Path, work: Path) -> str:
    """mount(2)'s options for the lower dirs `names` (top first, as given: short link
    names or absolute paths); a clear error when they do not fit in one page."""
    value = (
        f"lowerdir={':'.join(_checked_names(names))},upperdir={os.path.abspath(upper)},"
        f"workdir={os.path.abspath(work)},{features()}"
    )
    if len(value.encode()) >= _PAGE:
        raise RuntimeFailure(
            f"{len(names)} layers do not fit in one overlay mount on this kernel (mount(2) "
            f"without `lowerdir+`, before Linux 6.8): its options would be "
            f"{len(value.encode())} bytes, at most {_PAGE - 1}: {SQUASH_HINT}"
        )
    return value


def _checked_names(names: Sequence[str]) -> Sequence[str]:
    for name in names:
        if ":" in name or "," in name:
            raise RuntimeFailure(
                f"layer path {name} contains ':' or ',' (overlayfs cannot use it in mount options)"
            )
    return names


def link_names(tree: str) -> Iterator[str]:
    """The short names a link to the tree named `tree` may take, shortest first: its
    prefixes from SHORT_NAME hex digits on (the first free one, or the one already
    pointing at it, is used)."""
    for length in range(SHORT_NAME, len(tree) + 1):
        yield tree[:length]


def links_dir(stack: Sequence[str]) -> Path | None:
    """Where the short links of `stack` go: `l/` beside the one directory holding every
    layer tree (the store's `trees/`); None when the trees are elsewhere or their names
    are not hex (they are then named by path)."""
    parents = {os.path.dirname(d) for d in stack}
    if len(parents) != 1 or not all(_HEX_NAME.fullmatch(os.path.basename(d)) for d in stack):
        return None
    return Path(parents.pop()).parent / LINKS_DIR


# -- mounting ------------------------------------------------------------------------------


def mount_overlay(lowerdirs: Sequence[Path], upper: Path, work: Path, target: Path) -> None:
    """Mount `lowerdirs` (bottom to top, never written) + `upper` at `target`."""
    _perform(_plan(lowerdirs, upper, work), target)


def in_own_namespace(
    lowerdirs: Sequence[Path], upper: Path, work: Path, target: Path
) -> Callable[[], None]:
    """A function for a child to run before it execs (subprocess's preexec_fn): a private
    mount namespace of its own, the overlay mounted at `target` there; the mount goes
    with the namespace, however the child's processes end. What can be checked is
    checked here, each error one line; should the kernel refuse the mount, the child
    says why on its stderr ("sysbake: ...") and exits 125."""
    plan = _plan(lowerdirs, upper, work)

    def setup() -> None:
        try:
            private = _libc.unshare(_CLONE_NEWNS) == 0 and (
                _libc.mount(b"none", b"/", None, _MS_REC | _MS_PRIVATE, None) == 0
            )
            if not private:
                raise RuntimeFailure(f"a mount namespace: {os.strerror(ctypes.get_errno())}")
            _perform(plan, target)
        except BaseException as exc:  # nothing may unwind into the parent's code
            os.write(2, f"sysbake: {exc}\n".encode(errors="replace"))
            os._exit(125)

    return setup


@contextlib.contextmanager
def view(lowerdirs: Sequence[Path], upper: Path, work: Path, target: Path) -> Iterator[Path]:
    """The overlay, for this process to read: where the new API mounts it, a detached
    mount read at /proc/self/fd/N (it goes with the process, however it ends); else
    mounted at `target` for the while."""
    plan = _plan(lowerdirs, upper, work)
    if plan.legacy is not None:
        _perform(plan, target)
        try:
            yield target
        finally:
            umount(target)
        return
    mnt = _mount_new(plan.params, None)
    try:
        yield Path(f"/proc/self/fd/{mnt}")
    finally:
        os.close(mnt)


class _Plan(NamedTuple):
    """A mount, checked: the new API's parameters (fsconfig_plan), or for mount(2) its
    options and the dir their short names are relative to (`legacy`)."""

    params: list[tuple[str, str]]
    legacy: tuple[str, Path | None] | None


def _plan(lowerdirs: Sequence[Path], upper: Path, work: Path) -> _Plan:
    """Everything checked before the kernel is asked (the short links made, for mount(2))."""
    for d in lowerdirs:
        if not Path(d).is_dir():
            raise RuntimeFailure(f"layer tree {d} is missing: expected an unpacked layer")
    stack = layer_stack(lowerdirs)
    mode = mount_mode()
    if mode != "legacy" and new_api_available():
        return _Plan(fsconfig_plan(stack, upper, work), None)
    if mode == "new":
        raise RuntimeFailure(
            f"{MOUNT_ENV}=new: this kernel has no overlay `lowerdir+` (Linux 6.8+); "
            "use auto or legacy"
        )
    links = links_dir(stack)
    names = _short_links(links, stack) if links is not None else list(stack)
    return _Plan([], (legacy_options(names, upper, work), links))


def _perform(plan: _Plan, target: Path) -> None:
    if plan.legacy is None:
        _mount_new(plan.params, target)
    else:
        _mount_legacy(*plan.legacy, target)


@functools.cache
def new_api_available() -> bool:
    """Whether this kernel mounts overlays through fsopen with `lowerdir+` (asked once)."""
    try:
        fs = _syscall(_SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    except OSError:
        return False  # no new mount API (or a seccomp filter refuses it)
    try:
        _syscall(_SYS_FSCONFIG, fs, _FSCONFIG_SET_STRING, b"lowerdir+", b"/", 0)
    except OSError:
        # An overlayfs before `lowerdir+` says so; another refusal (of "/" as a layer)
        # is not about the API: the real mount reports its own error.
        return "Unknown parameter" not in _kernel_log(fs)
    finally:
        os.close(fs)
    return True


def _mount_new(params: Sequence[tuple[str, str]], target: Path | None) -> int:
    """Mount with the fsconfig `params` through the new API at `target` (then -1), or with
    None, detached: the file descriptor of the mount, for the caller to close."""
    fs = _failing(f"opening an overlay at {target}", _SYS_FSOPEN, b"overlay", _FSOPEN_CLOEXEC)
    try:
        for key, value in params:
            what = f"layer tree {value}" if key == "lowerdir+" else f"overlay {key}={value}"
            flag = not value and key != "lowerdir+"  # a feature without a value: userxattr
            _failing(
                what,
                _SYS_FSCONFIG,
                fs,
                _FSCONFIG_SET_FLAG if flag else _FSCONFIG_SET_STRING,
                key.encode(),
                None if flag else os.fsencode(value),
                0,
                log_fd=fs,
            )
        where = f"mounting the overlay rootfs at {target or 'a detached mount'}"
        _failing(where, _SYS_FSCONFIG, fs, _FSCONFIG_CMD_CREATE, None, None, 0, log_fd=fs)
        mnt = _failing(where, _SYS_FSMOUNT, fs, _FSMOUNT_CLOEXEC, 0, log_fd=fs)
        if target is None:
            return mnt
        try:
            _failing(
                where,
                _SYS_MOVE_MOUNT,
                mnt,
                b"",
                _AT_FDCWD,
                os.fsencode(os.path.abspath(target)),
                _MOVE_MOUNT_F_EMPTY_PATH,
            )
        finally:
            os.close(mnt)  # the tree lives on where it was moved
    finally:
        os.close(fs)
    return -1


def _mount_legacy(options: str, links: Path | None, target: Path) -> None:
    # Short names are relative to l/: the kernel resolves them from the cwd, moved there
    # for the one call (no thread of sysbake uses a relative path meanwhile).
    with _working_dir(links):
        if (
            _libc.mount(
                b"overlay",
                os.fsencode(os.path.abspath(target)),
                b"overlay",
                0,
                options.encode(),
            )
            != 0
        ):
            err = ctypes.get_errno()
            raise RuntimeFailure(
                f"mounting the overlay rootfs at {target} failed: {os.strerror(err)}"
            )


def _short_links(links: Path, stack: Sequence[str]) -> list[str]:
    """The short name of each tree of `stack`, its link in `links` made when missing."""
    try:
        links.mkdir(mode=0o700, exist_ok=True)
        return [_short_link(links, tree) for tree in stack]
    except OSError as exc:
        raise RuntimeFailure(f"making the layer links in {links}: {exc.strerror or exc}") from exc


def _short_link(links: Path, tree: str) -> str:
    """The name of a link in `links` to `tree`: the first of link_names free or already
    pointing there (a dangling link, to a tree since removed, is taken over)."""
    for name in link_names(os.path.basename(tree)):
        path = links / name
        try:
            os.symlink(tree, path)  # atomic: two makers of one name cannot both succeed
            return name
        except FileExistsError:
            pass
        try:
            if os.readlink(path) == tree:
                return name
        except OSError:
            continue  # not a link: never ours, try a longer name
        if not os.path.exists(path):
            _replace_link(path, tree)
            return name
    raise RuntimeFailure(f"no short name is free in {links} for the layer tree {tree}")


def _replace_link(path: Path, tree: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(tree, tmp)
    os.rename(tmp, path)


@contextlib.contextmanager
def _working_dir(path: Path | None) -> Iterator[None]:
    """Run the body with `path` as the working directory (None: where it is), then back."""
    if path is None:
        yield
        return
    back = os.open(".", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chdir(path)
        yield
    finally:
        os.fchdir(back)
        os.close(back)


def _syscall(number: int, *args: object) -> int:
    # Numbers go as C longs, what syscall(2) reads for every argument.
    longs = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    result = int(_libc.syscall(ctypes.c_long(number), *longs))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def _failing(what: str, number: int, *args: object, log_fd: int | None = None) -> int:
    """The syscall's result, or a RuntimeFailure naming `what`, the error and what the
    kernel logged on the mount's file descriptor."""
    try:
        return _syscall(number, *args)
    except OSError as exc:
        said = _kernel_log(log_fd) if log_fd is not None else ""
        raise RuntimeFailure(f"{what}: {exc.strerror}" + (f" ({said})" if said else "")) from None


def _kernel_log(fs: int) -> str:
    """The messages overlayfs left on the fs context `fs` ("e overlayfs: ..."), joined."""
    said = []
    for _ in range(16):
        try:
            line = os.read(fs, 1024)
        except OSError:
            break
        if not line:
            break
        said.append(line.decode(errors="replace").strip().removeprefix("e "))
    return "; ".join(said)


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
