import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sysbake.errors import ImageNotFound, StoreError
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.reference import InvalidReference
from sysbake.oci.store import Store
from tests.unit.conftest import crafted_tar, files_tar, put_image, put_layer


def test_sha256_digest_is_sha256_whichever_implementation_hashes() -> None:
    import hashlib

    # CPython's own SHA-256 below 1 MiB (where the build has it), OpenSSL's above.
    for data in (b"", b"{}", os.urandom(4096), os.urandom((1 << 20) + 1)):
        assert oci.sha256_digest(data) == "sha256:" + hashlib.sha256(data).hexdigest()


def test_layout_is_an_oci_image_layout(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    assert json.loads((tmp_path / "oci/oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((tmp_path / "oci/index.json").read_text())
    assert index["schemaVersion"] == 2 and index["manifests"] == []
    assert store.ensure() is store  # idempotent


def test_blobs_are_content_addressed_and_idempotent(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    a = store.put_bytes(b"hello", "text/plain")
    b = store.put_bytes(b"hello", "text/plain")
    assert a == b and a.digest == oci.sha256_digest(b"hello") and a.size == 5
    assert store.blob_path(a.digest).read_bytes() == b"hello"
    w = store.blob_writer()
    w.write(b"hel")
    w.write(b"lo")
    assert w.commit("text/plain") == a  # already present: a no-op
    assert list(store.tmp_dir.iterdir()) == []


def test_discarded_writer_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    w = store.blob_writer()
    w.write(b"partial")
    w.discard()
    assert list(store.tmp_dir.iterdir()) == []
    assert list(store.blobs_dir.iterdir()) == []


def test_tags_resolve_and_untag(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    image = put_image(store, {"f": b"layer"}, ref=None)
    assert store.tag("web", image) == "web:latest"
    store.tag("registry.local:5000/team/web:1.0", image)
    assert store.resolve("web").manifest.digest == image.manifest.digest
    assert store.resolve("web:latest").id == image.id
    assert store.resolve(oci.hex_of(image.id)[:12]).id == image.id
    assert [t.ref for t in store.tags()] == ["registry.local:5000/team/web:1.0", "web:latest"]
    index = json.loads((tmp_path / "oci/index.json").read_text())
    assert {m["annotations"][oci.ANN_REF_NAME] for m in index["manifests"]} == {
        "web:latest",
        "registry.local:5000/team/web:1.0",
    }
    assert store.untag("web")
    assert not store.untag("web")
    with pytest.raises(ImageNotFound, match="no image 'web'"):
        store.resolve("web")


def test_bad_refs_are_clear_errors(tmp_path: Path) -> None:
    # The grammar itself is tests/unit/test_reference.py's; here, the store speaks it.
    store = Store(tmp_path).ensure()
    image = put_image(store, {"f": b"layer"}, ref=None)
    assert store.tag("a/b:c", image) == "a/b:c"
    assert store.tag("Host.Example:5000/a", image) == "host.example:5000/a:latest"
    with pytest.raises(InvalidReference, match="invalid path component 'Web'"):
        store.tag("Web", image)
    with pytest.raises(InvalidReference, match="invalid tag '-x'"):
        store.untag("web:-x")
    with pytest.raises(InvalidReference, match=r"path component '\.\.'"):
        store.resolve("../x")


def test_put_image_refuses_missing_layers(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    ghost = Layer(oci.Descriptor(oci.MT_LAYER_GZIP, "sha256:" + "1" * 64, 1), "sha256:" + "2" * 64)
    with pytest.raises(StoreError, match="missing"):
        store.put_image({"rootfs": {"diff_ids": [ghost.diff_id]}}, (ghost,))


def test_gc_keeps_what_tags_and_roots_reach(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    kept = put_image(store, {"f": b"kept"}, ref=None)
    store.tag("kept", kept)
    dropped = put_image(store, {"f": b"dropped"}, ref=None)
    rooted = store.put_bytes(b"cached layer", oci.MT_LAYER_GZIP)
    removed, freed = store.gc(extra_roots={rooted.digest})
    assert removed == 3 and freed > 0  # dropped's layer, config and manifest
    assert store.has_blob(rooted.digest)
    for digest in (kept.manifest.digest, kept.config_descriptor.digest, kept.layers[0].blob.digest):
        assert store.has_blob(digest)
    assert not store.has_blob(dropped.manifest.digest)


def test_clean_stale_removes_what_killed_writers_left(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    live = store.blob_writer()
    live.write(b"in progress")
    # A writer in another process that dies with kill -9 leaves its temp file behind.
    code = (
        f"import os,sys; sys.path[:0]={sys.path!r}; from sysbake.oci.store import Store; "
        f"w=Store(__import__('pathlib').Path({str(tmp_path)!r})).blob_writer(); w.write(b'x'); "
        "os.kill(os.getpid(), 9)"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    with store.staging("build") as staging:
        assert staging.is_dir()
        assert len(list(store.tmp_dir.iterdir())) == 4  # 2 blobs, a dir and its lock
        removed = store.clean_stale()
        assert len(removed) == 1  # only the dead writer's file
        assert staging.is_dir()
    live.discard()
    assert list(store.tmp_dir.iterdir()) == []
    os.makedirs(store.tmp_dir / "unpack-dead")
    (store.tmp_dir / "unpack-dead.lock").touch()
    assert store.clean_stale() == ["unpack-dead"]


# -- a closed store, checked layers ----------------------------------------------------------


def test_a_new_store_is_closed(tmp_path: Path) -> None:
    store = Store(tmp_path / "deep" / "store").ensure()
    assert store.root.stat().st_mode & 0o777 == 0o700


def test_an_open_store_is_closed_when_its_owner_opens_it(tmp_path: Path) -> None:
    (tmp_path / "old").mkdir()
    os.chmod(tmp_path / "old", 0o755)  # as stores were made before
    Store(tmp_path / "old")  # opening is enough: `run` and `export` never call ensure()
    assert (tmp_path / "old").stat().st_mode & 0o777 == 0o700


def test_check_layer_refuses_names_the_layer_and_marks_nothing(tmp_path: Path) -> None:
    from sysbake.errors import LayerError

    store = Store(tmp_path).ensure()
    for entry, problem in (
        (("../x", tarfile.REGTYPE, {}), "'..' is not allowed"),
        (("/etc/x", tarfile.REGTYPE, {}), "absolute names are not allowed"),
        (("x", tarfile.LNKTYPE, {"linkname": "/etc/shadow"}), "hardlink target '/etc/shadow'"),
    ):
        layer = put_layer(store, crafted_tar(entry))
        with pytest.raises(
            LayerError, match=f"^layer {layer.blob.digest}: layer entry .*{problem}"
        ):
            store.check_layer(layer)
        assert not (store.checked_dir / oci.hex_of(layer.diff_id)).exists()
        with pytest.raises(LayerError, match=f"^layer {layer.blob.digest}: .*{problem}"):
            store.layer_tree(layer)
        assert not store.tree_path(layer.diff_id).exists()
        assert list(store.tmp_dir.iterdir()) == []


def test_check_layer_verifies_the_diff_id(tmp_path: Path) -> None:
    from sysbake.errors import LayerError

    store = Store(tmp_path).ensure()
    good = put_layer(store, files_tar({"a": b"1"}))
    lying = Layer(good.blob, "sha256:" + "ab" * 32)
    for action in (store.check_layer, store.layer_tree):
        with pytest.raises(LayerError, match="not to its diff_id sha256:abab"):
            action(lying)
    assert not store.tree_path(lying.diff_id).exists()


def test_a_layer_is_checked_once(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    layer = put_layer(store, files_tar({"a": b"1"}))
    store.check_layer(layer)
    marker = store.checked_dir / oci.hex_of(layer.diff_id)
    assert marker.is_file()
    # The blob is not read again: even gone, the layer counts as checked.
    store.blob_path(layer.blob.digest).unlink()
    store.check_layer(layer)
    # An extraction marks its layer too.
    other = put_layer(store, files_tar({"b": b"2"}))
    assert (store.layer_tree(other) / "b").read_bytes() == b"2"
    assert (store.checked_dir / oci.hex_of(other.diff_id)).is_file()


def test_gc_drops_the_markers_of_unreachable_layers(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    kept, dropped = (put_layer(store, files_tar({name: b"x"})) for name in ("k", "d"))
    for layer in (kept, dropped):
        store.check_layer(layer)
    put_image(store, kept, ref="kept")
    store.gc()
    assert sorted(p.name for p in store.checked_dir.iterdir()) == [oci.hex_of(kept.diff_id)]
