"""Exports on tiny images made in memory: formats, names, determinism and errors (no root)."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import tarfile
from pathlib import Path

import pytest

from sysbake.errors import ImageNotFound, LayerError
from sysbake.oci import model as oci
from sysbake.oci.export import (
    ExportError,
    check_options,
    docker_manifest,
    export_image,
    export_name,
    merge_index,
    rootfs_compression_for,
)
from sysbake.oci.model import Descriptor, Layer
from sysbake.oci.reference import InvalidReference
from sysbake.oci.store import Store
from tests.unit.conftest import (
    Entry,
    crafted_tar,
    files_tar,
    put_image,
    tar_member,
    tar_members,
)


def _members(data: bytes) -> dict[str, tarfile.TarInfo]:
    return {m.name: m for m in tar_members(data)}


# -- pure parts ----------------------------------------------------------------------------


def test_check_options_defaults_and_rejections() -> None:
    assert check_options("rootfs", None) == "xz"
    assert check_options("rootfs", "zstd") == "zstd"
    assert check_options("oci", None) is None
    assert check_options("oci-archive", "zstd") == "zstd"
    assert check_options("docker-archive", "none") is None
    with pytest.raises(ExportError, match="unknown export format 'tarball'"):
        check_options("tarball", None)
    with pytest.raises(ExportError, match="unknown rootfs compression 'bz2'"):
        check_options("rootfs", "bz2")
    with pytest.raises(ExportError, match="unknown layer compression 'xz' for oci"):
        check_options("oci", "xz")
    with pytest.raises(ExportError, match="docker-archive takes no compression"):
        check_options("docker-archive", "gzip")


def test_rootfs_compression_follows_the_file_name(store: Store, tmp_path: Path) -> None:
    assert [
        rootfs_compression_for(Path(n))
        for n in ("a.tar", "a.tar.gz", "a.tgz", "a.tar.zst", "a.tar.xz", "-", "rootfs")
    ] == ["none", "gzip", "gzip", "zstd", "xz", "xz", "xz"]
    put_image(store, {"etc/hostname": b"box\n"})
    plain = export_image(store, "t", "rootfs", tmp_path / "r.tar").read_bytes()
    assert plain == files_tar({"etc/hostname": b"box\n"})
    packed = export_image(store, "t", "rootfs", tmp_path / "r.tar.gz").read_bytes()
    assert gzip.decompress(packed) == plain


def test_export_name_is_the_full_tag_or_nothing_for_an_id() -> None:
    tags = {"web:latest", "reg.example:5000/app:1.0"}
    assert export_name("web", tags) == "web:latest"
    assert export_name("reg.example:5000/app:1.0", tags) == "reg.example:5000/app:1.0"
    assert export_name("abcdef123456", tags) is None  # an image ID
    assert export_name("sha256:abcdef", tags) is None
    assert export_name("abcdef123456", tags, name="other") == "other:latest"
    with pytest.raises(InvalidReference, match="invalid path component 'Bad Name'"):
        export_name("web", tags, name="Bad Name")


def test_docker_manifest_lists_config_tags_and_layers() -> None:
    data = docker_manifest("c.json", ["web:latest"], ["a/layer.tar", "b/layer.tar"])
    assert json.loads(data) == [
        {"Config": "c.json", "RepoTags": ["web:latest"], "Layers": ["a/layer.tar", "b/layer.tar"]}
    ]


def test_merge_index_replaces_same_name_and_untagged_same_digest() -> None:
    def desc(digest_char: str, name: str | None) -> Descriptor:
        d = Descriptor(oci.MT_MANIFEST, "sha256:" + digest_char * 64, 10)
        return d.with_annotations(**{oci.ANN_REF_NAME: name}) if name else d

    old = [desc("a", "web:latest"), desc("b", "web:1.0"), desc("c", None)]
    merged = merge_index(old, desc("d", "web:latest"))
    assert [(d.digest[7], d.annotation(oci.ANN_REF_NAME)) for d in merged] == [
        ("c", None),
        ("b", "web:1.0"),
        ("d", "web:latest"),
    ]
    merged = merge_index(old, desc("c", None))
    assert len(merged) == 3
    merged = merge_index(old, desc("a", None))  # untagged, other digest: added
    assert len(merged) == 4


# -- exports of a tiny image ---------------------------------------------------------------


def test_docker_archive_holds_uncompressed_layers_config_and_manifest(
    store: Store, tmp_path: Path
) -> None:
    image = put_image(store, {"etc/hostname": b"box\n"}, {"usr/bin/tool": b"#!/bin/sh\n"})
    out = export_image(store, "t", "docker-archive", tmp_path / "d.tar")
    data = out.read_bytes()
    members = _members(data)
    config_name = f"{oci.hex_of(image.id)}.json"
    layer_names = [f"{oci.hex_of(d)}/layer.tar" for d in image.diff_ids]
    assert list(members) == sorted(members)
    assert set(members) == {
        config_name,
        "manifest.json",
        *layer_names,
        *(n.split("/")[0] for n in layer_names),
    }
    assert all(m.mtime == 0 and m.uid == 0 and m.gid == 0 for m in members.values())
    assert json.loads(tar_member(data, "manifest.json")) == [
        {"Config": config_name, "RepoTags": ["t:latest"], "Layers": layer_names}
    ]
    assert tar_member(data, config_name) == store.blob_path(image.id).read_bytes()
    for name, diff_id in zip(layer_names, image.diff_ids, strict=True):
        assert oci.sha256_digest(tar_member(data, name)) == diff_id
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_archives_are_byte_identical_and_honour_source_date_epoch(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    put_image(store, {"a": b"1"}, {"b": b"2"})
    for fmt in ("oci-archive", "docker-archive"):
        one = export_image(store, "t", fmt, tmp_path / f"{fmt}-1.tar").read_bytes()
        two = export_image(store, "t", fmt, tmp_path / f"{fmt}-2.tar").read_bytes()
        assert hashlib.sha256(one).digest() == hashlib.sha256(two).digest()
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    data = export_image(store, "t", "oci-archive", tmp_path / "epoch.tar").read_bytes()
    assert {m.mtime for m in _members(data).values()} == {1700000000}


def test_oci_archive_is_a_layout_tagged_with_the_full_name(store: Store, tmp_path: Path) -> None:
    image = put_image(store, {"a": b"1"}, ref="web:1.0")
    data = export_image(store, "web:1.0", "oci-archive", tmp_path / "o.tar").read_bytes()
    members = _members(data)
    blobs = {image.manifest.digest, image.id, *(la.blob.digest for la in image.layers)}
    assert set(members) == {
        "blobs",
        "blobs/sha256",
        "oci-layout",
        "index.json",
        *(f"blobs/sha256/{oci.hex_of(b)}" for b in blobs),
    }
    index = json.loads(tar_member(data, "index.json"))
    [entry] = index["manifests"]
    assert entry["digest"] == image.manifest.digest
    assert entry["annotations"] == {oci.ANN_REF_NAME: "web:1.0"}
    assert json.loads(tar_member(data, "oci-layout")) == {"imageLayoutVersion": "1.0.0"}


def test_an_image_id_exports_untagged_unless_named(store: Store, tmp_path: Path) -> None:
    image = put_image(store, {"a": b"1"})
    short = oci.hex_of(image.id)[:12]
    data = export_image(store, short, "docker-archive", tmp_path / "d.tar").read_bytes()
    assert json.loads(tar_member(data, "manifest.json"))[0]["RepoTags"] == []
    data = export_image(
        store, short, "docker-archive", tmp_path / "n.tar", name="named:v1"
    ).read_bytes()
    assert json.loads(tar_member(data, "manifest.json"))[0]["RepoTags"] == ["named:v1"]


def test_oci_recompression_keeps_config_and_diff_ids(store: Store, tmp_path: Path) -> None:
    image = put_image(store, {"a": b"1" * 5000})
    data = export_image(store, "t", "oci-archive", tmp_path / "o.tar", "none").read_bytes()
    [entry] = json.loads(tar_member(data, "index.json"))["manifests"]
    assert entry["digest"] != image.manifest.digest
    manifest = json.loads(tar_member(data, f"blobs/sha256/{oci.hex_of(entry['digest'])}"))
    assert manifest["config"]["digest"] == image.id
    [layer] = manifest["layers"]
    assert layer["mediaType"] == oci.MT_LAYER
    assert layer["digest"] == image.diff_ids[0]  # an uncompressed layer's digest is its diff_id
    again = export_image(store, "t", "oci-archive", tmp_path / "o2.tar", "none").read_bytes()
    assert again == data
    assert list((store.tmp_dir).iterdir()) == []  # the staging area was cleaned


def test_oci_layout_links_blobs_and_adds_refs(store: Store, tmp_path: Path) -> None:
    first = put_image(store, {"a": b"1"}, ref="one:latest")
    second = put_image(store, {"b": b"2"}, ref="two:latest")
    dest = tmp_path / "layout"
    dest.mkdir()  # an empty directory is taken over
    assert export_image(store, "one", "oci", dest) == dest
    export_image(store, "two", "oci", dest)
    export_image(store, "one", "oci", dest)  # replacing a ref is idempotent
    index = json.loads((dest / "index.json").read_text())
    assert [(m["digest"], m["annotations"][oci.ANN_REF_NAME]) for m in index["manifests"]] == [
        (first.manifest.digest, "one:latest"),
        (second.manifest.digest, "two:latest"),
    ]
    layer = first.layers[0].blob.digest
    exported = dest / "blobs" / "sha256" / oci.hex_of(layer)
    assert exported.stat().st_ino == store.blob_path(layer).stat().st_ino
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_oci_layout_copies_blobs_across_file_systems(store: Store, tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.fail("this test needs /dev/shm on another file system than the temp dir")
    image = put_image(store, {"a": b"1"})
    dest = shm / f"sysbake-export-test-{os.getpid()}"
    try:
        export_image(store, "t", "oci", dest)
        blob = dest / "blobs" / "sha256" / oci.hex_of(image.layers[0].blob.digest)
        assert blob.read_bytes() == store.blob_path(image.layers[0].blob.digest).read_bytes()
        assert blob.stat().st_nlink == 1
    finally:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)


def test_rootfs_of_one_layer_is_that_layer(store: Store, tmp_path: Path) -> None:
    put_image(store, {"etc/hostname": b"box\n"})
    plain = export_image(store, "t", "rootfs", tmp_path / "r", "none").read_bytes()
    assert plain == files_tar({"etc/hostname": b"box\n"})
    packed = export_image(store, "t", "rootfs", tmp_path / "r.xz", "gzip").read_bytes()
    assert gzip.decompress(packed) == plain  # an explicit compression wins over the name


# -- errors --------------------------------------------------------------------------------


def test_export_errors_are_one_clear_line(store: Store, tmp_path: Path) -> None:
    put_image(store, {"a": b"1"})
    with pytest.raises(ImageNotFound, match="no image 'nope'"):
        export_image(store, "nope", "docker-archive", tmp_path / "x.tar")
    with pytest.raises(ExportError, match="oci format writes a directory"):
        export_image(store, "t", "oci", Path("-"))
    with pytest.raises(ExportError, match="is a directory"):
        export_image(store, "t", "oci-archive", tmp_path)
    afile = tmp_path / "afile"
    afile.write_text("")
    not_a_dir = re.escape(f"cannot write {afile}/x.tar: not a directory")
    with pytest.raises(ExportError, match=not_a_dir):
        export_image(store, "t", "docker-archive", afile / "x.tar")
    with pytest.raises(ExportError, match=r"cannot write .*/missing/x\.tar: no such file"):
        export_image(store, "t", "docker-archive", tmp_path / "missing" / "x.tar")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "thing").write_text("")
    with pytest.raises(ExportError, match="exists and is not an OCI layout"):
        export_image(store, "t", "oci", tmp_path / "full")
    for error in (ExportError, ImageNotFound):
        assert "\n" not in str(error("x"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "full", "store"]


def test_a_corrupt_layer_fails_loudly_and_leaves_nothing(store: Store, tmp_path: Path) -> None:
    image = put_image(store, {"a": b"1"})
    blob = store.blob_path(image.layers[0].blob.digest)
    blob.chmod(0o644)
    blob.write_bytes(gzip.compress(files_tar({"a": b"2"}), mtime=0))
    # Never checked: the layer check finds that it does not hash to its diff_id.
    with pytest.raises(
        LayerError,
        match=f"layer {image.layers[0].blob.digest}: its content "
        f"hashes to .*, not to its diff_id "
        f"{image.diff_ids[0]}",
    ):
        export_image(store, "t", "rootfs", tmp_path / "x.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    # Checked before it was damaged: the export's own digest check still catches it.
    image = put_image(store, {"b": b"1"}, ref="u:latest")
    export_image(store, "u", "rootfs", tmp_path / "ok.tar", "none")
    (tmp_path / "ok.tar").unlink()
    blob = store.blob_path(image.layers[0].blob.digest)
    blob.chmod(0o644)
    blob.write_bytes(gzip.compress(files_tar({"b": b"2"}), mtime=0))
    for fmt in ("docker-archive", "rootfs"):
        with pytest.raises(
            ExportError, match=f"content has digest .* expected {image.diff_ids[0]}"
        ):
            export_image(store, "u", fmt, tmp_path / "x.tar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def _hostile(kind: str) -> tuple[bytes, str]:
    """A hostile layer tar and the problem its refusal names."""
    entries: dict[str, Entry] = {
        "dotdot": ("../x", tarfile.REGTYPE, {}),
        "absolute": ("/etc/x", tarfile.REGTYPE, {}),
        "hardlink": ("x", tarfile.LNKTYPE, {"linkname": "/etc/shadow"}),
        "device": ("x", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}),
    }
    problems = {
        "dotdot": "'..' is not allowed",
        "absolute": "absolute names are not allowed",
        "hardlink": "hardlink target '/etc/shadow': absolute names",
        "device": "block device 8:0 is not allowed",
    }
    return crafted_tar(entries[kind]), problems[kind]


HOSTILE_KINDS = ("dotdot", "absolute", "hardlink", "device")
FORMATS = (
    ("oci", None),
    ("oci-archive", None),
    ("oci-archive", "zstd"),
    ("docker-archive", None),
    ("rootfs", "none"),
    ("rootfs", "xz"),
)


@pytest.mark.parametrize("kind", HOSTILE_KINDS)
@pytest.mark.parametrize("below", [False, True], ids=["one-layer", "two-layers"])
def test_hostile_layers_are_refused_by_every_format(
    store: Store, tmp_path: Path, kind: str, below: bool
) -> None:
    plain, problem = _hostile(kind)
    image = put_image(store, *([{"ok": b"ok"}] if below else []), plain, ref="bad:latest")
    digest = image.layers[-1].blob.digest
    for fmt, compression in FORMATS:
        with pytest.raises(LayerError) as caught:
            export_image(store, "bad", fmt, tmp_path / "out", compression)
        message = str(caught.value)
        assert message.startswith(f"layer {digest}: layer entry ") and problem in message
        assert "\n" not in message
        assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert not (store.checked_dir / oci.hex_of(image.diff_ids[-1])).exists()


def test_a_layer_that_is_not_a_tar_is_refused(store: Store, tmp_path: Path) -> None:
    image = put_image(store, b"this is no tar archive" * 40, ref="bad:latest")
    for fmt, compression in FORMATS:
        with pytest.raises(
            LayerError, match=f"layer {image.layers[0].blob.digest}: not a valid tar"
        ):
            export_image(store, "bad", fmt, tmp_path / "out", compression)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_a_layer_that_does_not_decompress_is_refused(store: Store, tmp_path: Path) -> None:
    blob = store.put_bytes(b"\x1f\x8b" + b"not gzip at all" * 50, oci.MT_LAYER_GZIP)
    put_image(store, Layer(blob, "sha256:" + "0" * 64), ref="bad")
    for fmt, compression in FORMATS:
        with pytest.raises(LayerError, match=f"layer {blob.digest}: "):
            export_image(store, "bad", fmt, tmp_path / "out", compression)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def test_standard_devices_and_setuid_files_export(store: Store, tmp_path: Path) -> None:
    plain = crafted_tar(
        ("dev/null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3, "mode": 0o666}),
        ("bin/su", tarfile.REGTYPE, {"mode": 0o4755, "data": b"elf"}),
    )
    image = put_image(store, plain, ref="fine:latest")
    out = export_image(store, "fine", "rootfs", tmp_path / "r.tar", "none")
    assert out.read_bytes() == plain
    # Checked once: the marker spares the next export the pass over the layer.
    assert (store.checked_dir / oci.hex_of(image.diff_ids[0])).is_file()


def test_non_utf8_names_export_byte_exact(store: Store, tmp_path: Path) -> None:
    plain = files_tar({os.fsdecode(b"caf\xe9/\xff\xfe-latin1"): b"hi"})
    put_image(store, {"ok": b"ok"}, plain, ref="latin:latest")
    merged = export_image(store, "latin", "rootfs", tmp_path / "r.tar", "none").read_bytes()
    with tarfile.open(
        fileobj=io.BytesIO(merged), encoding="utf-8", errors="surrogateescape"
    ) as tar:
        names = {os.fsencode(m.name) for m in tar.getmembers()}
    assert b"caf\xe9/\xff\xfe-latin1" in names
    docker = export_image(store, "latin", "docker-archive", tmp_path / "d.tar").read_bytes()
    assert tar_member(docker, f"{oci.hex_of(oci.sha256_digest(plain))}/layer.tar") == plain
