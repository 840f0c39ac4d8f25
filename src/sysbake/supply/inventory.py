"""The packages of a stored image and the layer (stage) that brought each.

The image is read only through sysbake.rootfs.Root, on its layer trees (the store's
unpacked, checked layers) or on a read-only overlay of them: paths resolve inside the
image, the status file and METADATA are never followed through a last symlink, nothing
but a regular file is opened, and each file is read only up to a cap (`LIMITS`), so a
hostile image (a status file that is a link to a host file, a copyright file that is a
FIFO, a device or a gigabyte) ends in one error or warning line, never in a host read.

- Debian packages: dpkg's status file of the whole image; the licence from the package's
  copyright file when it is machine-readable (DEP-5). The layer that brought a package is
  the topmost one whose status file changed it to its final version: the status file is
  read again for each prefix of the image whose top layer touches /var/lib/dpkg.
- Python distributions that Salt or a step installed: `*.dist-info` directories under
  /usr/local/lib/python3*/{dist,site}-packages, /usr/lib/python3*/site-packages and
  below /opt and /srv (a kept Salt toolchain, virtualenvs); Debian's own dist-packages
  belong to dpkg packages and are left out. A distribution's layer is the lowest whose
  tree holds its dist-info directory.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from sysbake import log
from sysbake.oci.model import Image
from sysbake.oci.store import Store
from sysbake.records import field, record
from sysbake.rootfs import ImageTreeError, Root, kind_name
from sysbake.supply import SupplyError
from sysbake.supply.licences import Licence, debian_licence, python_licence
from sysbake.supply.packages import (
    DebPackage,
    deb_purl,
    dep5_licences,
    parse_metadata,
    parse_os_release,
    parse_status,
    pypi_name,
    pypi_purl,
)

STATUS = "var/lib/dpkg/status"
LIMITS = {  # bytes read at most, per kind of file
    "status": 64 << 20,
    "copyright": 1 << 20,
    "metadata": 1 << 20,
    "os-release": 64 << 10,
}
PYTHON_GLOBS = (
    "usr/local/lib/python3*/dist-packages/*.dist-info",
    "usr/local/lib/python3*/site-packages/*.dist-info",
    "usr/lib/python3*/site-packages/*.dist-info",
)
PYTHON_WALKS = ("opt", "srv")  # searched to this depth for *.dist-info directories
MAX_DEPTH = 12
MAX_DIRS = 200_000  # directories a walk visits at most (a hostile image may hold millions)
_SKIP = frozenset({"_vendor", "__pycache__", "node_modules"})  # vendored, caches


@record
class LayerInfo:
    """A layer of the image: its position (0: bottom), diff ID and the stage that made it
    (sysbake's history comment), or what its history entry says it was."""

    index: int
    diff_id: str
    stage: str


@record
class Package:
    """A package found in the image: `kind` "deb" or "python"; `location` is a Python
    distribution's dist-info directory ("" for a Debian package); `layer` the index of the
    layer that brought it."""

    kind: str
    name: str
    version: str
    purl: str
    layer: int
    architecture: str = ""
    source: str = ""
    source_version: str = ""
    licence: Licence | None = None
    location: str = ""


@record
class Inventory:
    """Everything an SBOM says about one image."""

    name: str  # the reference it was asked for by
    manifest: str  # manifest digest
    image_id: str  # config digest
    created: str  # the image's creation time (RFC 3339), the SBOM's timestamp
    architecture: str
    distro: str  # os-release ID ("debian" when unknown)
    distro_version: str  # os-release VERSION_ID ("" when unknown)
    layers: tuple[LayerInfo, ...]
    packages: tuple[Package, ...] = field(default_factory=tuple)


# -- reading files ----------------------------------------------------------------------------


def read_capped(root: Root, path: str, kind: str, *, follow: bool) -> bytes | None:
    """The regular file `path` of the image (None when missing), at most LIMITS[kind]
    bytes; SupplyError naming it when it is anything else (with `follow` False, a symlink
    too) or larger."""
    st = root.stat(path) if follow else root.lstat(path)
    where = f"image path /{path}"
    if st is None:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise SupplyError(f"{where}: expected a regular file, found {kind_name(st.st_mode)}")
    limit = LIMITS[kind]
    if st.st_size > limit:
        raise SupplyError(
            f"{where}: {st.st_size} bytes, more than the {limit} read of a {kind} file"
        )
    try:
        data = root.read_bytes(path)
    except ImageTreeError as exc:
        raise SupplyError(str(exc)) from exc
    except OSError as exc:
        raise SupplyError(f"{where}: cannot read: {exc.strerror or exc}") from exc
    if len(data) > limit:
        raise SupplyError(f"{where}: grew past {limit} bytes while read")
    return data


def read_status(root: Root) -> list[DebPackage]:
    """The installed packages of the tree's dpkg status file ([] when it has none)."""
    data = read_capped(root, STATUS, "status", follow=False)
    return [] if data is None else parse_status(data, f"image path /{STATUS}")


def distro_of(root: Root) -> tuple[str, str]:
    """(ID, VERSION_ID) of the tree's os-release; ("debian", "") when it says nothing."""
    for path in ("etc/os-release", "usr/lib/os-release"):
        try:
            data = read_capped(root, path, "os-release", follow=True)
        except SupplyError as exc:
            log.warn(f"{exc}: distribution unknown, taken as debian")
            return "debian", ""
        if data is not None:
            values = parse_os_release(data)
            return values.get("ID") or "debian", values.get("VERSION_ID", "")
    return "debian", ""


def licences_of(root: Root, packages: Sequence[DebPackage]) -> dict[str, Licence]:
    """Each package's licence, by name, from its machine-readable copyright file; files
    that are missing, free-form or not readable give none (the unreadable ones are named
    in one warning)."""
    out: dict[str, Licence] = {}
    problems: list[str] = []
    for name in sorted({p.name for p in packages}):
        try:
            data = read_capped(root, f"usr/share/doc/{name}/copyright", "copyright", follow=True)
        except SupplyError as exc:
            problems.append(str(exc))
            continue
        synopses = dep5_licences(data) if data is not None else None
        licence = debian_licence(synopses) if synopses else None
        if licence is not None:
            out[name] = licence
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        log.warn(f"licences of {len(problems)} packages not read: {problems[0]}{more}")
    return out


def dist_info_dirs(root: Root) -> list[str]:
    """The paths of the `*.dist-info` directories a Python install left (module docstring),
    sorted."""
    found = {p for pattern in PYTHON_GLOBS for p in root.glob(pattern) if root.is_dir(p)}
    visited = 0
    for top in PYTHON_WALKS:
        for rel, dirs, _other, _fd in root.walk(top):
            visited += 1
            if visited > MAX_DIRS:
                raise SupplyError(f"image path /{top}: more than {MAX_DIRS} directories searched")
            keep = []
            for name in dirs:
                if name.endswith(".dist-info"):
                    found.add(f"{rel}/{name}")
                elif name not in _SKIP and rel.count("/") < MAX_DEPTH:
                    keep.append(name)
            dirs[:] = sorted(keep)
    return sorted(found)


def python_packages(root: Root, paths: Sequence[str], layer_of: dict[str, int]) -> list[Package]:
    """The Python distributions of the dist-info directories `paths` of the tree, each with
    its layer (`layer_of`: dist-info path -> layer index)."""
    out = []
    for path in paths:
        where = f"image path /{path}/METADATA"
        data = read_capped(root, f"{path}/METADATA", "metadata", follow=False)
        if data is None:
            log.warn(f"{where}: missing, distribution left out")
            continue
        dist = parse_metadata(data, where)
        out.append(
            Package(
                "python",
                pypi_name(dist.name),
                dist.version,
                pypi_purl(dist),
                layer_of.get(path, 0),
                licence=python_licence(
                    dist.license_expression, dist.license_text, dist.classifiers
                ),
                location=f"/{path}",
            )
        )
    return out


# -- layers ---------------------------------------------------------------------------------


def layer_infos(image: Image) -> tuple[LayerInfo, ...]:
    """The image's layers with their stage: sysbake's history comment ("sysbake <stage>
    <key>"), else the history entry's created_by, else "layer N"."""
    history = [
        h
        for h in image.config.get("history") or []
        if isinstance(h, dict) and not h.get("empty_layer")
    ]
    if len(history) != len(image.layers):
        history = [{} for _ in image.layers]
    out = []
    for index, (layer, entry) in enumerate(zip(image.layers, history, strict=True)):
        words = str(entry.get("comment") or "").split()
        if len(words) == 3 and words[0] == "sysbake":
            stage = words[1]
        else:
            stage = str(entry.get("created_by") or "").strip()[:200] or f"layer {index}"
        out.append(LayerInfo(index, layer.diff_id, stage))
    return tuple(out)


def touches_dpkg(tree: Root) -> bool:
    """Whether a layer tree may change the status file: it holds /var/lib/dpkg/status, or
    replaces /var, /var/lib or /var/lib/dpkg (a symlink, a whiteout, an opaque dir)."""
    for path in ("var", "var/lib", "var/lib/dpkg"):
        st = tree.lstat(path)
        if st is None:
            return False
        if not stat.S_ISDIR(st.st_mode) or _opaque(tree, path):
            return True
    return tree.lstat(STATUS) is not None


def _opaque(tree: Root, path: str) -> bool:
    try:
        fd = tree.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError:
        return True  # not what lstat said a moment ago: count it as a change
    try:
        from sysbake.userns import overlay_xattr  # rootless: user.overlay.opaque

        return os.getxattr(fd, overlay_xattr("opaque")) == b"y"
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EPERM):
            return False
        raise
    finally:
        os.close(fd)


