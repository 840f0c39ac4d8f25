"""Layer tars as root: device nodes (only the standard pseudo devices extract), numeric
owners, file capabilities, overlayfs whiteouts and opaque dirs, and a real overlay mount
whose upper dir is diffed and applied again."""

from __future__ import annotations

import io
import os
import shutil
import stat
import struct
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sysbake.errors import LayerError
from sysbake.oci.layers import archive as layers

pytestmark = pytest.mark.integration

EPOCH = 1_700_000_000
# VFS_CAP_REVISION_2 | effective; permitted = CAP_NET_RAW (13).
CAP_NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def tar_of(root: Path, *, diff: bool = False) -> bytes:
    out = io.BytesIO()
    (layers.write_overlay_diff if diff else layers.write_tree_tar)(root, out, mtime=None)
    return out.getvalue()


def apply(dest: Path, data: bytes, *, overlay: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    layers.extract(io.BytesIO(data), dest, overlay=overlay)
    return dest


def members(data: bytes) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return {m.name: m for m in tf.getmembers()}


def stamp(root: Path) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames, ""]:
            os.utime(os.path.join(dirpath, name), (EPOCH, EPOCH), follow_symlinks=False)


@pytest.fixture
def special(tmp_path: Path) -> Path:
    root = tmp_path / "special"
    (root / "dev").mkdir(parents=True)
    os.mknod(root / "dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(root / "dev/loop0", stat.S_IFBLK | 0o660, os.makedev(7, 0))
    os.chown(root / "dev/loop0", 0, 6)
    (root / "bin").mkdir()
    ping = root / "bin/ping"
    ping.write_bytes(b"\x7fELF fake ping")
    os.chown(ping, 1234, 5678)
    os.chmod(ping, 0o4755)  # setuid survives only if chown comes first
    os.setxattr(ping, "security.capability", CAP_NET_RAW)
    os.setxattr(ping, "trusted.keep", b"kept")
    os.setxattr(ping, "trusted.overlay.origin", b"dropped")
    (root / "home").mkdir()
    os.chown(root / "home", 1000, 1000)
    os.symlink("/nowhere", root / "home/link")
    os.lchown(root / "home/link", 42, 43)
    stamp(root)
    return root


def test_devices_owners_and_capabilities_round_trip(special: Path, tmp_path: Path) -> None:
    data = tar_of(special)
    entries = members(data)
    null, loop = entries["dev/null"], entries["dev/loop0"]
    assert null.ischr() and (null.devmajor, null.devminor) == (1, 3)
    assert loop.isblk() and (loop.devmajor, loop.devminor, loop.gid) == (7, 0, 6)
    ping = entries["bin/ping"]
    assert (ping.uid, ping.gid, ping.uname, ping.gname, ping.mode) == (1234, 5678, "", "", 0o4755)
    assert ping.pax_headers["SCHILY.xattr.trusted.keep"] == "kept"
    assert not any("overlay" in key for key in ping.pax_headers)
    assert (entries["home/link"].uid, entries["home/link"].gid) == (42, 43)

    # A disk's device node is written (a build may make one) but never extracted.
    with pytest.raises(LayerError, match="'dev/loop0': block device 7:0 is not allowed"):
        apply(tmp_path / "refused", data)
    os.unlink(special / "dev/loop0")
    stamp(special)
    data = tar_of(special)
    copy = apply(tmp_path / "copy", data)
    assert os.stat(copy / "dev/null").st_rdev == os.makedev(1, 3)
    st = os.stat(copy / "bin/ping")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4755)
    assert os.getxattr(copy / "bin/ping", "security.capability") == CAP_NET_RAW
    assert os.lstat(copy / "home/link").st_uid == 42
    assert tar_of(copy) == data


def test_gnu_tar_restores_our_capabilities(special: Path, tmp_path: Path) -> None:
    (tmp_path / "t.tar").write_bytes(tar_of(special))
    (tmp_path / "gnu").mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=*",
            "--numeric-owner",
            "-xpf",
            tmp_path / "t.tar",
            "-C",
            tmp_path / "gnu",
        ],
        check=True,
    )
    assert os.getxattr(tmp_path / "gnu/bin/ping", "security.capability") == CAP_NET_RAW
    getcap = subprocess.run(
        ["getcap", tmp_path / "gnu/bin/ping"], capture_output=True, text=True, check=True
    )
    assert "cap_net_raw" in getcap.stdout


