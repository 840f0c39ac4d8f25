import contextlib
import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sysbake.build import cache
from sysbake.build.cache import StageCache, StageRecord, explain, hash_tree, stage_key
from sysbake.errors import BuildError
from sysbake.oci.model import MT_LAYER_GZIP, Layer
from sysbake.oci.store import Store


def test_stage_key_is_order_independent_and_input_sensitive() -> None:
    a = stage_key({"suite": "bookworm", "packages": ["a", "b"]})
    assert a == stage_key({"packages": ["a", "b"], "suite": "bookworm"})
    assert a != stage_key({"suite": "bookworm", "packages": ["b", "a"]})
    assert a != stage_key({"suite": "trixie", "packages": ["a", "b"]})


def test_explain_names_the_changed_input() -> None:
    old = {"bootstrap": {"suite": "bookworm", "packages": ["x"]}, "parent": "p1"}
    new = {"bootstrap": {"suite": "trixie", "packages": ["x"]}, "parent": "p1"}
    assert explain(old, new) == 'bootstrap.suite changed from "bookworm" to "trixie"'
    assert explain(None, new) == "no earlier build of this stage"
    assert "missing" in explain(new, new)


def test_hash_tree_sees_contents_modes_and_links_but_not_mtimes(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    f = tmp_path / "d" / "f"
    f.write_text("one")
    first = hash_tree(tmp_path)
    os.utime(f, (1, 1))
    assert hash_tree(tmp_path) == first
    f.write_text("two")
    second = hash_tree(tmp_path)
    assert second != first
    f.chmod(0o755)
    assert hash_tree(tmp_path) != second
    (tmp_path / "l").symlink_to("d/f")
    assert hash_tree(tmp_path) not in (first, second)
    assert hash_tree(tmp_path / "nope") == "missing"


def test_hash_tree_reads_large_files_and_small_ones_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file of 1 MiB or more is streamed (OpenSSL), a smaller one read whole (CPython's
    SHA-256): either way a file's digest is that of its content, so keys do not depend on
    which way it was read."""
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "small").write_bytes(b"s" * 100)
    big = tmp_path / "big"
    big.write_bytes(b"a" * (1 << 20) + b"b")
    whole, one = hash_tree(tmp_path), hash_tree(big)
    monkeypatch.setattr(cache, "_SMALL_FILE", 0)  # every file streamed
    assert (hash_tree(tmp_path), hash_tree(big)) == (whole, one)
    big.write_bytes(b"a" * (1 << 20) + b"c")
    assert hash_tree(tmp_path) != whole
    assert hash_tree(big) != one


def _record(store: Store, key: str, stage: str = "bootstrap") -> StageRecord:
    blob = store.put_bytes(key.encode(), MT_LAYER_GZIP)
    return StageRecord(
        key=key,
        image="base",
        stage=stage,
        inputs={"k": key},
        layer=Layer(blob, "sha256:" + "0" * 64),
        created="2026-01-01T00:00:00Z",
        created_by="test",
    )


def test_records_round_trip_and_need_their_blob(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    cache = StageCache(store)
    rec = _record(store, "k1")
    cache.save(rec)
    assert cache.lookup("k1") == rec
    assert cache.last("base", "bootstrap") == rec
    store.blob_path(rec.layer.blob.digest).unlink()
    assert cache.lookup("k1") is None  # never answer with a layer we no longer have


def test_prune_keeps_the_last_build_of_each_stage(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    cache = StageCache(store)
    old, new = _record(store, "old"), _record(store, "new")
    cache.save(old)
    cache.save(new)
    dropped, blobs, _ = cache.prune()
    assert dropped == 1 and blobs == 1
    assert cache.lookup("new") is not None and cache.lookup("old") is None
    cache.prune(all_records=True)
    assert cache.records() == []


def test_explain_names_a_pulled_stage() -> None:
    from sysbake.build.cache import explain

    reason = explain({"pulled": "127.0.0.1:5000/base:latest"}, {"stage": "bootstrap"})
    assert reason == ("the cached stage came from 127.0.0.1:5000/base:latest and its inputs differ")


def test_hash_tree_hashes_a_link_inside_as_a_link_never_its_target(tmp_path: Path) -> None:
    host = tmp_path / "host-secret"
    host.write_bytes(b"one")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "link").symlink_to(host)
    (tree / "dirlink").symlink_to(tmp_path)  # not walked into
    first = hash_tree(tree)
    host.write_bytes(b"two")  # the target changes: the tree does not
    (tmp_path / "new").write_bytes(b"")
    assert hash_tree(tree) == first
    (tree / "link").unlink()
    (tree / "link").symlink_to(tmp_path / "other")
    assert hash_tree(tree) != first


def test_hash_tree_follows_the_top_itself(tmp_path: Path) -> None:
    # The project file checks where a named path leads; its contents are the input.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_bytes(b"one")
    (tmp_path / "alias").symlink_to("real")
    assert hash_tree(tmp_path / "alias") == hash_tree(tmp_path / "real")
    (tmp_path / "file-alias").symlink_to("real/f")
    assert hash_tree(tmp_path / "file-alias") == hash_tree(tmp_path / "real" / "f")
    (tmp_path / "dangling").symlink_to("nowhere")
    assert hash_tree(tmp_path / "dangling") == "missing"


def test_hash_tree_takes_names_that_are_not_utf8(tmp_path: Path) -> None:
    tree = os.fsencode(tmp_path)
    os.mkdir(tree + b"/d\xff")
    with open(tree + b"/d\xff/f\xfe\x80", "wb") as f:
        f.write(b"x")
    os.symlink(b"t\xff", tree + b"/l\xff")
    first = hash_tree(tmp_path)
    os.rename(tree + b"/d\xff/f\xfe\x80", tree + b"/d\xff/f\xfe\x81")
    assert hash_tree(tmp_path) != first
    assert hash_tree(Path(os.fsdecode(tree + b"/d\xff"))).startswith("sha256:")


def test_hash_tree_sees_directory_modes_and_skips_fifos(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "d" / "pipe")  # listed, never opened (it would block)
    first = hash_tree(tmp_path)
    (tmp_path / "d").chmod(0o700)
    assert hash_tree(tmp_path) != first


@contextlib.contextmanager
def nested(name: str, depth: int) -> Iterator[Path]:
    """A directory holding `depth` nested directories `name` (made through descriptors: the
    path may exceed PATH_MAX). Not under pytest's tmp_path: its clean-up (rmtree, which
    recurses in Python 3.11) would fail on it in every later pytest run; rm -rf does not."""
    top = Path(tempfile.mkdtemp(prefix="sysbake-test-deep-"))
    try:
        fd = os.open(top, os.O_RDONLY)
        try:
            for _ in range(depth):
                os.mkdir(name, dir_fd=fd)
                inner = os.open(name, os.O_RDONLY, dir_fd=fd)
                os.close(fd)
                fd = inner
        finally:
            os.close(fd)
        yield top
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


def test_hash_tree_walks_trees_deeper_than_the_recursion_limit() -> None:
    with nested("d", 1100) as top:  # one letter: the whole path is under PATH_MAX
        first = hash_tree(top)
        assert first.startswith("sha256:")
        os.chmod(top / "/".join(["d"] * 1100), 0o700)
        assert hash_tree(top) != first  # the deepest level was hashed


def test_hash_tree_says_which_directory_it_cannot_read() -> None:
    with (
        nested("x" * 200, 25) as top,
        pytest.raises(BuildError, match="cannot read: File name too long"),
    ):
        hash_tree(top)  # a path longer than PATH_MAX
