"""A full disk is one line naming the path, whoever meets it: mmdebstrap's tar and dpkg in
a bootstrap into a store on a tiny tmpfs, or dpkg in a provision step. The build exits
non-zero and the store stays consistent: `sysbake images` works, nothing is mounted,
staged or running."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import EXAMPLE, new_store, sysbake
from provision_fixtures import StoreState, write_project
from services import mounts_under, unmount_under

from tests.unit.conftest import put_image


def _errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("sysbake: error:")]


@pytest.fixture
def tiny_store(tmp_path: Path) -> Iterator[Path]:
    """A store on an 8 MiB tmpfs (mounted here, unmounted afterwards), sharing the .deb
    cache (on another file system) so that nothing has to be downloaded."""
    mount = tmp_path / "orp-full"
    mount.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0700", "orp-full", str(mount)], check=True
    )
    try:
        yield new_store(mount)
    finally:
        assert unmount_under(mount) == []  # the tmpfs itself, and anything left below


def test_a_bootstrap_into_a_full_store_is_one_line(tiny_store: Path) -> None:
    result = sysbake(
        "build", "--target", "base", EXAMPLE, store=tiny_store, check=False, timeout=1800
    )
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = _errors(result)
    assert len(errors) == 1, result.stderr[-3000:]
    error = errors[0]
    assert error.startswith(
        "sysbake: error: bootstrap bookworm: no space left on device "
        f"writing {tiny_store}/tmp/bootstrap-"
    ), error
    # Then the line of apt, tar or dpkg (whichever filled it first) that met it.
    assert "No space left on device" in error.split("/rootfs: ", 1)[1], error
    # Consistent: readable, nothing tagged, staged, mounted or running.
    assert json.loads(sysbake("images", "--json", store=tiny_store).stdout) == []
    assert json.loads(sysbake("ps", "--all", "--json", store=tiny_store).stdout) == []
    assert mounts_under(tiny_store) == [str(tiny_store)], "a mount was left in the store"
    assert list((tiny_store / "tmp").iterdir()) == []
    assert list((tiny_store / "cache").rglob("*.json")) == []


# A chroot step (where it may mount) whose dpkg unpacks into a directory it has made
# too small: dpkg's own ENOSPC, followed by more output than an error's tail keeps.
DPKG_FILLS_THE_DISK = """\
[images.orp-full]
from = "base:latest"

[[images.orp-full.provision]]
type = "script"
name = "packages"
mode = "chroot"
run = '''
mkdir -p /tmp/orp/DEBIAN /tmp/orp/usr/share/orp-big
for field in "Package: orp-big" "Version: 1" "Architecture: all" \\
    "Maintainer: orp <orp@localhost>" "Description: big"; do echo "$field"; done \\
    > /tmp/orp/DEBIAN/control
head -c 2000000 /dev/urandom > /tmp/orp/usr/share/orp-big/blob
dpkg-deb --build /tmp/orp /tmp/orp-big.deb
mkdir -p /usr/share/orp-big
mount -t tmpfs -o size=256k orp-tiny /usr/share/orp-big
dpkg -i /tmp/orp-big.deb || { for i in 1 2 3 4 5 6 7 8; do echo "fallout $i"; done; exit 1; }
'''
"""


def test_dpkg_filling_the_disk_in_a_step_is_one_line(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "full", {"sysbake.toml": DPKG_FILLS_THE_DISK})
    before = StoreState.of(shared_store)
    result = sysbake("build", project, store=shared_store, check=False, timeout=900)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = _errors(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert errors[0].startswith("sysbake: error: orp-full: packages: no space left on device: "), (
        errors[0]
    )
    assert "'/usr/share/orp-big/blob.dpkg-new'" in errors[0], errors[0]
    assert "fallout" not in errors[0]
    StoreState.of(shared_store).assert_same_as(before)


FAT_FILES_STEP = """\
[images.orp-fat]
from = "orp-tiny:latest"

[[images.orp-fat.provision]]
type = "files"
name = "fat"
source = "fat.bin"
dest = "/fat.bin"
owner = "0"
group = "0"
"""


def _tiny_image(store_path: Path, work: Path) -> str:
    """A one-layer image of a few files (no systemd: a `files` step needs none)."""
    from sysbake.oci.layers.commit import commit_tree
    from sysbake.oci.store import Store

    tree = work / "tiny"
    (tree / "etc").mkdir(parents=True)
    (tree / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (tree / "etc" / "group").write_text("root:x:0:\n")
    store = Store(store_path).ensure()
    put_image(store, commit_tree(store, tree, compression="none"), ref="orp-tiny:latest")
    return "orp-tiny:latest"


def test_a_layer_that_fills_the_store_is_one_line(tiny_store: Path, tmp_path: Path) -> None:
    tiny = _tiny_image(tiny_store, tmp_path)
    project = write_project(tmp_path / "fat", {"sysbake.toml": FAT_FILES_STEP})
    # Incompressible: the step's upper dir fits, the layer written from it does not.
    (project / "fat.bin").write_bytes(os.urandom(5 << 20))
    result = sysbake("build", project, store=tiny_store, check=False, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = _errors(result)
    assert len(errors) == 1, result.stderr[-3000:]
    assert "no space left on device" in errors[0] and str(tiny_store) in errors[0], errors[0]
    images = json.loads(sysbake("images", "--json", store=tiny_store).stdout)
    assert [i["ref"] for i in images] == [tiny]
    assert mounts_under(tiny_store) == [str(tiny_store)], "a mount was left in the store"
    assert list((tiny_store / "tmp").iterdir()) == []