def brought_by(statuses: Sequence[list[DebPackage]]) -> dict[tuple[str, str], int]:
    """(name, architecture) of each package of the last status -> the index of the topmost
    prefix whose status changed it to its final version (statuses: one per prefix)."""
    out: dict[tuple[str, str], int] = {}
    final = {(p.name, p.architecture): p.version for p in statuses[-1]} if statuses else {}
    previous: dict[tuple[str, str], str] = {}
    for index, packages in enumerate(statuses):
        current = {(p.name, p.architecture): p.version for p in packages}
        for key, version in current.items():
            if final.get(key) == version and previous.get(key) != version:
                out[key] = index
        previous = current
    return out


def dist_layers(trees: Sequence[Path], paths: Sequence[str]) -> dict[str, int]:
    """dist-info path -> the lowest layer whose tree holds that directory (0 when none:
    a path reached through a symlink of another layer)."""
    out: dict[str, int] = {}
    for index, tree in enumerate(trees):
        with Root(tree) as root:
            for path in paths:
                st = root.lstat(path)
                if path not in out and st is not None and stat.S_ISDIR(st.st_mode):
                    out[path] = index
    return out


# -- the image ------------------------------------------------------------------------------


@contextlib.contextmanager
def _view(trees: Sequence[Path], staging: Path, name: str) -> Iterator[Root]:
    """The image made of `trees` (bottom first) as a Root: the tree itself for one layer,
    else an overlay of them mounted under `staging` (nothing is written to it)."""
    if len(trees) == 1:
        with Root(trees[0]) as root:
            yield root
        return
    from sysbake.runtime import overlay

    target, upper, work = (staging / f"{name}-{part}" for part in ("root", "upper", "work"))
    for d in (target, upper, work):
        d.mkdir()
    overlay.mount_overlay(trees, upper, work, target)
    try:
        with Root(target) as root:
            yield root
    finally:
        overlay.umount(target)