def test_devices_refused_when_not_allowed(special: Path, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(LayerError, match="'dev/loop0': device nodes are not allowed"):
        layers.extract(io.BytesIO(tar_of(special)), dest, overlay=False, allow_devices=False)


def test_overlay_form_round_trip(tmp_path: Path) -> None:
    upper = tmp_path / "upper"
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/new").write_text("new")
    os.mknod(upper / "etc/gone", stat.S_IFCHR, os.makedev(0, 0))
    (upper / "var/cache").mkdir(parents=True)
    os.setxattr(upper / "var/cache", "trusted.overlay.opaque", b"y")
    (upper / "var/cache/fresh").write_text("f")
    stamp(upper)
    diff = tar_of(upper, diff=True)
    assert ".wh..wh..opq" in " ".join(members(diff))
    tree = apply(tmp_path / "tree", diff, overlay=True)
    assert os.stat(tree / "etc/gone").st_rdev == 0
    assert stat.S_ISCHR(os.stat(tree / "etc/gone").st_mode)
    assert os.getxattr(tree / "var/cache", "trusted.overlay.opaque") == b"y"
    assert tar_of(tree, diff=True) == diff


@pytest.fixture
def overlay(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """An overlay mount over a small lower tree; unmounted afterwards whatever happens."""
    dirs = {name: tmp_path / name for name in ("lower", "upper", "work", "merged")}
    for path in dirs.values():
        path.mkdir()
    lower = dirs["lower"]
    for name in (
        "etc/motd",
        "etc/keep",
        "etc/mod",
        "gone/a/b",
        "opq/old/x",
        "perm",
        "moved",
        "link-src",
    ):
        (lower / name).parent.mkdir(parents=True, exist_ok=True)
        (lower / name).write_text(name)
    os.link(lower / "link-src", lower / "link-dst")
    os.symlink("etc/motd", lower / "sym")
    stamp(lower)
    options = (
        f"lowerdir={lower},upperdir={dirs['upper']},workdir={dirs['work']},"
        "redirect_dir=off,metacopy=off"
    )
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, dirs["merged"]], check=True)
    try:
        yield dirs
    finally:
        subprocess.run(["umount", dirs["merged"]], check=False)


def test_real_overlay_diff_applies_to_the_merged_view(
    overlay: dict[str, Path], tmp_path: Path
) -> None:
    merged = overlay["merged"]
    (merged / "etc/new").write_text("created")
    with open(merged / "etc/mod", "a") as f:
        f.write(" modified")
    (merged / "etc/motd").unlink()
    shutil.rmtree(merged / "gone")
    shutil.rmtree(merged / "opq")
    (merged / "opq").mkdir()  # removed then recreated: opaque in the upper dir
    (merged / "opq/new").write_text("fresh")
    os.chmod(merged / "perm", 0o600)
    os.chown(merged / "perm", 1000, 1000)
    os.rename(merged / "moved", merged / "etc/moved")
    os.setxattr(merged / "etc/keep", "user.tag", b"v")
    os.link(merged / "etc/new", merged / "etc/new-hardlink")
    os.symlink("/etc/hostname", merged / "etc/abs-link")
    expected = tar_of(merged)

    subprocess.run(["umount", merged], check=True)
    upper = overlay["upper"]
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    diff = tar_of(upper, diff=True)
    entries = members(diff)
    assert {"etc/.wh.motd", ".wh.gone", "opq/.wh..wh..opq", ".wh.moved"} <= set(entries)
    assert "etc/keep" in entries and "etc/motd" not in entries  # O(upper), not the lowers

    # Applied on a copy of the lower dir (a flattened rootfs)...
    flat = tmp_path / "flat"
    subprocess.run(["cp", "-a", overlay["lower"], flat], check=True)
    apply(flat, diff)
    assert tar_of(flat) == expected

    # ...and unpacked as a lowerdir of its own, stacked on the original lower.
    layer = apply(tmp_path / "layer", diff, overlay=True)
    again = tmp_path / "again"
    again.mkdir()
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", f"lowerdir={layer}:{overlay['lower']}", again],
        check=True,
    )
    try:
        assert tar_of(again) == expected
    finally:
        subprocess.run(["umount", again], check=True)


def test_flatten_matches_the_merged_view(overlay: dict[str, Path], tmp_path: Path) -> None:
    merged = overlay["merged"]
    (merged / "etc/motd").unlink()
    shutil.rmtree(merged / "opq")
    (merged / "opq").mkdir()
    (merged / "link-src").write_text("replaced")  # link-dst keeps the old content
    expected = tar_of(merged)
    subprocess.run(["umount", merged], check=True)
    base, top = tar_of(overlay["lower"]), tar_of(overlay["upper"], diff=True)

    def opener(data: bytes) -> layers.LayerOpener:
        return lambda: io.BytesIO(data)

    out = io.BytesIO()
    layers.flatten([opener(base), opener(top)], out, mtime=None)
    assert tar_of(apply(tmp_path / "flat", out.getvalue())) == expected


def test_host_tree_round_trip(tmp_path: Path) -> None:
    """A real tree of the host (read only): GNU tar agrees on the entries, and extracting
    then re-archiving gives the same bytes."""
    source = Path("/usr/lib/python3")
    data = tar_of(source)
    (tmp_path / "t.tar").write_bytes(data)
    ours = subprocess.run(
        ["tar", "-tf", tmp_path / "t.tar"], capture_output=True, text=True, check=True
    )
    assert ours.stderr == ""
    gnu = subprocess.run(["tar", "-C", source, "-cf", "-", "."], capture_output=True, check=True)
    with tarfile.open(fileobj=io.BytesIO(gnu.stdout)) as tf:
        gnu_names = {n.removeprefix("./") for n in tf.getnames()} - {"."}
    assert {n.rstrip("/") for n in ours.stdout.splitlines()} == gnu_names
    assert tar_of(apply(tmp_path / "copy", data)) == data
