"""sysbake.rootfs: paths resolve inside the root as a chrooted process would see them,
and nothing a tree's symlinks aim at outside it is ever read, written or removed."""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sysbake.rootfs import ImageTreeError, Root


def _fingerprint(top: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(dirpath, name)
            if path.is_symlink():
                out[str(path)] = "-> " + os.readlink(path)
            elif path.is_file():
                out[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                out[str(path)] = oct(path.lstat().st_mode)
    return out


def _outside(tmp: Path) -> Path:
    host = tmp / "host"
    (host / "dir").mkdir(parents=True)
    (host / "file").write_bytes(b"host\n")
    (host / "dir" / "inner").write_bytes(b"inner\n")
    return host


def test_absolute_and_climbing_links_resolve_inside(tmp_path: Path) -> None:
    host = _outside(tmp_path)
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    os.symlink(str(host / "file"), root / "etc/abs")
    os.symlink("../../../../../../" + str(host).lstrip("/") + "/file", root / "etc/up")
    with Root(root) as r:
        inner = str(host).lstrip("/") + "/file"
        assert r.resolve("etc/abs") == inner
        assert r.resolve("/etc/up") == inner
        assert not r.exists("etc/abs")
        r.mkdir(os.path.dirname(inner))
        r.write_bytes("etc/abs", b"image\n")  # creates it inside; the host file stays
        assert (root / inner).read_bytes() == b"image\n"
        r.remove("etc/up")
        assert r.lstat("etc/up") is None
    assert (host / "file").read_bytes() == b"host\n"


def test_contents_of_devices_and_fifos_are_never_opened(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "fifo")
    os.symlink("/fifo", root / "link")
    with Root(root) as r:
        for path in ("fifo", "link"):
            with pytest.raises(ImageTreeError, match="expected a regular file, found a FIFO"):
                r.read_bytes(path)
            with pytest.raises(ImageTreeError, match="found a FIFO"):
                r.write_bytes(path, b"x")


def test_mkdir_walks_symlinked_dirs_inside_and_refuses_files(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib").mkdir(parents=True)
    os.symlink("/usr/lib", root / "lib")
    (root / "file").write_text("")
    with Root(root) as r:
        r.mkdir("/lib/systemd/system")
        assert (root / "usr/lib/systemd/system").is_dir()
        with pytest.raises(ImageTreeError, match="expected a directory, found a regular file"):
            r.mkdir("file/x")


def test_walk_and_glob_never_follow_symlinks_out(tmp_path: Path) -> None:
    host = _outside(tmp_path)
    root = tmp_path / "root"
    (root / "var/log/apt").mkdir(parents=True)
    (root / "var/log/apt/history.log").write_text("h")
    os.symlink(str(host / "dir"), root / "var/log/out")
    with Root(root) as r:
        seen = [(d, sorted(ds), sorted(fs)) for d, ds, fs, _ in r.walk("var/log")]
        assert seen == [("var/log", ["apt"], ["out"]), ("var/log/apt", [], ["history.log"])]
        assert r.glob("var/log/*") == ["var/log/apt", "var/log/out"]
        assert r.glob("var/log/out/*") == []  # the link leads nowhere inside the root
        assert r.glob("/var/*/apt/*.log") == ["var/log/apt/history.log"]


def test_copy_in_copies_symlinks_as_symlinks_and_refuses_fifos(tmp_path: Path) -> None:
    host = _outside(tmp_path)
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f").write_text("f")
    os.chmod(src / "sub" / "f", 0o4755)
    os.symlink(str(host / "file"), src / "secret")  # a project link to a host file
    root = tmp_path / "root"
    (root / "srv").mkdir(parents=True)
    with Root(root) as r:
        written = r.copy_in(src, "/srv/data")
        assert sorted(written) == ["srv/data/secret", "srv/data/sub", "srv/data/sub/f"]
        assert os.readlink(root / "srv/data/secret") == str(host / "file")
        assert stat.S_IMODE((root / "srv/data/sub/f").lstat().st_mode) == 0o4755
        os.mkfifo(src / "fifo")
        with pytest.raises(ImageTreeError, match="a FIFO is not copied"):
            r.copy_in(src, "/srv/data")


# -- properties ---------------------------------------------------------------------------

_NAMES = st.sampled_from(["a", "b", "..", ".", "etc", "host", "x\udcff"])
_TARGETS = st.one_of(
    st.lists(_NAMES, min_size=1, max_size=5).map("/".join),
    st.lists(_NAMES, min_size=1, max_size=5).map(lambda p: "/" + "/".join(p)),
    st.just("HOST"),
    st.just("HOST/dir"),
    st.just("HOST/file"),
)
_LINKS = st.lists(
    st.tuples(st.lists(st.sampled_from(["a", "b", "etc"]), min_size=1, max_size=3), _TARGETS),
    max_size=8,
)
_PATHS = st.lists(_NAMES, min_size=1, max_size=6).map("/".join)


def _in_a_chroot(top: Path, body: Callable[[], None]) -> int:
    """Run `body` in a forked child chrooted to `top` (a user namespace first when not
    root); its exit code: 0, or 1 if it raised. Even a broken resolver then can only
    reach `top`, never the real host."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            if os.geteuid() != 0:
                uid, gid = os.geteuid(), os.getegid()
                libc = ctypes.CDLL(None, use_errno=True)
                if libc.unshare(0x10000000 | 0x00020000) != 0:  # CLONE_NEWUSER | CLONE_NEWNS
                    os._exit(3)
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
                Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
            os.chroot(top)
            os.chdir("/")
            body()
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(links=_LINKS, paths=st.lists(_PATHS, min_size=1, max_size=4))
def test_no_generated_tree_leads_outside_the_root(
    links: list[tuple[list[str], str]], paths: list[str]
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _outside(Path(tmp))
        # Inside the chroot the sandbox is "/": HOST is /host, the root /root.
        root = Path(tmp) / "root"
        root.mkdir()
        for parts, target in links:
            where = root.joinpath(*parts)
            try:  # the setup goes through earlier links, as it may: it is not under test
                where.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target.replace("HOST", "/host"), where)
            except OSError:
                continue
        before = _fingerprint(Path(tmp) / "host")

        def body() -> None:
            with Root("/root") as r:
                for path in paths:
                    try:
                        resolved = r.resolve(path)
                    except ImageTreeError:
                        continue  # a loop: refused, as the kernel would
                    assert not resolved.startswith(("..", "/"))
                    for op in (
                        lambda p: r.write_bytes(p, b"w"),
                        r.mkdir,
                        r.remove,
                        r.clear_dir,
                        lambda p: r.copy_in(Path("/host"), p),
                        lambda p: r.symlink("/etc", p),
                        r.glob,
                    ):
                        with contextlib.suppress(OSError, ImageTreeError):
                            op(path)  # refusing is fine; reaching out is not

        assert _in_a_chroot(Path(tmp), body) == 0
        assert _fingerprint(Path(tmp) / "host") == before