def _statuses(trees: Sequence[Path], top: Root, staging: Path) -> list[list[DebPackage]]:
    """The installed packages at each prefix of the image (the last: `top`'s), reading the
    status file again only where a layer touches /var/lib/dpkg."""
    out: list[list[DebPackage]] = []
    for index, tree in enumerate(trees):
        if index == len(trees) - 1:
            out.append(read_status(top))
            continue
        with Root(tree) as root:
            touched = index == 0 or touches_dpkg(root)
        if not touched:
            out.append(out[-1])
            continue
        with _view(trees[: index + 1], staging, f"prefix{index}") as view:
            out.append(read_status(view))
    return out


def inventory(store: Store, name: str) -> Inventory:
    """The packages of image `name` of the store (a reference or ID), with their layers."""
    image = store.resolve(name)
    trees = [store.layer_tree(layer) for layer in image.layers]
    if not trees:
        raise SupplyError(f"{name}: the image has no layers")
    infos = layer_infos(image)
    with store.staging("sbom") as staging, _view(trees, staging, "image") as top:
        statuses = _statuses(trees, top, staging)
        debs = statuses[-1]
        if not debs:
            log.warn(f"{name}: no dpkg status file (/{STATUS}): no Debian packages listed")
        distro, version = distro_of(top)
        licences = licences_of(top, debs)
        layers = brought_by(statuses)
        paths = dist_info_dirs(top)
        pythons = python_packages(top, paths, dist_layers(trees, paths))
    packages = [
        Package(
            "deb",
            p.name,
            p.version,
            deb_purl(p, distro, version),
            layers.get((p.name, p.architecture), 0),
            architecture=p.architecture,
            source=p.source,
            source_version=p.source_version,
            licence=licences.get(p.name),
        )
        for p in debs
    ]
    return Inventory(
        name,
        image.manifest.digest,
        image.id,
        str(image.config.get("created") or "1970-01-01T00:00:00Z"),
        str(image.config.get("architecture") or ""),
        distro,
        version,
        infos,
        tuple(packages + sorted(pythons, key=lambda p: (p.name, p.version, p.location))),
    )
