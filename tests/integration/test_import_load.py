"""Bringing what users already have, for real: the shared base exported as a rootfs tar.xz
and imported again (then `sysbake test` boots it), a project `from = "rootfs:..."` whose
second build reuses the import, `podman save` and `docker save` archives loaded and
booted, docker-daemon: and containers-storage: pulls, hostile tars and archives refused
with the store unchanged, and a `from` pulled from a loopback registry."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import new_store, sysbake
from services import DockerService, PodmanService, RegistryService

from sysbake.oci import model as oci
from sysbake.oci.store import Store

pytestmark = pytest.mark.integration

HELLO = b"brought by hbring\n"


@pytest.fixture(scope="module")
def rootfs_tar(
    tmp_path_factory: pytest.TempPathFactory, shared_store: Path, base_image: str
) -> Path:
    """The shared base exported as a root filesystem tarball (xz)."""
    path = tmp_path_factory.mktemp("hbring-rootfs") / "baseimage.tar.xz"
    sysbake("export", base_image, "--format", "rootfs", "-o", path, store=shared_store)
    return path


@contextlib.contextmanager
def booted(store: Path, ref: str, name: str) -> Iterator[str]:
    """`ref` started with `sysbake run -d` as `name`, booted to running (or degraded);
    stopped and removed afterwards."""
    sysbake("run", "-d", "--name", name, ref, store=store, timeout=300)
    try:
        state = sysbake(
            "exec",
            "-T",
            name,
            "systemctl",
            "is-system-running",
            "--wait",
            store=store,
            check=False,
            timeout=300,
        ).stdout.strip()
        assert state in ("running", "degraded"), state
        yield name
    finally:
        sysbake("stop", name, store=store, check=False, timeout=120)
        sysbake("rm", "-f", name, store=store, check=False, timeout=120)


def state_of(store: Path) -> tuple[list[str], list[str]]:
    """Tags and staging entries of a store: what a refused import or load leaves alone."""
    opened = Store(store)
    tmp = sorted(p.name for p in opened.tmp_dir.iterdir()) if opened.tmp_dir.exists() else []
    return sorted(t.ref for t in opened.tags()), tmp


# -- import ---------------------------------------------------------------------------------------


def test_import_of_an_exported_rootfs_passes_test(
    rootfs_tar: Path, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    store = new_store(tmp_path / "store")
    out = sysbake("import", "--json", rootfs_tar, "hbring/imported:1", store=store)
    result = json.loads(out.stdout)
    base = Store(shared_store).resolve(base_image)
    # The base is one layer: its tree written back by the same writer is the same layer.
    assert result["layer"] == base.layers[0].diff_id
    history = Store(store).resolve("hbring/imported:1").config["history"]
    assert history[0]["created_by"] == "sysbake import baseimage.tar.xz"
    assert str(rootfs_tar) in history[0]["comment"]
    sysbake("test", "hbring/imported:1", store=store, timeout=600)


def test_from_rootfs_builds_and_reuses_the_import(rootfs_tar: Path, tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    os.link(rootfs_tar, proj / "baseimage.tar.xz")
    (proj / "hello.txt").write_bytes(HELLO)
    (proj / "sysbake.toml").write_text(
        '[images.hbring-rootfs]\nfrom = "rootfs:baseimage.tar.xz"\n'
        "[[images.hbring-rootfs.provision]]\n"
        'type = "files"\nsource = "hello.txt"\ndest = "/etc/hbring-hello"\n'
    )
    store = new_store(tmp_path / "store")
    first = json.loads(sysbake("build", "--json", proj, store=store, timeout=1200).stdout)
    stages = {s["stage"]: s["reused"] for s in first["images"][0]["stages"]}
    assert stages == {"import": False, "files-1": False}
    second = json.loads(sysbake("build", "--json", proj, store=store).stdout)
    assert [s["reused"] for s in second["images"][0]["stages"]] == [True, True]
    assert second["images"][0]["id"] == first["images"][0]["id"]
    with booted(store, "hbring-rootfs:latest", "hbring-rootfs") as name:
        cat = sysbake("exec", "-T", name, "cat", "/etc/hbring-hello", store=store)
        assert cat.stdout.encode() == HELLO


def test_hostile_imports_and_loads_are_refused_in_one_line(
    tmp_path: Path, rootfs_tar: Path
) -> None:
    store = new_store(tmp_path / "store")
    sysbake("import", rootfs_tar, "hbring/kept:1", store=store)
    canary = tmp_path / "canary"
    canary.mkdir()
    before = state_of(store)
    hostile = _tar(
        [
            ("etc", tarfile.SYMTYPE, str(canary), b""),
            ("etc/passwd", tarfile.REGTYPE, "", b"root::0:0::/root:/bin/sh\n"),
        ]
    )
    (tmp_path / "hostile.tar").write_bytes(hostile)
    bad = sysbake("import", tmp_path / "hostile.tar", "hbring/bad:1", store=store, check=False)
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1] == (
        f"sysbake: error: {tmp_path / 'hostile.tar'}: layer entry 'etc/passwd': etc is a "
        "symlink: refusing to write through it"
    )
    layer = _tar([("dev/sda", tarfile.BLKTYPE, "", b"")])
    config = oci.canonical_json(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {},
            "rootfs": {"type": "layers", "diff_ids": [oci.sha256_digest(layer)]},
        }
    )
    manifest = [{"Config": "c.json", "RepoTags": ["hbring/bad:2"], "Layers": ["l/layer.tar"]}]
    archive = _tar(
        [
            ("l/layer.tar", tarfile.REGTYPE, "", layer),
            ("c.json", tarfile.REGTYPE, "", config),
            ("manifest.json", tarfile.REGTYPE, "", json.dumps(manifest).encode()),
        ]
    )
    (tmp_path / "hostile-archive.tar").write_bytes(archive)
    refused = sysbake("load", "-i", tmp_path / "hostile-archive.tar", store=store, check=False)
    assert refused.returncode == 1
    assert (
        refused.stderr.strip()
        .splitlines()[-1]
        .endswith(
            "layer 1/1 (l/layer.tar): layer entry 'dev/sda': block device 8:0 is not allowed in "
            "a layer (only null, zero, full, random, urandom, tty, console, ptmx)"
        )
    )
    assert state_of(store) == before
    assert list(canary.iterdir()) == []
    sysbake("test", "hbring/kept:1", store=store, timeout=600)  # the store still works


def _tar(entries: list[tuple[str, bytes, str, bytes]]) -> bytes:
    """A tar of (name, type, link target, content) entries, as a hostile tool writes it."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for name, kind, link, data in entries:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(data)
            if kind == tarfile.BLKTYPE:
                info.devmajor, info.devminor = 8, 0
            tf.addfile(info, io.BytesIO(data))
    return out.getvalue()


