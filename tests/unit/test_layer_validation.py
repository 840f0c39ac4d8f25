"""The one layer check (EntryCheck) and its users: validate_layer, the Extractor and the
Flattener. Table tests of each rule, non-UTF-8 names, and hypothesis properties: generated
names with "..", absolute paths, arbitrary bytes, nestings, symlinks and hardlinks with
generated targets never make extraction or flattening write outside the root, and nothing
fails with anything but a LayerError."""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import re
import stat
import tarfile
import tempfile
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sysbake.errors import LayerError
from sysbake.oci import model as oci
from sysbake.oci.layers import archive as layers
from tests.unit.conftest import EPOCH, Entry, crafted_tar, flat


def validate(data: bytes, **kw: object) -> None:
    layers.validate_layer(io.BytesIO(data), "layer sha256:feed", **kw)  # type: ignore[arg-type]


def info(name: str, kind: bytes = tarfile.REGTYPE, **attrs: object) -> tarfile.TarInfo:
    entry = tarfile.TarInfo(name)
    entry.type = kind
    for key, value in attrs.items():
        setattr(entry, key, value)
    return entry


# -- the rules ---------------------------------------------------------------------------

REFUSED: dict[str, tuple[list[tarfile.TarInfo], str]] = {
    "dotdot": ([info("a/../../x")], "'..' is not allowed"),
    "absolute": ([info("/etc/x")], "absolute names are not allowed"),
    "nul": ([info("a\0b")], "a NUL byte"),
    "through-symlink": (
        [info("a", tarfile.SYMTYPE, linkname="/etc"), info("a/passwd")],
        "a is a symlink: refusing to write through it",
    ),
    "through-nested-symlink": (
        [
            info("d", tarfile.DIRTYPE),
            info("d/l", tarfile.SYMTYPE, linkname="/"),
            info("d/l/x/y", tarfile.DIRTYPE),
        ],
        "d/l is a symlink",
    ),
    "whiteout-through-symlink": (
        [info("a", tarfile.SYMTYPE, linkname="/etc"), info("a/.wh.passwd")],
        "a is a symlink",
    ),
    "hardlink-absolute": (
        [info("x", tarfile.LNKTYPE, linkname="/etc/shadow")],
        "hardlink target '/etc/shadow': absolute names are not allowed",
    ),
    "hardlink-dotdot": (
        [info("x", tarfile.LNKTYPE, linkname="../etc/shadow")],
        "'..' is not allowed",
    ),
    "hardlink-through-symlink": (
        [
            info("a", tarfile.SYMTYPE, linkname="/etc"),
            info("x", tarfile.LNKTYPE, linkname="a/shadow"),
        ],
        "a is a symlink",
    ),
    "hardlink-to-itself": ([info("x", tarfile.LNKTYPE, linkname="./x")], "invalid hardlink target"),
    "hardlink-to-a-directory": (
        [info("d", tarfile.DIRTYPE), info("x", tarfile.LNKTYPE, linkname="d")],
        "hardlink target d is a directory",
    ),
    "block-device": (
        [info("sda", tarfile.BLKTYPE, devmajor=8, devminor=0)],
        "block device 8:0 is not allowed",
    ),
    "mem-device": (
        [info("mem", tarfile.CHRTYPE, devmajor=1, devminor=1)],
        "character device 1:1 is not allowed",
    ),
    "overlay-whiteout-device": (
        [info("gone", tarfile.CHRTYPE, devmajor=0, devminor=0)],
        "character device 0:0",
    ),
    "whiteout-dotdot": (
        [
            info(".wh..."),
        ],
        "not a valid whiteout name",
    ),
    "symlink-nul": ([info("l", tarfile.SYMTYPE, linkname="a\0b")], "a NUL byte"),
    "uid": ([info("x", uid=-1)], "uid -1 is out of range"),
    "gid": ([info("x", gid=2**32 - 1)], "gid 4294967295 is out of range"),
    "mtime-nan": ([info("x", mtime=float("nan"))], "mtime nan is out of range"),
    "mtime-inf": ([info("x", mtime=float("inf"))], "mtime inf is out of range"),
    "sparse": ([info("x", tarfile.GNUTYPE_SPARSE)], "unsupported tar entry type"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_entry_check_refuses(case: str) -> None:
    entries, problem = REFUSED[case]
    check = layers.EntryCheck()
    with pytest.raises(LayerError, match=problem) as caught:
        for entry in entries:
            check.entry(entry)
    assert str(caught.value).startswith(f"layer entry {entries[-1].name!r}: ")


ACCEPTED: dict[str, list[tarfile.TarInfo]] = {
    "symlinks-anywhere": [
        info("abs", tarfile.SYMTYPE, linkname="/etc/shadow"),
        info("up", tarfile.SYMTYPE, linkname="../../../x"),
    ],
    "symlink-replaced-by-a-dir": [
        info("a", tarfile.SYMTYPE, linkname="/etc"),
        info("a", tarfile.DIRTYPE),
        info("a/x"),
    ],
    "hardlink-to-a-symlink": [
        info("l", tarfile.SYMTYPE, linkname="/etc/shadow"),
        info("h", tarfile.LNKTYPE, linkname="l"),
    ],
    "hardlink-to-a-lower-layer": [info("h", tarfile.LNKTYPE, linkname="usr/bin/x")],
    "dir-replaced-by-a-file": [
        info("d", tarfile.DIRTYPE),
        info("d"),
        info("h", tarfile.LNKTYPE, linkname="d"),
    ],
    "standard-devices": [
        info(f"dev/{name}", tarfile.CHRTYPE, devmajor=major, devminor=minor)
        for (major, minor), name in layers.STANDARD_DEVICES.items()
    ],
    "setuid": [info("bin/su", mode=0o4755), info("bin/wall", mode=0o2755)],
    "dot-slash": [info("./", tarfile.DIRTYPE), info("./etc//x")],
    "whiteouts": [info(".wh.a"), info("d/.wh..wh..opq"), info(".wh..wh.plnk.1")],
    "non-utf8": [info(os.fsdecode(b"\xff\xfe/\xc3"))],
    "old-mtime": [info("x", mtime=-(10**9))],
}


@pytest.mark.parametrize("case", sorted(ACCEPTED))
def test_entry_check_accepts(case: str) -> None:
    check = layers.EntryCheck()
    for entry in ACCEPTED[case]:
        check.entry(entry)


def test_devices_can_be_refused_altogether() -> None:
    with pytest.raises(LayerError, match="device nodes are not allowed"):
        layers.EntryCheck(allow_devices=False).entry(
            info("null", tarfile.CHRTYPE, devmajor=1, devminor=3)
        )


# -- validate_layer ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,problem",
    [
        (b"", "not a valid tar (empty file)"),
        (b"no tar here" * 100, "not a valid tar"),
        (
            crafted_tar(("a", tarfile.REGTYPE, {"data": b"x" * 2000}))[:1000],
            "unexpected end of data",
        ),
    ],
)
def test_validate_refuses_what_is_not_a_tar(data: bytes, problem: str) -> None:
    with pytest.raises(LayerError, match=f"^layer sha256:feed: .*{re.escape(problem)}"):
        validate(data)


def test_validate_names_the_layer_and_the_entry() -> None:
    data = crafted_tar(("ok", tarfile.REGTYPE, {}), ("../../etc/cron.d/x", tarfile.REGTYPE, {}))
    with pytest.raises(LayerError) as caught:
        validate(data)
    assert str(caught.value) == (
        "layer sha256:feed: layer entry '../../etc/cron.d/x': '..' is not allowed in a path"
    )


def test_validate_checks_the_diff_id_over_every_byte() -> None:
    data = crafted_tar(("a", tarfile.REGTYPE, {"data": b"1"}))
    validate(data, diff_id=oci.sha256_digest(data))
    validate(bytes(1024))  # an empty layer
    with pytest.raises(LayerError, match="not to its diff_id"):
        validate(data + bytes(512), diff_id=oci.sha256_digest(data))


def test_validate_refuses_what_extraction_refuses(tmp_path: Path) -> None:
    tested = []
    for case, (entries, problem) in REFUSED.items():
        if case == "sparse":
            continue  # tarfile writes no sparse headers
        data = io.BytesIO()
        with tarfile.open(
            fileobj=data,
            mode="w",
            format=tarfile.PAX_FORMAT,
            encoding="utf-8",
            errors="surrogateescape",
        ) as tf:
            for entry in entries:
                entry = copy.copy(entry)
                if not math.isfinite(entry.mtime):  # tarfile writes these as PAX records
                    entry.pax_headers = {"mtime": str(entry.mtime)}
                    entry.mtime = 0
                tf.addfile(entry)
        raw = data.getvalue()
        with contextlib.suppress(LayerError):
            validate(raw)
            continue  # tarfile could not write what the case needs
        dest = tmp_path / case
        dest.mkdir()
        with pytest.raises(LayerError, match=problem):
            layers.extract(io.BytesIO(raw), dest, overlay=True)
        with pytest.raises(LayerError, match=problem):
            flat(raw)
        tested.append(case)
    assert sorted(set(REFUSED) - set(tested)) == ["nul", "sparse", "symlink-nul"]


# -- flattening --------------------------------------------------------------------------


def test_flatten_names_the_layer() -> None:
    good = crafted_tar(("a", tarfile.REGTYPE, {}))
    bad = crafted_tar(("/etc/passwd", tarfile.REGTYPE, {}))
    with pytest.raises(LayerError, match=r"^layer 2 of 3: layer entry '/etc/passwd': absolute"):
        flat(good, bad, good)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.REGTYPE])
