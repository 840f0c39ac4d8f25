"""Bringing what users have (sysbake.oci.ingest, sysbake.build.imported,
sysbake.registry.sources): rootfs tarballs and archives in every form, hostile ones
refused in one line with the store left as it was; `from = "rootfs:FILE"` in a project;
a `from` that names a registry; an engine's images; the bootstrap's key and mirror checks
against a loopback HTTP server."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import json
import os
import stat
import sys
import tarfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.build import bootstrap, imported
from sysbake.build.bootstrap import BootstrapPlan
from sysbake.build.pipeline import missing_parents
from sysbake.errors import BuildError, ConfigError
from sysbake.oci import compress, ingest
from sysbake.oci import model as oci
from sysbake.oci.ingest import IngestError
from sysbake.oci.store import Store
from sysbake.project.load import load_project
from sysbake.registry import sources
from tests.unit.conftest import Entry, crafted_tar, files_tar, image_config

ROOTFS = {"etc/os-release": b"ID=hbring\n", "bin/sh": b"#!fake\n", "usr/lib/x": b"x" * 5000}


def packed(data: bytes, kind: str) -> bytes:
    """`data` compressed with `kind` (none, gzip, zstd, xz)."""
    out = io.BytesIO()
    with compress.compressor(kind, out) as sink:
        sink.write(data)
    return out.getvalue()


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def store_state(store: Store) -> tuple[list[str], list[str], list[str]]:
    """Tags, blobs and staging entries: what a refused import or load must not change."""
    tags = sorted(t.ref for t in store.tags())
    blobs = sorted(p.name for p in store.blobs_dir.iterdir())
    tmp = sorted(p.name for p in store.tmp_dir.iterdir()) if store.tmp_dir.exists() else []
    return tags, blobs, tmp


def layer_files(store: Store, ref: str) -> dict[str, bytes]:
    """The regular files of the one-layer image `ref`, read from its layer tar."""
    image = store.resolve(ref)
    out = {}
    with store.open_blob(image.layers[0].blob.digest) as raw:
        plain = gzip.decompress(raw.read())
    with tarfile.open(fileobj=io.BytesIO(plain)) as tf:
        for member in tf:
            f = tf.extractfile(member) if member.isreg() else None
            if f is not None:
                out[member.name] = f.read()
    return out


# -- import of a rootfs tarball ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd", "xz"])
def test_import_takes_any_compression_told_by_its_bytes(
    tmp_path: Path, store: Store, kind: str
) -> None:
    # A misleading name: the bytes say what the compression is.
    path = write(tmp_path / "rootfs.tar.gz", packed(files_tar(ROOTFS), kind))
    image = imported.import_image(store, path)
    store.tag("hbring-import:1", image)
    assert layer_files(store, "hbring-import:1") == ROOTFS
    assert len(image.layers) == 1
    history = image.config["history"]
    assert history[0]["created_by"] == "sysbake import rootfs.tar.gz"
    assert history[0]["comment"] == f"imported from {path} ({ingest.file_digest(path)})"
    # The date is the newest entry's (crafted_tar writes EPOCH): the same tar, the same ID.
    assert image.config["created"] == "2023-11-14T22:13:20Z"
    assert image.config["config"]["Cmd"] == ["/lib/systemd/systemd"]
    assert store.tree_path(image.layers[0].diff_id).is_dir()
    assert (store.checked_dir / oci.hex_of(image.layers[0].diff_id)).exists()
    again = imported.import_image(store, path)
    assert again.id == image.id


def test_import_keeps_setuid_files_and_pseudo_devices(tmp_path: Path, store: Store) -> None:
    # As the layer check of any image: su needs its bit; the store is root's alone.
    tar = crafted_tar(
        ("bin", tarfile.DIRTYPE, {}),
        ("bin/su", tarfile.REGTYPE, {"data": b"su", "mode": 0o4755}),
        ("dev", tarfile.DIRTYPE, {}),
        ("dev/null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3, "mode": 0o666}),
    )
    image = imported.import_image(store, write(tmp_path / "r.tar", tar))
    tree = store.tree_path(image.layers[0].diff_id)
    assert stat.S_IMODE(os.lstat(tree / "bin/su").st_mode) == 0o4755
    assert stat.S_ISCHR(os.lstat(tree / "dev/null").st_mode)


def hostile_rootfs(canary: Path) -> dict[str, tuple[bytes, str]]:
    """Tars that must be refused -> the words of the one-line error. `canary` is a
    directory outside the store that a broken check would write into."""
    return {
        "dotdot": (files_tar({"a/../../escape": b"x"}), "'..' is not allowed"),
        "absolute": (files_tar({"/etc/escape": b"x"}), "absolute names are not allowed"),
        "through-symlink": (
            crafted_tar(
                ("etc", tarfile.SYMTYPE, {"linkname": str(canary)}),
                ("etc/passwd", tarfile.REGTYPE, {"data": b"root::0:0::/:/bin/sh\n"}),
            ),
            "etc is a symlink: refusing to write through it",
        ),
        "disk-device": (
            crafted_tar(("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0})),
            "block device 8:0 is not allowed",
        ),
        "kmem": (
            crafted_tar(("dev/kmem", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 2})),
            "character device 1:2 is not allowed",
        ),
        "hardlink-outside": (
            crafted_tar(("shadow", tarfile.LNKTYPE, {"linkname": str(canary / "secret")})),
            "absolute names are not allowed",
        ),
        "hardlink-up": (
            crafted_tar(("shadow", tarfile.LNKTYPE, {"linkname": "../../etc/shadow"})),
            "'..' is not allowed",
        ),
        "hardlink-to-nothing": (
            crafted_tar(("shadow", tarfile.LNKTYPE, {"linkname": "etc/shadow"})),
            "layer entry 'shadow'",
        ),
        "not-a-tar": (b"this is no tar at all" * 40, "not a valid tar"),
        "corrupt-gzip": (b"\x1f\x8b\x08\x00" + b"\xff" * 100, "not a valid gzip stream"),
    }


@pytest.mark.parametrize("case", sorted(hostile_rootfs(Path("/x"))))
def test_a_hostile_rootfs_is_refused_in_one_line_and_leaves_the_store_as_it_was(
    tmp_path: Path, store: Store, case: str
) -> None:
    canary = tmp_path / "canary"
    canary.mkdir()
    (canary / "secret").write_bytes(b"s3cret")
    data, words = hostile_rootfs(canary)[case]
    path = write(tmp_path / f"{case}.tar", data)
    before = store_state(store)
    with pytest.raises(IngestError) as caught:
        imported.import_image(store, path)
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message
    assert store_state(store) == before
    assert sorted(p.name for p in canary.iterdir()) == ["secret"]
    assert (canary / "secret").read_bytes() == b"s3cret"


def test_import_refuses_what_is_no_regular_file(tmp_path: Path, store: Store) -> None:
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(IngestError, match="not a regular file"):
        imported.import_image(store, tmp_path / "fifo")
    with pytest.raises(IngestError, match="cannot read"):
        imported.import_image(store, tmp_path / "missing.tar")


def test_import_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "r.tar.xz", packed(files_tar(ROOTFS), "xz"))
    argv = ["--store", str(tmp_path / "s"), "import", str(path), "hbring-cli:1"]
    assert cli.main(argv) == 0
    ref, image_id = capsys.readouterr().out.split()
    assert ref == "hbring-cli:1" and image_id.startswith("sha256:")
    bad = write(tmp_path / "bad.tar", files_tar({"/abs": b""}))
    assert cli.main(["--store", str(tmp_path / "s"), "import", str(bad), "hbring-cli:2"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress lines
    assert err.startswith(f"sysbake: error: {bad}: layer entry '/abs'")
    assert cli.main(["--store", str(tmp_path / "s"), "import", str(path), "Bad:Name"]) == 2


# -- archives: docker-archive, oci-archive, OCI layout ----------------------------------------


def tar_of(files: Mapping[str, bytes], links: Mapping[str, str] | None = None) -> bytes:
    """A tar (as `docker save` writes one) of `files`, and of symlinks name -> target."""
    entries: list[Entry] = [(n, tarfile.REGTYPE, {"data": d}) for n, d in files.items()]
    entries += [(n, tarfile.SYMTYPE, {"linkname": t}) for n, t in (links or {}).items()]
    return crafted_tar(*entries)


def docker_archive(
    layer_tars: Sequence[bytes],
    tags: Sequence[str] = ("hbring-dock:1",),
    *,
    diff_ids: Sequence[str] | None = None,
    dedup: bool = False,
) -> bytes:
    """A `docker save` archive of one image; with `dedup`, the second layer's file is a
    symlink to the first's (docker's way with equal layers)."""
    ids = list(diff_ids or [oci.sha256_digest(t) for t in layer_tars])
    config = oci.canonical_json(image_config(ids))
    files: dict[str, bytes] = {}
    links: dict[str, str] = {}
    names = []
    for number, data in enumerate(layer_tars):
        name = f"l{number}/layer.tar"
        names.append(name)
        if dedup and number:
            links[name] = "../l0/layer.tar"
        else:
            files[name] = data
    files["cfg.json"] = config
    files["manifest.json"] = json.dumps(
        [{"Config": "cfg.json", "RepoTags": list(tags), "Layers": names}]
    ).encode()
    return tar_of(files, links)


def oci_layout(
    root: Path,
    layer_tars: Sequence[bytes],
    ref_name: str | None = "hbring-oci:1",
    *,
    diff_ids: Sequence[str] | None = None,
    corrupt_blob: bool = False,
) -> Path:
    """An OCI layout of one image with gzip layers at `root`."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True)

    def put(data: bytes, media_type: str) -> dict[str, object]:
        digest = oci.sha256_digest(data)
        (blobs / oci.hex_of(digest)).write_bytes(data)
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_descs = [put(gzip.compress(t, mtime=0), oci.MT_LAYER_GZIP) for t in layer_tars]
    if corrupt_blob:
        (blobs / oci.hex_of(str(layer_descs[0]["digest"]))).write_bytes(b"other bytes")
    ids = list(diff_ids or [oci.sha256_digest(t) for t in layer_tars])
    config = put(oci.canonical_json(image_config(ids)), oci.MT_CONFIG)
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "config": config,
        "layers": layer_descs,
    }
    desc = put(oci.canonical_json(manifest), oci.MT_MANIFEST)
    if ref_name:
        desc["annotations"] = {oci.ANN_REF_NAME: ref_name}
    index = {"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": [desc]}
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return root