# -- load and pull from docker and podman ------------------------------------------------------


def test_load_a_podman_save_archive_and_boot_it(
    podman: PodmanService, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    sysbake("load", base_image, "--into", "podman", store=shared_store, env=podman.env)
    saved = tmp_path / "podman.tar"
    podman.cli("save", "-o", str(saved), "localhost/base:latest", timeout=600)
    oci_saved = tmp_path / "podman-oci.tar"
    podman.cli(
        "save",
        "--format",
        "oci-archive",
        "-o",
        str(oci_saved),
        "localhost/base:latest",
        timeout=600,
    )
    store = new_store(tmp_path / "store")
    out = sysbake("load", "-i", saved, store=store)
    assert out.stdout.startswith("Loaded image: localhost/base:latest sha256:")
    base_id = Store(shared_store).resolve(base_image).id
    assert Store(store).resolve("localhost/base:latest").id == base_id
    oci_out = sysbake("load", "-i", oci_saved, "--tag", "hbring/podman-oci:1", store=store)
    assert "hbring/podman-oci:1" in oci_out.stdout
    with booted(store, "localhost/base:latest", "hbring-podman"):
        pass
    pulled = sysbake(
        "pull",
        "containers-storage:localhost/base:latest",
        "-t",
        "hbring/cs:1",
        store=store,
        env=podman.env,
    )
    assert pulled.stdout.split()[0] == "hbring/cs:1"


def test_load_a_docker_save_archive_and_boot_it(
    dockerd: DockerService, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    sysbake("load", base_image, "--into", "docker", "--host", dockerd.host, store=shared_store)
    saved = tmp_path / "docker.tar"
    dockerd.cli("save", "-o", str(saved), "base:latest", timeout=600)
    gzipped = tmp_path / "docker.tar.gz"
    with open(saved, "rb") as src, gzip.open(gzipped, "wb") as packed:
        while chunk := src.read(1 << 20):
            packed.write(chunk)
    store = new_store(tmp_path / "store")
    sysbake("load", "-i", gzipped, store=store)
    assert Store(store).resolve("base:latest").id == Store(shared_store).resolve(base_image).id
    with booted(store, "base:latest", "hbring-docker"):
        pass
    other = new_store(tmp_path / "other")
    pulled = sysbake("pull", "docker-daemon:base:latest", store=other, env=dockerd.env)
    assert pulled.stdout.split()[0] == "base:latest"
    nowhere = {**dockerd.env, "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    failed = sysbake("pull", "docker-daemon:base:latest", store=other, env=nowhere, check=False)
    assert failed.returncode == 1
    line = failed.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "sysbake: error: pull docker-daemon:base:latest: `docker save base:latest` failed: "
    )
    assert "no-docker.sock" in line


# -- a `from` pulled from a registry -------------------------------------------------------------


def test_a_from_missing_from_the_store_is_pulled(
    registry: RegistryService, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    parent = f"{registry.address}/hbring/base:1"
    sysbake("push", "--sbom", "none", "--no-provenance", base_image, parent, store=shared_store)
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "hello.txt").write_bytes(HELLO)
    (proj / "sysbake.toml").write_text(
        f'[images.hbring-child]\nfrom = "{parent}"\n'
        "[[images.hbring-child.provision]]\n"
        'type = "files"\nsource = "hello.txt"\ndest = "/etc/hbring-hello"\n'
    )
    store = new_store(tmp_path / "store")
    built = sysbake("build", proj, store=store, timeout=1200)
    assert f"==> {parent}: not in the store: pulling it" in built.stderr
    assert Store(store).resolve(parent).id == Store(shared_store).resolve(base_image).id
    # The pull seeded no stage: the only one cached is the build's own step.
    stages = json.loads(sysbake("cache", "ls", "--json", store=store).stdout)
    assert [s["stage"] for s in stages] == ["files-1"]
    again = sysbake("build", proj, store=store)
    assert "pulling" not in again.stderr
