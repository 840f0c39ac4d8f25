"""Issue: the foundation — build the example base from nothing, reuse it, explain, and
survive bad input and interruptions with a consistent store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import EXAMPLE, SYSBAKE, new_store, sysbake


def _stages(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    doc = json.loads(result.stdout)
    return [s for image in doc["images"] for s in image["stages"]]


def test_first_build_bootstraps_and_tags(
    first_build: subprocess.CompletedProcess[str], shared_store: Path
) -> None:
    stages = _stages(first_build)
    assert [(s["stage"], s["reused"]) for s in stages] == [("bootstrap", False)]
    images = json.loads(sysbake("images", "--json", store=shared_store).stdout)
    assert [i["ref"] for i in images] == ["base:latest"]
    table = sysbake("images", store=shared_store).stdout.splitlines()
    assert table[0].split() == ["REPOSITORY", "TAG", "IMAGE", "ID", "CREATED", "SIZE"]
    assert table[1].split()[:2] == ["base", "latest"]


def test_second_build_rebuilds_nothing(
    first_build: subprocess.CompletedProcess[str], shared_store: Path
) -> None:
    again = sysbake("build", "--json", "--target", "base", EXAMPLE, store=shared_store)
    assert all(s["reused"] for s in _stages(again))
    assert (
        json.loads(again.stdout)["images"][0]["id"]
        == json.loads(first_build.stdout)["images"][0]["id"]
    )
    explained = sysbake("build", "--explain", "--target", "base", EXAMPLE, store=shared_store)
    assert explained.stdout.strip() == "base: bootstrap: reused"


def test_base_tree_is_container_correct(base_image: str, shared_store: Path) -> None:
    info = json.loads(sysbake("inspect", base_image, store=shared_store).stdout)
    config = info["Config"]["config"]
    assert config["StopSignal"] == "SIGRTMIN+3"
    assert config["Cmd"] == ["/lib/systemd/systemd"]
    assert "container=oci" in config["Env"]
    assert config["Labels"]["io.sysbake.stage.bootstrap"]
    assert "bookworm" in config["Labels"]["io.sysbake.sources"]
    tree = shared_store / "trees" / info["Layers"][0]["diff_id"].split(":")[1]
    assert (tree / "etc/machine-id").read_text() == ""
    assert os.readlink(tree / "etc/systemd/system/systemd-udevd.service") == "/dev/null"
    assert list((tree / "var/lib/apt/lists").glob("*Packages*")) == []
    assert list((tree / "var/cache/apt/archives").glob("*.deb")) == []
    assert list((tree / "dev").iterdir()) == []


def _project(tmp_path: Path, suite: str = '"bookworm"', **bootstrap: str) -> Path:
    lines = ["[images.base]", "[images.base.bootstrap]", f"suite = {suite}"]
    lines += [f"{k} = {v}" for k, v in bootstrap.items()]
    (tmp_path / "sysbake.toml").write_text("\n".join(lines) + "\n")
    return tmp_path


def _assert_clean(store: Path) -> None:
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(store) not in mounts
    tmp = store / "tmp"
    assert not tmp.exists() or [p.name for p in tmp.iterdir()] == []
    # Nothing runs with the store in its command line: no mmdebstrap, apt, dpkg, chroot.
    assert subprocess.run(["pgrep", "-f", str(store)], capture_output=True).returncode == 1


@pytest.mark.parametrize(
    ("bootstrap", "message"),
    [
        # Caught before mmdebstrap runs: the mirror has no dists/bookwurm.
        ({"suite": '"bookwurm"'}, "has no suite 'bookwurm'"),
        (
            {"packages": '["sysbake-no-such-package"]'},
            "Unable to locate package sysbake-no-such-package",
        ),
        ({"mirror": '"http://127.0.0.1:9/debian"'}, "bootstrap bookworm: "),
    ],
    ids=["unknown-suite", "unknown-package", "mirror-refuses"],
)
def test_bad_bootstrap_input_is_one_clear_line(
    tmp_path: Path, bootstrap: dict[str, str], message: str
) -> None:
    store = new_store(tmp_path / "store")
    project = _project(tmp_path, **bootstrap)
    result = sysbake("build", project, store=store, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("sysbake: error:")]
    assert len(errors) == 1, result.stderr
    assert message in errors[0]
    assert "Traceback" not in result.stderr
    assert json.loads(sysbake("images", "--json", store=store).stdout) == []
    _assert_clean(store)


def test_full_disk_is_reported_and_leaves_the_store_usable(tmp_path: Path) -> None:
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=60m", "tmpfs", str(mnt)], check=True)
    try:
        store = new_store(mnt / "store")
        result = sysbake("build", _project(tmp_path), store=store, check=False)
        assert result.returncode != 0
        assert "No space left" in result.stderr or "no space left" in result.stderr
        assert result.stderr.count("sysbake: error:") == 1
        assert json.loads(sysbake("images", "--json", store=store).stdout) == []
        _assert_clean(store)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def _start_build(project: Path, store: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*SYSBAKE, "--store", str(store), "build", str(project)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_for(predicate: object, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting")


def test_kill_9_mid_bootstrap_and_mid_blob_write(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store")
    project = _project(tmp_path)

    # 1. kill -9 while mmdebstrap runs: the bootstrap dies with us, its mounts with it.
    build = _start_build(project, store)
    _wait_for(
        lambda: (
            subprocess.run(["pgrep", "-f", f"mmdebstrap.*{store}"], capture_output=True).returncode
            == 0
        )
    )
    time.sleep(3)  # well into the bootstrap (mounts made, packages unpacking)
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    _wait_for(
        lambda: subprocess.run(["pgrep", "-f", str(store)], capture_output=True).returncode == 1,
        timeout=30,
    )
    assert str(store) not in Path("/proc/self/mountinfo").read_text()

    # 2. kill -9 while the layer blob is being written.
    build = _start_build(project, store)
    _wait_for(
        lambda: any(
            p.name.startswith("blob-") and p.stat().st_size > 0
            for p in (store / "tmp").glob("blob-*")
        )
    )
    os.kill(build.pid, signal.SIGKILL)
    build.wait()
    assert json.loads(sysbake("images", "--json", store=store).stdout) == []
    assert list(store.glob("cache/stages/*.json")) == []

    # 3. A normal build then succeeds, cleans what the killed ones left, and lists one image.
    sysbake("build", project, store=store)
    images = json.loads(sysbake("images", "--json", store=store).stdout)
    assert [i["ref"] for i in images] == ["base:latest"]
    _assert_clean(store)
    shutil.rmtree(store / "trees", ignore_errors=True)