def tar_dir(root: Path) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tf:
        for path in sorted(root.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return out.getvalue()


LAYER1 = files_tar({"etc/a": b"one"})
LAYER2 = files_tar({"etc/b": b"two"})


@pytest.mark.parametrize("kind", ["none", "gzip", "zstd"])
def test_load_docker_archive(tmp_path: Path, store: Store, kind: str) -> None:
    path = write(tmp_path / "d.tar", packed(docker_archive([LAYER1, LAYER2]), kind))
    loaded = ingest.load_archive(store, path)
    assert [item.ref for item in loaded] == ["hbring-dock:1"]
    image = store.resolve("hbring-dock:1")
    # The config byte for byte: docker's image ID is kept.
    config = oci.canonical_json(
        image_config([oci.sha256_digest(LAYER1), oci.sha256_digest(LAYER2)])
    )
    assert image.id == oci.sha256_digest(config)
    assert [la.blob.media_type for la in image.layers] == [oci.MT_LAYER_GZIP] * 2
    store.check_image(image)  # stored layers hash to their diff IDs
    assert store_state(store)[2] == []  # no staging left


def test_load_docker_archive_with_deduplicated_layers(tmp_path: Path, store: Store) -> None:
    path = write(tmp_path / "d.tar", docker_archive([LAYER1, LAYER1], dedup=True))
    (item,) = ingest.load_archive(store, path, tag="hbring-dedup:1")
    assert item.ref == "hbring-dedup:1"
    assert len(item.image.layers) == 2


def test_load_docker_25_archive_of_both_forms(tmp_path: Path, store: Store) -> None:
    # docker 25 writes an OCI layout (index.json, its tags bare) and a manifest.json
    # naming the layout's blobs: the manifest.json, with its whole names, is read.
    config = oci.canonical_json(image_config([oci.sha256_digest(LAYER1)]))
    blobs = {f"blobs/sha256/{oci.hex_of(oci.sha256_digest(b))}": b for b in (LAYER1, config)}
    layer_name, config_name = list(blobs)
    manifest = [{"Config": config_name, "RepoTags": ["hbring-d25:1"], "Layers": [layer_name]}]
    index = {"schemaVersion": 2, "manifests": []}
    files = {
        **blobs,
        "index.json": json.dumps(index).encode(),
        "oci-layout": b'{"imageLayoutVersion": "1.0.0"}',
        "manifest.json": json.dumps(manifest).encode(),
    }
    (item,) = ingest.load_archive(store, write(tmp_path / "d25.tar", tar_of(files)))
    assert item.ref == "hbring-d25:1" and item.image.id == oci.sha256_digest(config)


def test_load_from_standard_input(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    data = gzip.compress(docker_archive([LAYER1]))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    (item,) = ingest.load_archive(store, Path("-"), tag="hbring-stdin:1")
    assert item.ref == "hbring-stdin:1"
    assert store_state(store)[2] == []  # the spooled archive is gone


def test_an_unnamed_image_beside_named_ones_is_left_out(tmp_path: Path, store: Store) -> None:
    one = json.loads(tar_member_of(docker_archive([LAYER1]), "manifest.json"))[0]
    files = {n: tar_member_of(docker_archive([LAYER1]), n) for n in ("l0/layer.tar", "cfg.json")}
    files["manifest.json"] = json.dumps([one, {**one, "RepoTags": []}]).encode()
    loaded = ingest.load_archive(store, write(tmp_path / "two.tar", tar_of(files)))
    assert [item.ref for item in loaded] == ["hbring-dock:1"]


def test_load_oci_layout_and_oci_archive_keep_the_manifest(tmp_path: Path, store: Store) -> None:
    layout = oci_layout(tmp_path / "layout", [LAYER1, LAYER2])
    (item,) = ingest.load_archive(store, layout)
    index = json.loads((layout / "index.json").read_text())
    assert item.ref == "hbring-oci:1"
    assert item.image.manifest.digest == index["manifests"][0]["digest"]
    other = Store(tmp_path / "other").ensure()
    archive = write(tmp_path / "o.tar.gz", gzip.compress(tar_dir(layout)))
    (again,) = ingest.load_archive(other, archive)
    assert again.image.manifest.digest == item.image.manifest.digest


def test_a_bare_tag_needs_a_name(tmp_path: Path, store: Store) -> None:
    layout = oci_layout(tmp_path / "layout", [LAYER1], ref_name="latest")
    with pytest.raises(IngestError, match="carries no name: give one with --tag"):
        ingest.load_archive(store, layout)
    (item,) = ingest.load_archive(store, layout, tag="hbring-named:2")
    assert item.ref == "hbring-named:2"


def hostile_archives(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Archives that must be refused -> the words of the one-line error."""
    tmp_path.mkdir()
    wrong = oci.sha256_digest(b"not the layer")
    absolute = files_tar({"/etc/shadow": b"x"})
    two = docker_archive([LAYER1])
    return {
        "docker-wrong-diff-id": (
            write(tmp_path / "a.tar", docker_archive([LAYER1], diff_ids=[wrong])),
            f"not to its diff_id {wrong}",
        ),
        "docker-hostile-layer": (
            write(tmp_path / "b.tar", docker_archive([absolute])),
            "layer entry '/etc/shadow': absolute names are not allowed",
        ),
        "docker-bad-name": (
            write(tmp_path / "c.tar", docker_archive([LAYER1], tags=["../evil:1"])),
            "the name",
        ),
        "docker-missing-layer": (
            write(
                tmp_path / "d.tar",
                tar_of(
                    {
                        "cfg.json": oci.canonical_json(image_config([oci.sha256_digest(LAYER1)])),
                        "manifest.json": json.dumps(
                            [{"Config": "cfg.json", "RepoTags": ["x:1"], "Layers": ["nope.tar"]}]
                        ).encode(),
                    }
                ),
            ),
            "no file 'nope.tar' in the archive",
        ),
        "docker-link-loop": (
            write(
                tmp_path / "e.tar",
                tar_of(
                    {"manifest.json": b'[{"Config":"a","RepoTags":["x:1"],"Layers":[]}]'},
                    {"a": "b", "b": "a"},
                ),
            ),
            "too many levels of links",
        ),
        "oci-wrong-digest": (
            oci_layout(tmp_path / "f", [LAYER1], corrupt_blob=True),
            "hash to",
        ),
        "oci-hostile-layer": (
            oci_layout(tmp_path / "g", [absolute]),
            "layer entry '/etc/shadow': absolute names are not allowed",
        ),
        "oci-wrong-diff-id": (
            oci_layout(tmp_path / "h", [LAYER1], diff_ids=[wrong]),
            f"not to its diff_id {wrong}",
        ),
        "neither": (write(tmp_path / "i.tar", files_tar({"x": b""})), "neither a docker-archive"),
        "not-a-tar": (write(tmp_path / "j.tar", b"junk" * 300), "not a tar archive"),
        "two-images-one-tag": (
            write(
                tmp_path / "k.tar",
                tar_of(
                    {
                        **{n: tar_member_of(two, n) for n in ("l0/layer.tar", "cfg.json")},
                        "manifest.json": json.dumps(
                            [json.loads(tar_member_of(two, "manifest.json"))[0]] * 2
                        ).encode(),
                    }
                ),
            ),
            "holds 2 images: --tag names one",
        ),
    }


def tar_member_of(data: bytes, name: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        f = tf.extractfile(name)
        assert f is not None
        return f.read()


ARCHIVE_CASES = (
    "docker-wrong-diff-id",
    "docker-hostile-layer",
    "docker-bad-name",
    "docker-missing-layer",
    "docker-link-loop",
    "oci-wrong-digest",
    "oci-hostile-layer",
    "oci-wrong-diff-id",
    "neither",
    "not-a-tar",
    "two-images-one-tag",
)


@pytest.mark.parametrize("case", ARCHIVE_CASES)
def test_a_hostile_archive_is_refused_in_one_line_and_tags_nothing(
    tmp_path: Path, store: Store, case: str
) -> None:
    ingest.load_archive(store, write(tmp_path / "good.tar", docker_archive([LAYER2])))
    cases = hostile_archives(tmp_path / "archives")
    assert sorted(cases) == sorted(ARCHIVE_CASES)
    path, words = cases[case]
    before = store_state(store)
    tag = "hbring-one:1" if case == "two-images-one-tag" else None
    with pytest.raises(IngestError) as caught:
        ingest.load_archive(store, path, tag=tag)
    message = str(caught.value)
    assert message.startswith(str(path)) and words in message and "\n" not in message
    tags, blobs, tmp = store_state(store)
    assert tags == before[0] and tmp == []
    # No blob of the refused layers was committed (a config may be; nothing names it).
    assert all(
        p in before[1] or store.blob_path(f"sha256:{p}").stat().st_size < 4096 for p in blobs
    )
    assert store.resolve("hbring-dock:1").layers  # what was there still loads


def test_a_layout_symlink_never_reads_a_host_file(tmp_path: Path, store: Store) -> None:
    # index.json leads to a host file: inside the layout it resolves to nothing.
    layout = tmp_path / "layout"
    layout.mkdir()
    secret = tmp_path / "secret.json"
    secret.write_text('{"manifests": []}')
    (layout / "index.json").symlink_to(secret)
    (layout / "oci-layout").write_text("{}")
    with pytest.raises(IngestError, match="neither a docker-archive"):
        ingest.load_archive(store, layout)


def test_load_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    s = ["--store", str(tmp_path / "s")]
    path = write(tmp_path / "d.tar", docker_archive([LAYER1]))
    assert cli.main([*s, "load", "-i", str(path)]) == 0
    assert capsys.readouterr().out.startswith("Loaded image: hbring-dock:1 sha256:")
    assert cli.main([*s, "load"]) == 2
    assert "give -i ARCHIVE" in capsys.readouterr().err
    assert cli.main([*s, "load", "-i", str(path), "--into", "podman"]) == 2
    assert "takes no IMAGE, --into or --archive" in capsys.readouterr().err
    assert cli.main([*s, "load", "x", "--into", "podman", "--tag", "a:b"]) == 2


# -- pull from an engine -------------------------------------------------------------------------


def fake_engine(bin_dir: Path, name: str, archive: bytes | None) -> None:
    """An executable `name` whose `save -o FILE ...` writes `archive` (fails without)."""
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "archive.tar").write_bytes(archive or b"")
    script = bin_dir / name
    if archive is None:
        script.write_text("#!/bin/sh\necho 'Error: no such image: web' >&2\nexit 125\n")
    else:
        script.write_text(
            '#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done\n'
            f'exec /bin/cp {bin_dir}/archive.tar "$2"\n'
        )
    script.chmod(0o755)


def test_pull_from_an_engine(tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(sources.SourceError, match="no docker on PATH"):
        sources.pull_engine(store, "docker-daemon:web")
    fake_engine(bin_dir, "podman", None)
    with pytest.raises(sources.SourceError) as caught:
        sources.pull_engine(store, "containers-storage:web")
    assert str(caught.value) == (
        "pull containers-storage:web: `podman save web` failed: Error: no such image: web"
    )
    fake_engine(bin_dir, "docker", docker_archive([LAYER1], tags=["web:latest"]))
    (item,) = sources.pull_engine(store, "docker-daemon:web")
    assert item.ref == "web:latest"
    assert sources.engine_source("docker.io/web") is None


# -- from = "rootfs:FILE", from a registry --------------------------------------------------------


def project(tmp_path: Path, body: str) -> Path:
    (tmp_path / "sysbake.toml").write_text(body)
    return tmp_path / "sysbake.toml"


def test_from_rootfs_in_a_project(tmp_path: Path) -> None:
    write(tmp_path / "base.tar.xz", b"")
    loaded = load_project(project(tmp_path, '[images.b]\nfrom = "rootfs:base.tar.xz"\n'))
    spec = loaded.image("b")
    assert spec.rootfs == tmp_path / "base.tar.xz" and spec.parent is None
    assert spec.key_inputs()["rootfs"] == "base.tar.xz"
    with pytest.raises(ConfigError, match=r"images\.b\.from: file not found"):
        load_project(project(tmp_path, '[images.b]\nfrom = "rootfs:nope.tar"\n'))


def test_from_rootfs_stays_in_the_project(tmp_path: Path) -> None:
    proj = tmp_path / "p"
    proj.mkdir()
    outside = write(tmp_path / "outside.tar", b"")
    (proj / "link.tar").symlink_to(outside)
    with pytest.raises(ConfigError, match="resolves outside the project"):
        load_project(project(proj, '[images.b]\nfrom = "rootfs:link.tar"\n'))
    named = load_project(project(proj, '[images.b]\nfrom = "rootfs:../outside.tar"\n'))
    assert named.image("b").rootfs == outside


def test_the_tarball_digest_is_read_once_per_version(
    tmp_path: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path / "r.tar", files_tar(ROOTFS))
    reads: list[Path] = []
    real = ingest.file_digest

    def counted(p: Path) -> str:
        reads.append(p)
        return real(p)

    monkeypatch.setattr(ingest, "file_digest", counted)
    first = imported.content_digest(store, path)
    assert imported.content_digest(store, path) == first == real(path)
    assert len(reads) == 1
    write(path, files_tar({"other": b""}))
    assert imported.content_digest(store, path) != first
    assert len(reads) == 2


def test_missing_parents_are_those_naming_a_registry(tmp_path: Path, store: Store) -> None:
    body = (
        '[images.a]\nfrom = "127.0.0.1:5000/hbring/base:1"\n'
        '[images.b]\nfrom = "a"\n'
        '[images.c]\nfrom = "local-only:1"\n'
    )
    loaded = load_project(project(tmp_path, body))
    assert missing_parents(loaded, store) == ["127.0.0.1:5000/hbring/base:1"]
    assert missing_parents(loaded, store, ["c"]) == []


# -- the bootstrap's key and mirror ---------------------------------------------------------------


def plan(
    sources_: Sequence[str] = (), *, distro: str = "ubuntu", keyring: str = ""
) -> BootstrapPlan:
    return BootstrapPlan(
        suite="noble",
        variant="minbase",
        architecture="amd64",
        components=("main",),
        packages=(),
        sources=tuple(sources_),
        keyring=keyring,
        snapshot="",
        hooks=(),
        distro=distro,
    )


def test_a_missing_archive_key_says_which_file_and_package(monkeypatch: pytest.MonkeyPatch) -> None:
    exists = os.path.exists  # whatever this host has, the Ubuntu key is missing here
    monkeypatch.setattr(os.path, "exists", lambda p: "ubuntu-archive" not in p and exists(p))
    problem = bootstrap.keyring_problem(plan(), "web", this_distro="debian")
    assert problem == (
        "bootstrap.keyring: distro 'ubuntu' needs its archive key "
        "/usr/share/keyrings/ubuntu-archive-keyring.gpg, which this host lacks: install the "
        "Debian package ubuntu-archive-keyring (Debian 13 on; Ubuntu's ubuntu-keyring), or "
        'set keyring = "FILE" in [images.web.bootstrap] to a keyring holding that key'
    )
    assert bootstrap.keyring_problem(plan(keyring="/k.gpg"), "web", this_distro="debian") is None
    assert bootstrap.keyring_problem(plan(), "web", this_distro="ubuntu") is None
    with pytest.raises(BuildError, match=r"^web: bootstrap\.keyring: distro 'ubuntu'"):
        monkeypatch.setattr(bootstrap, "host_distro", lambda: "debian")
        bootstrap.check_host(plan(), "web")


class _Mirror(http.server.BaseHTTPRequestHandler):
    """A mirror on loopback that has the suites of `files`, by path."""

    files: frozenset[str] = frozenset()

    def do_HEAD(self) -> None:
        self.send_response(200 if self.path in self.files else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def mirror(*files: str) -> Iterator[str]:
    handler = type("Handler", (_Mirror,), {"files": frozenset(files)})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/ubuntu"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_a_mirror_without_the_suite_is_caught() -> None:
    with mirror("/ubuntu/dists/noble/Release") as url:
        assert bootstrap.suite_status(url, "noble") == ("present", "")
        assert bootstrap.mirror_problems(plan([f"deb {url} noble main"]), strict=True) == []
        problems = bootstrap.mirror_problems(plan([f"deb {url} jammy main"]), strict=False)
    assert problems == [
        f"bootstrap.mirror: {url} has no suite 'jammy' "
        "(dists/jammy/InRelease and Release: HTTP 404 Not Found)"
    ]
    with mirror("/ubuntu/dists/noble/InRelease") as url:
        assert bootstrap.suite_status(url, "noble") == ("present", "")


def test_an_unreachable_mirror_is_left_to_the_build(monkeypatch: pytest.MonkeyPatch) -> None:
    with mirror() as url:
        pass  # closed: nothing listens there any more
    lines = [f"deb {url} noble main"]
    assert bootstrap.mirror_problems(plan(lines), strict=False) == []
    (problem,) = bootstrap.mirror_problems(plan(lines), strict=True)
    assert problem.startswith(f"bootstrap.mirror: {url}: cannot tell if it has 'noble': no answer")
    monkeypatch.setattr(bootstrap, "host_distro", lambda: "ubuntu")
    bootstrap.check_host(plan(lines), "web")  # no error: mmdebstrap will say


def test_file_mirrors(tmp_path: Path) -> None:
    (tmp_path / "dists/noble").mkdir(parents=True)
    (tmp_path / "dists/noble/Release").write_text("Suite: noble\n")
    assert bootstrap.suite_status(f"file://{tmp_path}", "noble") == ("present", "")
    assert bootstrap.suite_status(f"file://{tmp_path}", "jammy") == ("missing", "no such file")


def test_validate_online(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with mirror("/ubuntu/dists/noble/InRelease") as url:
        keyring = write(tmp_path / "k.gpg", b"")
        body = (
            '[images.u]\nbootstrap = {distro = "ubuntu", suite = "SUITE", '
            f'mirror = "{url}", keyring = "k.gpg"}}\n'
        )
        good = project(tmp_path, body.replace("SUITE", "noble"))
        assert cli.main(["validate", "--online", str(good)]) == 0
        assert capsys.readouterr().out.startswith("ok: 1 image")
        bad = project(tmp_path, body.replace("SUITE", "jammy"))
        assert cli.main(["validate", str(bad)]) == 0  # offline: not asked
        capsys.readouterr()
        assert cli.main(["validate", "--online", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"sysbake: error: {bad}: images.u.bootstrap.mirror: {url} has no suite 'jammy' "
        "(dists/jammy/InRelease and Release: HTTP 404 Not Found)"
    )
    assert keyring.exists()
