import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sysbake import oci
from sysbake.errors import ImageNotFound, StoreError
from sysbake.oci import Layer
from sysbake.store import Store, normalize_ref


def _image(store: Store, payload: bytes = b"layer"):
    blob = store.put_bytes(payload, oci.MT_LAYER_GZIP)
    diff_id = oci.sha256_digest(payload + b"plain")
    config = {"architecture": "amd64", "os": "linux", "config": {},
              "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    return store.put_image(config, (Layer(blob, diff_id),))


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
    image = _image(store)
    assert store.tag("web", image) == "web:latest"
    store.tag("registry.local:5000/team/web:1.0", image)
    assert store.resolve("web").manifest.digest == image.manifest.digest
    assert store.resolve("web:latest").id == image.id
    assert store.resolve(oci.hex_of(image.id)[:12]).id == image.id
    assert [t.ref for t in store.tags()] == ["registry.local:5000/team/web:1.0", "web:latest"]
    index = json.loads((tmp_path / "oci/index.json").read_text())
    assert {m["annotations"][oci.ANN_REF_NAME] for m in index["manifests"]} == {
        "web:latest", "registry.local:5000/team/web:1.0"}
    assert store.untag("web")
    assert not store.untag("web")
    with pytest.raises(ImageNotFound, match="no image 'web'"):
        store.resolve("web")


def test_bad_refs_are_clear_errors() -> None:
    assert normalize_ref("a/b:c") == "a/b:c"
    assert normalize_ref("host:5000/a") == "host:5000/a:latest"
    with pytest.raises(StoreError, match="invalid image name"):
        normalize_ref("Web")
    with pytest.raises(StoreError, match="invalid tag"):
        normalize_ref("web:-x")


def test_put_image_refuses_missing_layers(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    ghost = Layer(oci.Descriptor(oci.MT_LAYER_GZIP, "sha256:" + "1" * 64, 1), "sha256:" + "2" * 64)
    with pytest.raises(StoreError, match="missing"):
        store.put_image({"rootfs": {"diff_ids": [ghost.diff_id]}}, (ghost,))


def test_gc_keeps_what_tags_and_roots_reach(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    kept = _image(store, b"kept")
    store.tag("kept", kept)
    dropped = _image(store, b"dropped")
    rooted = store.put_bytes(b"cached layer", oci.MT_LAYER_GZIP)
    removed, freed = store.gc(extra_roots={rooted.digest})
    assert removed == 3 and freed > 0  # dropped's layer, config and manifest
    assert store.has_blob(rooted.digest)
    for digest in (kept.manifest.digest, kept.config_descriptor.digest,
                   kept.layers[0].blob.digest):
        assert store.has_blob(digest)
    assert not store.has_blob(dropped.manifest.digest)


def test_clean_stale_removes_what_killed_writers_left(tmp_path: Path) -> None:
    store = Store(tmp_path).ensure()
    live = store.blob_writer()
    live.write(b"in progress")
    # A writer in another process that dies with kill -9 leaves its temp file behind.
    code = (f"import os,sys; sys.path[:0]={sys.path!r}; from sysbake.store import Store; "
            f"w=Store(__import__('pathlib').Path({str(tmp_path)!r})).blob_writer(); w.write(b'x'); "
            "os.kill(os.getpid(), 9)")
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