def test_flatten_refuses_a_lower_file_that_an_upper_layer_writes_into(kind: bytes) -> None:
    lower = crafted_tar(("etc", kind, {"linkname": "/etc"} if kind == tarfile.SYMTYPE else {}))
    upper = crafted_tar(("etc/cron.d/evil", tarfile.REGTYPE, {"data": b"* * * * * root sh"}))
    with pytest.raises(
        LayerError,
        match=r"layer 1 of 2: layer entry 'etc': a .*, but an "
        "upper layer writes into it as a directory",
    ):
        flat(lower, upper)
    # With the directory itself in the upper layer (as real diffs have it), it replaces
    # the lower symlink: nothing is written through it.
    upper = crafted_tar(("etc", tarfile.DIRTYPE, {}), ("etc/x", tarfile.REGTYPE, {}))
    with tarfile.open(fileobj=io.BytesIO(flat(lower, upper))) as tf:
        assert [(m.name, m.type) for m in tf] == [
            ("etc", tarfile.DIRTYPE),
            ("etc/x", tarfile.REGTYPE),
        ]


# -- names that are not UTF-8 ------------------------------------------------------------

ODD = [b"caf\xe9", b"\xff\xfe", b"\xc3(", b"\xed\xa0\x80", b"x" * 120 + b"\xff", b"\x80/\x81"]


