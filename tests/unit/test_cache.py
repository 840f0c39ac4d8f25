import os
from pathlib import Path

from sysbake.cache import StageCache, StageRecord, explain, hash_tree, stage_key
from sysbake.oci import MT_LAYER_GZIP, Layer
from sysbake.store import Store


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


def _record(store: Store, key: str, stage: str = "bootstrap") -> StageRecord:
    blob = store.put_bytes(key.encode(), MT_LAYER_GZIP)
    return StageRecord(key=key, image="base", stage=stage, inputs={"k": key},
                       layer=Layer(blob, "sha256:" + "0" * 64), created="2026-01-01T00:00:00Z",
                       created_by="test")


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
    from sysbake.cache import explain

    reason = explain({"pulled": "127.0.0.1:5000/base:latest"}, {"stage": "bootstrap"})
    assert reason == ("the cached stage came from 127.0.0.1:5000/base:latest and its "
                      "inputs differ")
