"""The one atomic file write (fsutil.atomic_file, atomic_write) and the one publication of
a finished tree (fsutil.publish_dir). Everything happens under pytest's tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.errors import StoreError
from sysbake.fsutil import atomic_file, atomic_write, publish_dir


def test_a_write_replaces_the_whole_file_or_nothing(tmp_path: Path) -> None:
    target = tmp_path / "f"
    atomic_write(target, b"one")
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["f"]
    with pytest.raises(RuntimeError), atomic_file(target) as f:
        f.write(b"half")
        raise RuntimeError("interrupted")
    assert target.read_bytes() == b"two"  # untouched
    assert os.listdir(tmp_path) == ["f"]  # the temp file is gone


def test_modes_and_parents(tmp_path: Path) -> None:
    deep = tmp_path / "a" / "b" / "secret"
    atomic_write(deep, b"x", mode=0o600, durable=False)
    assert deep.stat().st_mode & 0o777 == 0o600
    umask = os.umask(0o027)
    try:
        with atomic_file(tmp_path / "user", mode=None) as f:
            f.write(b"y")
    finally:
        os.umask(umask)
    assert (tmp_path / "user").stat().st_mode & 0o777 == 0o640  # as a new file would be
    with pytest.raises(FileNotFoundError), atomic_file(tmp_path / "missing" / "f"):
        pass  # atomic_file makes no parent: the caller's file, the caller's directory


def test_a_failed_write_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=f"^writing {tmp_path}/file/x: File exists"):
        atomic_write(tmp_path / "file" / "x", b"")
    os.mkdir(tmp_path / "dir")
    with pytest.raises(StoreError, match=f"^writing {tmp_path}/dir: Is a directory"):
        atomic_write(tmp_path / "dir", b"")
    assert sorted(os.listdir(tmp_path)) == ["dir", "file"]


def test_a_long_name_still_gets_a_temp_name(tmp_path: Path) -> None:
    target = tmp_path / ("n" * 255)
    atomic_write(target, b"z")
    assert target.read_bytes() == b"z"


def test_init_writes_its_files_atomically(tmp_path: Path) -> None:
    assert cli.main(["init", str(tmp_path / "p"), "--name", "web"]) == 0
    written = sorted(str(p.relative_to(tmp_path / "p")) for p in (tmp_path / "p").rglob("*"))
    assert "sysbake.toml" in written and not [w for w in written if "/." in f"/{w}"]
    assert (tmp_path / "p" / "sysbake.toml").stat().st_mode & 0o777 == 0o644


def _tree(path: Path, content: str) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "sub" / "file").write_text(content)
    return path


def test_publishing_a_tree(tmp_path: Path) -> None:
    final = tmp_path / "final"
    assert publish_dir(_tree(tmp_path / "first", "1"), final)
    assert (final / "sub" / "file").read_text() == "1"
    # Published already (by another process): ours is dropped, theirs kept.
    assert not publish_dir(_tree(tmp_path / "second", "2"), final)
    assert (final / "sub" / "file").read_text() == "1"
    assert sorted(os.listdir(tmp_path)) == ["final"]
    # An empty directory is no tree: it is replaced.
    (tmp_path / "empty").mkdir()
    assert publish_dir(_tree(tmp_path / "third", "3"), tmp_path / "empty")
    assert (tmp_path / "empty" / "sub" / "file").read_text() == "3"


def test_publishing_over_a_file_fails_and_keeps_the_tree(tmp_path: Path) -> None:
    (tmp_path / "final").write_text("")
    tree = _tree(tmp_path / "tree", "1")
    with pytest.raises(NotADirectoryError):
        publish_dir(tree, tmp_path / "final")
    assert (tree / "sub" / "file").read_text() == "1"
