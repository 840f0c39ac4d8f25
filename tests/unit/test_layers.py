"""Layer tars: determinism, format, round trips, whiteouts, flattening, hostile input.

Root-free: ownership, devices, file capabilities and trusted.* xattrs are covered by
tests/integration/test_layers_root.py.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Mapping
from pathlib import Path

import pytest

from sysbake.errors import LayerError
from sysbake.oci.layers import archive as layers
from tests.unit.conftest import EPOCH, Entry, crafted_tar, flat, tar_members

# -- helpers ---------------------------------------------------------------------------


def tar_of(root: Path, *, mtime: int | None = None, diff: bool = False) -> bytes:
    out = io.BytesIO()
    if diff:
        layers.write_overlay_diff(root, out, mtime=mtime)
    else:
        layers.write_tree_tar(root, out, mtime=mtime)
    return out.getvalue()


def names(data: bytes) -> list[str]:
    return [m.name + ("/" if m.isdir() else "") for m in tar_members(data)]


def build(root: Path, spec: Mapping[str, str | bytes | None], *, mtime: int = EPOCH) -> Path:
    """Make a tree: "dir/" -> directory, "name" -> bytes content, "link@" -> symlink target."""
    root.mkdir(parents=True, exist_ok=True)
    for name, value in spec.items():
        path = root / name.rstrip("/@")
        path.parent.mkdir(parents=True, exist_ok=True)
        if name.endswith("/"):
            path.mkdir(exist_ok=True)
        elif name.endswith("@"):
            assert isinstance(value, str)
            path.symlink_to(value)
        else:
            path.write_bytes(value.encode() if isinstance(value, str) else value or b"")
    stamp(root, mtime)
    return root


def stamp(root: Path, mtime: int) -> None:
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*filenames, *dirnames, ""]:
            os.utime(os.path.join(dirpath, name), (mtime, mtime), follow_symlinks=False)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    """What a tree holds, comparably: type, mode, mtime, content or target, xattrs."""
    found: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                body: object = Path(path).read_bytes()
            elif stat.S_ISLNK(st.st_mode):
                body = os.readlink(path)
            else:
                body = None
            xattrs = (
                {}
                if stat.S_ISLNK(st.st_mode)
                else {k: os.getxattr(path, k) for k in os.listxattr(path) if k.startswith("user.")}
            )
            found[os.path.relpath(path, root)] = (
                stat.S_IFMT(st.st_mode),
                stat.S_IMODE(st.st_mode),
                int(st.st_mtime),
                body,
                sorted(xattrs.items()),
            )
    return found


def apply(dest: Path, *tars: bytes, overlay: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for data in tars:
        layers.extract(io.BytesIO(data), dest, overlay=overlay)
    return dest


def gnu_tar_list(data: bytes, tmp_path: Path) -> str:
    path = tmp_path / "check.tar"
    path.write_bytes(data)
    result = subprocess.run(["tar", "-tvf", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # GNU tar warns on unknown PAX keywords: none expected
    return result.stdout


SPEC: dict[str, str | bytes | None] = {
    "etc/": None,
    "etc/passwd": "root:x:0:0::/root:/bin/sh\n",
    "etc/os-release": "ID=debian\n",
    "a.b": "dot",
    "a-b": "dash",
    "a/": None,
    "a/z": "z",
    "usr/bin/": None,
    "usr/bin/tool": b"\x7fELF" + bytes(range(256)) * 40,
    "bin@": "usr/bin",
    "empty": b"",
    "x" * 120: "long name",
    "d/" + "y" * 90 + "/" + "z" * 90: "long path",
    "caf\u00e9": "utf-8 name",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = build(tmp_path / "tree", SPEC)
    os.link(root / "etc/passwd", root / "usr/bin/hardlink")
    os.mkfifo(root / "fifo")
    os.setxattr(root / "etc/os-release", "user.note", b"\x00\xffbinary")
    stamp(root, EPOCH)
    return root


# -- writing -----------------------------------------------------------------------------


def test_same_tree_same_bytes(tree: Path, tmp_path: Path) -> None:
    first, second = tar_of(tree), tar_of(tree)
    assert first == second
    out = layers.HashingWriter(io.BytesIO())
    layers.write_tree_tar(tree, out, mtime=None)
    assert out.digest == "sha256:" + hashlib.sha256(first).hexdigest()
    assert out.size == len(first)


def test_big_files_sent_by_the_kernel_give_the_same_bytes(tree: Path, tmp_path: Path) -> None:
    # Into a real file, files from 64 KiB on go through sendfile(2) between buffered
    # headers: the stream must be byte for byte the one written through Python.
    (tree / "big").write_bytes(os.urandom(200_003))
    (tree / "small-after").write_text("after\n")
    stamp(tree, EPOCH)
    expected = tar_of(tree)
    with open(tmp_path / "out.tar", "wb") as f:
        layers.write_tree_tar(tree, f, mtime=None)
    assert (tmp_path / "out.tar").read_bytes() == expected
    with tarfile.open(tmp_path / "out.tar") as written:
        member = written.extractfile("big")
        assert member is not None and member.read() == (tree / "big").read_bytes()
    # An output sendfile refuses (O_APPEND: EINVAL) gets the same bytes the other way.
    with open(tmp_path / "appended.tar", "ab") as f:
        layers.write_tree_tar(tree, f, mtime=None)
    assert (tmp_path / "appended.tar").read_bytes() == expected


def test_mtimes_are_clamped(tree: Path) -> None:
    reference = tar_of(tree, mtime=EPOCH)
    stamp(tree, EPOCH + 5000)
    assert tar_of(tree, mtime=EPOCH) == reference
    assert tar_of(tree) != reference
    stamp(tree, EPOCH - 10)  # older than the clamp: kept
    assert {m.mtime for m in tar_members(tar_of(tree, mtime=EPOCH))} == {EPOCH - 10}


def test_canonical_format(tree: Path, tmp_path: Path) -> None:
    data = tar_of(tree)
    listed = names(data)
    assert listed[:3] == ["a-b", "a.b", "a/"]  # bytewise: '-' < '.' < '/'
    assert listed.index("a/") < listed.index("a/z") < listed.index("bin")
    assert "etc/" in listed and not any(n.startswith(("./", "/")) for n in listed)
    assert "tree" not in " ".join(listed)  # the root itself is not an entry
    for member in tar_members(data):
        assert member.uname == "" and member.gname == ""
        assert set(member.pax_headers) <= {"path", "SCHILY.xattr.user.note"}
    assert len(data) % 512 == 0 and data.endswith(bytes(1024))
    listing = gnu_tar_list(data, tmp_path)
    assert "x" * 120 in listing and "caf\u00e9" in listing


def test_entry_types(tree: Path) -> None:
    by_name = {m.name: m for m in tar_members(tar_of(tree))}
    assert by_name["bin"].issym() and by_name["bin"].linkname == "usr/bin"
    assert by_name["fifo"].isfifo()
    assert by_name["etc/passwd"].isreg()
    link = by_name["usr/bin/hardlink"]
    assert link.islnk() and link.linkname == "etc/passwd"  # first in order is the file
    assert (
        by_name["etc/os-release"]
        .pax_headers["SCHILY.xattr.user.note"]
        .encode("utf-8", "surrogateescape")
        == b"\x00\xffbinary"
    )


def test_sockets_are_skipped(tmp_path: Path) -> None:
    import socket

    root = build(tmp_path / "t", {"f": "x"})
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(os.fspath(root / "sock"))
        assert names(tar_of(root)) == ["f"]


def test_exclude_drops_subtrees(tree: Path) -> None:
    out = io.BytesIO()
    layers.write_tree_tar(tree, out, mtime=None, exclude=lambda p: p in ("etc", "a.b"))
    listed = names(out.getvalue())
    assert not any(n.startswith("etc") for n in listed) and "a.b" not in listed
    # etc/passwd was excluded, so its other name now carries the content.
    assert next(m for m in tar_members(out.getvalue()) if m.name == "usr/bin/hardlink").isreg()


def test_round_trip_through_extract(tree: Path, tmp_path: Path) -> None:
    data = tar_of(tree)
    copy = apply(tmp_path / "copy", data)
    assert snapshot(copy) == snapshot(tree)
    assert tar_of(copy) == data
    assert os.stat(copy / "usr/bin/hardlink").st_ino == os.stat(copy / "etc/passwd").st_ino


def test_gnu_tar_extracts_what_we_write(tree: Path, tmp_path: Path) -> None:
    data = tar_of(tree)
    (tmp_path / "t.tar").write_bytes(data)
    (tmp_path / "gnu").mkdir()
    subprocess.run(
        [
            "tar",
            "--xattrs",
            "--xattrs-include=user.*",
            "-xf",
            tmp_path / "t.tar",
            "-C",
            tmp_path / "gnu",
        ],
        check=True,
    )
    assert snapshot(tmp_path / "gnu") == snapshot(tree)


@pytest.mark.parametrize("fmt", ["posix", "gnu"])
def test_reads_gnu_tar_output(fmt: str, tree: Path, tmp_path: Path) -> None:
    xattrs = ["--xattrs", "--xattrs-include=user.*"]
    if fmt == "gnu":  # GNU long names instead of PAX, and no xattrs
        os.removexattr(tree / "etc/os-release", "user.note")
        xattrs = []
    result = subprocess.run(
        ["tar", "-C", tree, *xattrs, f"--format={fmt}", "-cf", "-", "."],
        capture_output=True,
        check=True,
    )
    copy = apply(tmp_path / "copy", result.stdout)
    assert snapshot(copy) == snapshot(tree)


# -- overlay diffs -----------------------------------------------------------------------


def whiteout(path: Path) -> None:
    os.mknod(path, stat.S_IFCHR | 0o000, os.makedev(0, 0))


def test_overlay_diff(tmp_path: Path) -> None:
    upper = build(
        tmp_path / "upper",
        {
            "etc/": None,
            "etc/new": "n",
            "opq/": None,
            "opq/kept": "k",
            "-first": "sorts before .wh.",
        },
    )
    whiteout(upper / "etc/gone")
    whiteout(upper / "gonedir")
    os.setxattr(upper / "opq", "user.overlay.opaque", b"y")
    os.setxattr(upper / "etc", "user.overlay.origin", b"whatever")
    stamp(upper, EPOCH)
    data = tar_of(upper, diff=True)
    # Whiteouts first among their siblings (even before "-first"), the opaque marker right
    # after its directory.
    assert names(data) == [
        ".wh.gonedir",
        "-first",
        "etc/",
        "etc/.wh.gone",
        "etc/new",
        "opq/",
        "opq/.wh..wh..opq",
        "opq/kept",
    ]
    for member in tar_members(data):
        assert not any("overlay" in key for key in member.pax_headers)
        if ".wh." in member.name:
            assert member.isreg() and member.size == 0
    assert tar_of(upper, diff=True) == data


def test_overlay_diff_refuses_redirects(tmp_path: Path) -> None:
    upper = build(tmp_path / "upper", {"moved/": None})
    os.setxattr(upper / "moved", "user.overlay.redirect", b"/old")
    with pytest.raises(LayerError, match="redirect_dir=off,metacopy=off"):
        tar_of(upper, diff=True)


# -- applying whiteouts ------------------------------------------------------------------


LOWER = {
    "a": "a",
    "keep": "k",
    "d/": None,
    "d/x": "x",
    "d/sub/": None,
    "d/sub/y": "y",
    "e/": None,
    "e/f": "f",
}


def test_whiteouts_flatten_onto_a_directory(tmp_path: Path) -> None:
    dest = build(tmp_path / "dest", LOWER)
    layer = crafted_tar(
        ("./.wh.a", tarfile.REGTYPE, {}),  # "./": dropped
        ("d/", tarfile.DIRTYPE, {}),
        ("d/new", tarfile.REGTYPE, {"data": b"new"}),
        ("d/.wh..wh..opq", tarfile.REGTYPE, {}),  # after d/new: spares it
        ("e/.wh.f", tarfile.REGTYPE, {}),
        (".wh..wh.plnk", tarfile.REGTYPE, {}),
    )  # aufs bookkeeping: ignored
    apply(dest, layer)
    assert sorted(snapshot(dest)) == ["d", "d/new", "e", "keep"]


def test_whiteout_and_entry_in_one_layer(tmp_path: Path) -> None:
    dest = build(tmp_path / "dest", LOWER)
    # "d" deleted then recreated by this layer: only the new content remains, in any order.
    apply(
        dest,
        crafted_tar(
            ("d/", tarfile.DIRTYPE, {}),
            ("d/n", tarfile.REGTYPE, {}),
            (".wh.d", tarfile.REGTYPE, {}),
        ),
    )
    assert sorted(p for p in snapshot(dest) if p.startswith("d")) == ["d", "d/n"]


def test_entries_replace_existing_paths(tmp_path: Path) -> None:
    dest = build(tmp_path / "dest", LOWER)
    apply(
        dest,
        crafted_tar(
            ("d", tarfile.REGTYPE, {"data": b"now a file"}),
            ("a/", tarfile.DIRTYPE, {}),
            ("keep", tarfile.SYMTYPE, {"linkname": "/etc/hostname"}),
        ),
    )
    assert (dest / "d").read_bytes() == b"now a file"
    assert (dest / "a").is_dir() and os.readlink(dest / "keep") == "/etc/hostname"


# -- flattening --------------------------------------------------------------------------


def sequential(tmp_path: Path, *tars: bytes) -> bytes:
    return tar_of(apply(tmp_path / f"seq{len(os.listdir(tmp_path))}", *tars))


def test_flatten_equals_sequential_extraction(tmp_path: Path) -> None:
    base = tar_of(
        build(tmp_path / "l1", {**LOWER, "p": "file", "h": "old", "opq/": None, "opq/old": "o"})
    )
    top = crafted_tar(
        (".wh.a", tarfile.REGTYPE, {}),
        ("d/", tarfile.DIRTYPE, {}),
        ("d/.wh.x", tarfile.REGTYPE, {}),
        ("e", tarfile.REGTYPE, {"data": b"file replaces dir"}),
        ("p/", tarfile.DIRTYPE, {}),
        ("p/q", tarfile.REGTYPE, {"data": b"q"}),
        ("h", tarfile.REGTYPE, {"data": b"new"}),
        ("opq/", tarfile.DIRTYPE, {}),
        ("opq/.wh..wh..opq", tarfile.REGTYPE, {}),
        ("opq/fresh", tarfile.REGTYPE, {"data": b"f"}),
    )
    merged = flat(base, top)
    assert flat(base, top) == merged
    listed = names(merged)
    assert not any(".wh." in n for n in listed)
    assert {"a", "d/x", "e/", "e/f", "opq/old"}.isdisjoint(listed)
    assert snapshot(apply(tmp_path / "m", merged)) == snapshot(apply(tmp_path / "s", base, top))


def test_flatten_of_one_layer_is_that_layer(tree: Path) -> None:
    data = tar_of(tree)
    assert flat(data) == data
    assert names(flat(data, mtime=EPOCH - 1)) == names(data)
    assert {m.mtime for m in tar_members(flat(data, mtime=EPOCH - 1))} == {EPOCH - 1}


def test_flatten_root_opaque_hides_everything_below(tmp_path: Path) -> None:
    base = tar_of(build(tmp_path / "l1", LOWER))
    top = crafted_tar((".wh..wh..opq", tarfile.REGTYPE, {}), ("only", tarfile.REGTYPE, {}))
    assert names(flat(base, top)) == ["only"]


def test_flatten_keeps_hardlinks_whose_target_was_replaced(tmp_path: Path) -> None:
    root = build(tmp_path / "l1", {"f": "original", "z": "z"})
    os.link(root / "f", root / "g")
    os.link(root / "f", root / "h")
    base = tar_of(root)
    for top in (
        crafted_tar((".wh.f", tarfile.REGTYPE, {})),
        crafted_tar(("f", tarfile.REGTYPE, {"data": b"replaced"})),
    ):
        merged = flat(base, top)
        out = apply(tmp_path / f"m{len(os.listdir(tmp_path))}", merged)
        assert (out / "g").read_bytes() == (out / "h").read_bytes() == b"original"
        assert os.stat(out / "g").st_ino == os.stat(out / "h").st_ino
        assert snapshot(out) == snapshot(
            apply(tmp_path / f"s{len(os.listdir(tmp_path))}", base, top)
        )


def test_flatten_cross_layer_hardlink(tmp_path: Path) -> None:
    base = tar_of(build(tmp_path / "l1", {"f": "lower"}))
    top = crafted_tar(("g", tarfile.LNKTYPE, {"linkname": "f"}))
    merged = flat(base, top)
    out = apply(tmp_path / "m", merged)
    assert os.stat(out / "g").st_ino == os.stat(out / "f").st_ino
    with pytest.raises(LayerError, match="hardlink g -> nothere"):
        flat(base, crafted_tar(("g", tarfile.LNKTYPE, {"linkname": "nothere"})))


# -- hostile input -----------------------------------------------------------------------


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    victim = build(tmp_path / "outside", {"victim": "precious", "sub/": None, "sub/v": "v"})
    return victim


def assert_untouched(outside: Path) -> None:
    assert sorted(snapshot(outside)) == ["sub", "sub/v", "victim"]
    assert (outside / "victim").read_text() == "precious"


HOSTILE: dict[str, tuple[list[Entry], str]] = {
    "dotdot": (
        [("../../outside/victim", tarfile.REGTYPE, {"data": b"pwned"})],
        "'..' is not allowed",
    ),
    "symlink-then-write": (
        [
            ("a", tarfile.SYMTYPE, {"linkname": "OUTSIDE"}),
            ("a/victim", tarfile.REGTYPE, {"data": b"pwned"}),
        ],
        "a is a symlink: refusing to write through it",
    ),
    "symlink-then-dir": (
        [("a", tarfile.SYMTYPE, {"linkname": "OUTSIDE"}), ("a/sub/", tarfile.DIRTYPE, {})],
        "a is a symlink",
    ),
    "symlink-then-whiteout": (
        [("a", tarfile.SYMTYPE, {"linkname": "OUTSIDE"}), ("a/.wh.victim", tarfile.REGTYPE, {})],
        "a is a symlink",
    ),
    "symlink-then-opaque": (
        [("a", tarfile.SYMTYPE, {"linkname": "OUTSIDE"}), ("a/.wh..wh..opq", tarfile.REGTYPE, {})],
        "a is a symlink",
    ),
    "hardlink-absolute": (
        [("shadow", tarfile.LNKTYPE, {"linkname": "/etc/shadow"})],
        "hardlink target '/etc/shadow': absolute names are not allowed",
    ),
    "hardlink-missing": (
        [("shadow", tarfile.LNKTYPE, {"linkname": "etc/shadow"})],
        "hardlink target etc/shadow does not exist",
    ),
    "absolute": (
        [("/etc/", tarfile.DIRTYPE, {}), ("/etc/motd", tarfile.REGTYPE, {})],
        "'/etc': absolute names are not allowed",
    ),
    "hardlink-dotdot": (
        [("v", tarfile.LNKTYPE, {"linkname": "../outside/victim"})],
        "'..' is not allowed",
    ),
    "hardlink-through-symlink": (
        [
            ("a", tarfile.SYMTYPE, {"linkname": "OUTSIDE"}),
            ("v", tarfile.LNKTYPE, {"linkname": "a/victim"}),
        ],
        "a is a symlink",
    ),
    "device": (
        [("null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3})],
        "device nodes are not allowed",
    ),
    "whiteout-dotdot": ([(".wh...", tarfile.REGTYPE, {})], "not a valid whiteout name"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_tars_are_refused(case: str, tmp_path: Path, outside: Path) -> None:
    entries, message = HOSTILE[case]
    resolved = [
        (n, k, {key: (str(outside) if v == "OUTSIDE" else v) for key, v in a.items()})
        for n, k, a in entries
    ]
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(LayerError, match=message) as caught:
        layers.extract(io.BytesIO(crafted_tar(*resolved)), dest, overlay=False, allow_devices=False)
    assert "\n" not in str(caught.value)
    assert_untouched(outside)


def test_dot_slash_names_land_inside(tmp_path: Path) -> None:
    dest = apply(
        tmp_path / "dest",
        crafted_tar(
            ("./", tarfile.DIRTYPE, {}),
            ("./etc/", tarfile.DIRTYPE, {}),
            ("./etc/motd", tarfile.REGTYPE, {"data": b"hi"}),
        ),
    )
    assert (dest / "etc/motd").read_bytes() == b"hi"


def test_symlinks_may_point_anywhere(tmp_path: Path) -> None:
    dest = apply(
        tmp_path / "dest",
        crafted_tar(
            ("abs", tarfile.SYMTYPE, {"linkname": "/etc"}),
            ("up", tarfile.SYMTYPE, {"linkname": "../../x"}),
        ),
    )
    assert os.readlink(dest / "abs") == "/etc" and os.readlink(dest / "up") == "../../x"


def test_replacing_a_symlink_does_not_follow_it(tmp_path: Path, outside: Path) -> None:
    dest = apply(
        tmp_path / "dest",
        crafted_tar(("victim", tarfile.SYMTYPE, {"linkname": str(outside / "victim")})),
    )
    apply(dest, crafted_tar(("victim", tarfile.REGTYPE, {"data": b"replaced"})))
    assert (dest / "victim").read_bytes() == b"replaced" and not (dest / "victim").is_symlink()
    apply(
        dest,
        crafted_tar(
            ("lnk", tarfile.SYMTYPE, {"linkname": str(outside)}), (".wh.lnk", tarfile.REGTYPE, {})
        ),
    )
    apply(dest, crafted_tar((".wh.lnk", tarfile.REGTYPE, {})))  # deletes the link, not its target
    assert not os.path.lexists(dest / "lnk")
    assert_untouched(outside)


def test_truncated_tar(tree: Path, tmp_path: Path) -> None:
    data = tar_of(tree)
    cut = data.index(b"\x7fELF") + 1000  # inside usr/bin/tool's content
    with pytest.raises(LayerError, match="layer entry 'usr/bin/tool': unexpected end of data"):
        apply(tmp_path / "dest", data[:cut])


def test_clean_name() -> None:
    assert layers.clean_name("./etc//passwd") == "etc/passwd"
    assert layers.clean_name(".") == "" and layers.clean_name("./") == ""
    with pytest.raises(LayerError, match=re.escape("'a/../b'")):
        layers.clean_name("a/../b")
    for name in ("/", "/etc/passwd", "//x"):
        with pytest.raises(LayerError, match="absolute names are not allowed"):
            layers.clean_name(name)
    with pytest.raises(LayerError, match="a NUL byte"):
        layers.clean_name("a\0b")