def test_non_utf8_names_round_trip(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    broot = os.fsencode(root)
    for raw in ODD:
        path = os.path.join(broot, raw)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(raw)
    os.symlink(b"target-\xff", os.path.join(broot, b"link\xfe"))
    os.link(os.path.join(broot, b"caf\xe9"), os.path.join(broot, b"hard\xe9"))
    out = io.BytesIO()
    layers.write_tree_tar(root, out, mtime=EPOCH)
    data = out.getvalue()
    validate(data, diff_id=oci.sha256_digest(data))
    assert flat(data) == data and flat(data, data) == data
    copy = tmp_path / "copy"
    copy.mkdir()
    layers.extract(io.BytesIO(data), copy, overlay=False)
    bcopy = os.fsencode(copy)
    for raw in ODD:
        with open(os.path.join(bcopy, raw), "rb") as f:
            assert f.read() == raw
    assert os.readlink(os.path.join(bcopy, b"link\xfe")) == b"target-\xff"
    again = io.BytesIO()
    layers.write_tree_tar(copy, again, mtime=EPOCH)
    assert again.getvalue() == data


def test_foreign_non_utf8_names_extract_byte_exact(tmp_path: Path) -> None:
    names = [os.fsdecode(raw) for raw in (b"\xff", b"d\xe9/", b"d\xe9/f\x80")]
    data = crafted_tar(
        (names[0], tarfile.REGTYPE, {"data": b"1"}),
        (names[1], tarfile.DIRTYPE, {}),
        (names[2], tarfile.REGTYPE, {}),
    )
    layers.extract(io.BytesIO(data), tmp_path, overlay=True)
    assert sorted(os.listdir(os.fsencode(tmp_path))) == [b"d\xe9", b"\xff"]
    assert os.listdir(os.path.join(os.fsencode(tmp_path), b"d\xe9")) == [b"f\x80"]


# -- properties --------------------------------------------------------------------------

VICTIMS = {b"victim": b"precious", b"sub/v": b"v"}
_COMPONENTS = st.one_of(
    st.sampled_from(
        ["..", ".", "", "a", "b", "etc", "OUT", ".wh.a", ".wh..wh..opq", ".wh...", ".wh.", "a\0b"]
    ),
    st.binary(min_size=1, max_size=5)
    .filter(lambda b: b"/" not in b and b"\0" not in b)
    .map(os.fsdecode),
)
_NAMES = st.builds(
    lambda lead, parts: lead + "/".join(parts),
    st.sampled_from(["", "", "./", "/", "//"]),
    st.lists(_COMPONENTS, min_size=1, max_size=4),
)
_TARGETS = st.one_of(
    _NAMES,
    st.sampled_from(
        ["OUTSIDE", "OUTSIDE/victim", "OUTSIDE/sub", "../outside/victim", "../../outside/sub/v"]
    ),
)
_DEVICES = st.sampled_from([(1, 3), (1, 1), (0, 0), (8, 0), (5, 2)])


@st.composite
def _entries(draw: st.DrawFn) -> list[Entry]:
    entries: list[Entry] = []
    for _ in range(draw(st.integers(1, 8))):
        name = draw(_NAMES)
        kind = draw(
            st.sampled_from(
                [
                    tarfile.REGTYPE,
                    tarfile.DIRTYPE,
                    tarfile.SYMTYPE,
                    tarfile.LNKTYPE,
                    tarfile.FIFOTYPE,
                    tarfile.CHRTYPE,
                    tarfile.BLKTYPE,
                ]
            )
        )
        attrs: dict[str, object] = {"mode": draw(st.sampled_from([0o644, 0o4755, 0o000]))}
        if kind == tarfile.REGTYPE:
            attrs["data"] = draw(st.binary(max_size=16))
        elif kind in (tarfile.SYMTYPE, tarfile.LNKTYPE):
            attrs["linkname"] = draw(_TARGETS)
        elif kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
            attrs["devmajor"], attrs["devminor"] = draw(_DEVICES)
        entries.append((name, kind, attrs))
    return entries


@contextlib.contextmanager
def _sandbox() -> Iterator[tuple[Path, Path]]:
    """(dest, outside): an empty root four levels down a private directory (so that up to
    four ".." stay in it) and, beside it, planted files it must not touch."""
    with tempfile.TemporaryDirectory(prefix="lay-prop-") as top:
        base = Path(top) / "l1" / "l2" / "l3"
        outside = base / "outside"
        for rel, content in VICTIMS.items():
            path = os.path.join(os.fsencode(outside), rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(content)
        dest = base / "dest"
        dest.mkdir()
        yield dest, outside


def _unprivileged(run: Callable[[], None]) -> None:
    """Run `run` in a child process as nobody when we are root: should a regression let a
    layer escape its root, it harms only the child's own sandbox, never the host's files."""
    if os.geteuid() != 0:
        run()
        return
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            run()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the property failed: see the output"


def _resolve(entries: list[Entry], outside: Path) -> bytes:
    """The tar of `entries`, with OUTSIDE made the planted directory's absolute path (and
    OUT that path without its "/": an absolute name then aims at the planted files)."""

    def fix(value: str) -> str:
        return (
            value.replace("OUTSIDE", str(outside))
            if value.startswith("OUTSIDE")
            else value.replace("OUT", str(outside).lstrip("/"))
        )

    return crafted_tar(
        *[
            (fix(n), k, {key: fix(v) if isinstance(v, str) else v for key, v in a.items()})
            for n, k, a in entries
        ]
    )


def _state(dest: Path) -> list[tuple[bytes, int, int, bytes]]:
    """Everything in the sandbox but `dest`: names, types, modes, link counts, content."""
    found = []
    top = os.fsencode(dest.parents[3])
    for where, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if os.path.join(where, d) != os.fsencode(dest)]
        for name in dirs + files:
            path = os.path.join(where, name)
            st_ = os.lstat(path)
            body = b""
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    body = f.read()
            found.append((path, st_.st_mode, st_.st_nlink, body))
    return sorted(found)


_PROPERTY = settings(
    max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@_PROPERTY
@given(st.lists(_entries(), min_size=1, max_size=2), st.booleans())
def _extraction_stays_inside(layer_list: list[list[Entry]], overlay: bool) -> None:
    with _sandbox() as (dest, outside):
        before = _state(dest)
        for data in [_resolve(entries, outside) for entries in layer_list]:
            refused = None
            try:
                validate(data)
            except LayerError as exc:
                refused = exc
            try:
                layers.extract(io.BytesIO(data), dest, overlay=overlay)
            except LayerError:
                pass
            else:
                # One check for both: what validation refuses, extraction refuses too.
                assert refused is None, f"extracted what validation refused: {refused}"
        assert _state(dest) == before


def test_extraction_never_escapes_nor_crashes() -> None:
    _unprivileged(_extraction_stays_inside)


@_PROPERTY
@given(st.lists(_entries(), min_size=1, max_size=3))
def _flattening_stays_inside(layer_list: list[list[Entry]]) -> None:
    with _sandbox() as (dest, outside):
        before = _state(dest)
        try:
            merged = flat(*[_resolve(entries, outside) for entries in layer_list])
        except LayerError:
            return
        # The merged tar passes the same check, and extracting it stays inside.
        validate(merged)
        with contextlib.suppress(LayerError):
            layers.extract(io.BytesIO(merged), dest, overlay=False)
        assert _state(dest) == before


def test_flattening_never_escapes_nor_crashes() -> None:
    _unprivileged(_flattening_stays_inside)


@_PROPERTY
@given(st.binary(max_size=3000), st.integers(0, 3000), st.binary(min_size=1, max_size=8))
def _damage_is_a_layer_error(noise: bytes, at: int, patch: bytes) -> None:
    good = crafted_tar(
        ("d", tarfile.DIRTYPE, {}),
        ("d/f", tarfile.REGTYPE, {"data": b"x" * 700}),
        ("l", tarfile.SYMTYPE, {"linkname": "d/f"}),
        ("h", tarfile.LNKTYPE, {"linkname": "d/f"}),
    )
    at = min(at, len(good))
    for data in (noise, good[:at] + patch + good[at + len(patch) :], good[:at]):
        with contextlib.suppress(LayerError):
            validate(data)
        with _sandbox() as (dest, _), contextlib.suppress(LayerError):
            before = _state(dest)
            layers.extract(io.BytesIO(data), dest, overlay=False)
            assert _state(dest) == before
        with contextlib.suppress(LayerError):
            flat(data)


def test_damaged_tars_fail_only_with_a_layer_error() -> None:
    _unprivileged(_damage_is_a_layer_error)
