"""Exports read back by independent tools: skopeo, umoci, podman load, docker load, GNU tar;
byte-identical output; deletions across layers; a full disk; bounded memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from services import DockerService, PodmanService

from sysbake.build.finalize import image_config
from sysbake.oci import model as oci
from sysbake.oci.export import ExportError, export_image
from sysbake.oci.layers.commit import commit_tree
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.project.specs import OciConfigSpec

pytestmark = pytest.mark.integration

# The tree the test image is made of: a bookworm tree with systemd.
DELETED_FILE = "etc/issue"
DELETED_DIR = "usr/share/common-licenses"
ADDED_FILE = "etc/sysbake-export-test"
CREATED = "2026-01-01T00:00:00Z"
ONE = "exporttest/one:latest"  # the tree as one layer
TWO = "exporttest/two:1.0"  # plus a layer deleting a file and a directory, adding a file


@dataclass(frozen=True)
class Images:
    store: Store
    rootfs: Path  # the tree the first layer was made from
    one: Image  # ONE
    two: Image  # TWO


def _put(store: Store, ref: str, layers: tuple[Layer, ...]) -> Image:
    config = image_config(
        OciConfigSpec(),
        architecture="amd64",
        diff_ids=[la.diff_id for la in layers],
        history=[{"created": CREATED, "created_by": "export test"} for _ in layers],
        created=CREATED,
        labels={},
    )
    image = store.put_image(config, layers)
    store.tag(ref, image)
    return image


@pytest.fixture(scope="module")
def images(
    tmp_path_factory: pytest.TempPathFactory, shared_store: Path, base_image: str
) -> Iterator[Images]:
    shared = Store(shared_store)
    rootfs = shared.layer_tree(shared.resolve(base_image).layers[0])
    assert (rootfs / "lib/systemd/systemd").exists(), f"{rootfs} is not a systemd tree"
    root = tmp_path_factory.mktemp("export-store")
    store = Store(root).ensure()
    base = commit_tree(store, rootfs)
    upper = root / "upper"
    for rel in (DELETED_FILE, DELETED_DIR):
        (upper / rel).parent.mkdir(parents=True, exist_ok=True)
        os.mknod(upper / rel, stat.S_IFCHR | 0o000, os.makedev(0, 0))  # overlayfs whiteout
    (upper / ADDED_FILE).write_text("added by the second layer\n")
    for d in ("etc", "usr", "usr/share"):
        shutil.copystat(rootfs / d, upper / d)
    top = commit_tree(store, upper, overlay_upper=True)
    yield Images(store, rootfs, _put(store, ONE, (base,)), _put(store, TWO, (base, top)))
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def scratch(tmp_path: Path) -> Iterator[Path]:
    """A temp dir removed afterwards (exports of a whole tree are big)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def run(
    *cmd: str | os.PathLike[str], env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    result = subprocess.run(
        [os.fspath(c) for c in cmd],
        capture_output=True,
        text=True,
        env=None if env is None else {**os.environ, **env},
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, f"{cmd} exited {result.returncode}: {result.stderr}"
    return result.stdout


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def tree_listing(root: Path) -> dict[str, str]:
    """Every path under `root` with its type, mode and size or link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = stat.S_IFMT(st.st_mode)
            detail = (
                os.readlink(path)
                if stat.S_ISLNK(st.st_mode)
                else str(st.st_size)
                if stat.S_ISREG(st.st_mode)
                else ""
            )
            out[str(path.relative_to(root))] = f"{kind:o} {stat.S_IMODE(st.st_mode):o} {detail}"
    return out


# -- OCI layout and oci-archive ------------------------------------------------------------


def test_oci_layout_reads_in_skopeo_and_unpacks_in_umoci(images: Images, scratch: Path) -> None:
    layout = scratch / "layout"
    export_image(images.store, TWO, "oci", layout)
    export_image(images.store, ONE, "oci", layout)
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:{TWO}"))
    assert info["Digest"] == images.two.manifest.digest
    assert info["Layers"] == [la.blob.digest for la in images.two.layers]
    one = json.loads(run("skopeo", "inspect", f"oci:{layout}:{ONE}"))
    assert one["Digest"] == images.one.manifest.digest
    run("umoci", "unpack", "--image", f"{layout}:{TWO}", scratch / "bundle")
    rootfs = scratch / "bundle" / "rootfs"
    assert (rootfs / "lib/systemd/systemd").is_file()
    assert (rootfs / ADDED_FILE).read_text() == "added by the second layer\n"
    assert not os.path.lexists(rootfs / DELETED_FILE)
    assert not os.path.lexists(rootfs / DELETED_DIR)
    assert (rootfs / "usr/share/doc").is_dir()


def test_oci_archive_reads_in_skopeo_and_loads_in_podman(
    images: Images, podman: PodmanService, scratch: Path
) -> None:
    archive = export_image(images.store, TWO, "oci-archive", scratch / "two.tar")
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{archive}:{TWO}"))
    assert info["Digest"] == images.two.manifest.digest
    assert info["Layers"] == [la.blob.digest for la in images.two.layers]
    assert load(podman, archive, f"localhost/{TWO}")[1] == oci.hex_of(images.two.id)


def test_zstd_layers_read_in_skopeo_and_load_in_podman(
    images: Images, podman: PodmanService, scratch: Path
) -> None:
    # umoci 0.4 cannot read zstd layers; podman 4 and containerd can.
    layout = export_image(images.store, TWO, "oci", scratch / "layout", "zstd")
    info = json.loads(run("skopeo", "inspect", "--config", f"oci:{layout}:{TWO}"))
    assert info["rootfs"]["diff_ids"] == list(images.two.diff_ids)
    raw = json.loads(run("skopeo", "inspect", "--raw", f"oci:{layout}:{TWO}"))
    assert {la["mediaType"] for la in raw["layers"]} == {oci.MT_LAYER_ZSTD}
    archive = export_image(images.store, TWO, "oci-archive", scratch / "z.tar", "zstd")
    assert load(podman, archive, f"localhost/{TWO}")[1] == oci.hex_of(images.two.id)


# -- docker-archive ------------------------------------------------------------------------


def load(engine: DockerService | PodmanService, archive: Path, name: str) -> tuple[str, str]:
    """Load `archive` into `engine`: what the load said, and the ID of the image it named
    `name` (removed afterwards: the engines are shared by the whole run)."""
    said = engine.cli("load", "-i", str(archive)).stdout
    try:
        return said, engine.cli("image", "inspect", "--format", "{{.Id}}", name).stdout.strip()
    finally:
        engine.cli("rmi", name, check=False)


def test_docker_archive_loads_in_podman(
    images: Images, podman: PodmanService, scratch: Path
) -> None:
    archive = export_image(images.store, TWO, "docker-archive", scratch / "two.tar")
    assert load(podman, archive, f"localhost/{TWO}")[1] == oci.hex_of(images.two.id)


def test_docker_archive_loads_in_docker(
    images: Images, dockerd: DockerService, scratch: Path
) -> None:
    archive = export_image(images.store, TWO, "docker-archive", scratch / "two.tar")
    said, image_id = load(dockerd, archive, TWO)
    assert f"Loaded image: {TWO}" in said
    assert image_id == images.two.id


# -- rootfs --------------------------------------------------------------------------------


def _untar(archive: Path, dest: Path, *flags: str) -> Path:
    dest.mkdir()
    run("tar", "-x", *flags, "--numeric-owner", "-p", "-f", archive, "-C", dest)
    return dest


def test_rootfs_export_is_the_source_tree(images: Images, scratch: Path) -> None:
    archive = export_image(images.store, ONE, "rootfs", scratch / "rootfs.tar.zst", "zstd")
    tree = _untar(archive, scratch / "tree", "--zstd")
    assert tree_listing(tree) == tree_listing(images.rootfs)


def test_rootfs_export_from_the_tree_is_the_layer(images: Images, scratch: Path) -> None:
    """A one-layer rootfs is re-read from the layer's unpacked tree when the store has one
    (no gzip decoding): the bytes must be the layer's, as from the blob."""
    store, layer = images.store, images.one.layers[0]
    tree = store.tree_path(layer.diff_id)
    assert not tree.exists()
    from_blob = export_image(store, ONE, "rootfs", scratch / "blob.tar", "none")
    assert f"sha256:{sha256_file(from_blob)}" == layer.diff_id
    run("cp", "-a", images.rootfs, tree)
    try:
        from_tree = export_image(store, ONE, "rootfs", scratch / "tree.tar", "none")
        assert sha256_file(from_tree) == sha256_file(from_blob)
        (tree / "etc" / "changed-behind-our-back").write_text("x")
        changed = export_image(store, ONE, "rootfs", scratch / "changed.tar", "none")
        assert sha256_file(changed) != sha256_file(from_blob), "the tree was not read"
    finally:
        run("rm", "-rf", "--one-file-system", tree)


def test_rootfs_export_applies_deletions(images: Images, scratch: Path) -> None:
    archive = export_image(images.store, TWO, "rootfs", scratch / "rootfs.tar.gz", "gzip")
    tree = _untar(archive, scratch / "tree", "--gzip")
    expected = {
        path: entry
        for path, entry in tree_listing(images.rootfs).items()
        if path != DELETED_FILE and path != DELETED_DIR and not path.startswith(DELETED_DIR + "/")
    }
    listing = tree_listing(tree)
    assert listing.pop(ADDED_FILE).endswith(" 26")
    assert listing == expected


# -- reproducibility -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "compression"),
    [
        ("oci-archive", None),
        ("oci-archive", "zstd"),
        ("docker-archive", None),
        ("rootfs", "none"),
        ("rootfs", "gzip"),
        ("rootfs", "zstd"),
        ("rootfs", "xz"),
    ],
)
def test_exports_are_byte_identical(
    images: Images, scratch: Path, fmt: str, compression: str | None
) -> None:
    digests = []
    for attempt in (1, 2):
        out = export_image(images.store, TWO, fmt, scratch / f"{attempt}.out", compression)
        digests.append(sha256_file(out))
        out.unlink()
    assert digests[0] == digests[1]


def test_oci_layouts_are_identical(images: Images, scratch: Path) -> None:
    listings = []
    for attempt in (1, 2):
        layout = export_image(images.store, TWO, "oci", scratch / str(attempt), "none")
        listings.append(
            {
                str(p.relative_to(layout)): sha256_file(p)
                for p in sorted(layout.rglob("*"))
                if p.is_file()
            }
        )
    assert listings[0] == listings[1]
    assert len(listings[0]) == 2 + 2 + len(images.two.layers)  # index, oci-layout, blobs


# -- limits --------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir()
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        run("umount", path)


@pytest.mark.parametrize(
    ("fmt", "compression"), [("docker-archive", None), ("rootfs", "gzip"), ("oci", None)]
)
def test_a_full_disk_is_one_line_and_leaves_nothing(
    images: Images, scratch: Path, fmt: str, compression: str | None
) -> None:
    with small_tmpfs(scratch / "small", "2m") as small:
        with pytest.raises(ExportError) as caught:
            export_image(images.store, ONE, fmt, small / "out", compression)
        assert str(caught.value) == f"cannot write {small / 'out'}: no space left on device"
        assert list(small.iterdir()) == []
    assert list(images.store.tmp_dir.iterdir()) == []


def test_a_read_only_destination_is_one_line(images: Images, scratch: Path) -> None:
    with small_tmpfs(scratch / "ro", "1m,ro") as ro:
        for fmt in ("oci-archive", "oci"):
            with pytest.raises(ExportError) as caught:
                export_image(images.store, ONE, fmt, ro / "out")
            assert str(caught.value).startswith(f"cannot write {ro / 'out'}: read-only file system")


def test_memory_stays_bounded(images: Images, scratch: Path) -> None:
    script = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from sysbake.oci.export import export_image\n"
        "from sysbake.oci.store import Store\n"
        "store = Store(Path(sys.argv[1]))\n"
        "for fmt, comp in (('docker-archive', None), ('oci-archive', 'zstd'),"
        " ('rootfs', 'gzip')):\n"
        "    export_image(store, sys.argv[3], fmt, Path(sys.argv[2]), comp)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n"
    )
    out = run(sys.executable, "-c", script, images.store.root, scratch / "out", TWO)
    peak_mib = int(out.strip()) / 1024
    assert 20 < peak_mib < 300, f"peak RSS {peak_mib:.0f} MiB"
