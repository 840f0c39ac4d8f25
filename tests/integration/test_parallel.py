"""`sysbake build -j N` and two sysbake processes on one store, for real.

Each test works in a store of its own, cloned (hard links: blobs and records are never
written in place) from the run's shared store with the example base in it, so that
the images here start `from = "base:latest"` without bootstrapping again and what a test
prunes or untags touches no other test.

- `-j 2` on two independent images builds both, into the very images of `-j 1`.
- Two `sysbake build` processes at once on overlapping projects both succeed; the image
  they share is made once (the other build waits for it and reuses it), and the store
  agrees with itself afterwards (every tag, layer and stage record whole).
- `cache prune` and `rmi` while a build runs: the prune waits for the build; the store
  stays whole.
- Ctrl-C during `-j 2` (to the process group, as a terminal sends it, or to sysbake
  alone) leaves no container, mount, staging or process behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from helpers import SYSBAKE, new_store, sysbake
from provision_fixtures import StoreState, image_refs, write_project

STEP = """\
[images.hpar-{name}]
from = "base:latest"

[[images.hpar-{name}.provision]]
type = "script"
name = "work"
mode = "{mode}"
network = false
run = "{run}"
"""


def image(name: str, run: str, mode: str = "chroot") -> str:
    return STEP.format(name=name, run=run, mode=mode)


def clone_store(shared: Path, dest: Path) -> Path:
    """A store at `dest` with the images and stage records of `shared` (hard links), and
    the shared caches. Not its trees: overlayfs copies a hard-linked lower file up under
    a new inode, which the image tree's checks take for a file swapped while opened; each
    clone unpacks the layers it uses."""
    new_store(dest)
    for name in ("oci", "checked", "cache"):
        if (shared / name).exists():
            subprocess.run(["cp", "-a", "--link", shared / name, dest / name], check=True)
    return dest


@pytest.fixture
def store(shared_store: Path, base_image: str, tmp_path: Path) -> Path:
    return clone_store(shared_store, tmp_path / "store")


def ids_printed(stdout: str) -> dict[str, str]:
    """`sysbake build`'s stdout ("REF ID" lines) as ref -> image ID."""
    return dict(line.split() for line in stdout.splitlines() if line.strip())


def assert_whole(store: Path) -> None:
    """What `sysbake images`, `inspect` and `cache ls` show is all there: each tagged
    image's config and layer blobs exist with their digests, each stage record's layer
    blob too; no staging or lock of a build is left."""
    blobs = store / "oci" / "blobs" / "sha256"

    def intact(digest: str) -> bool:
        path = blobs / digest.split(":", 1)[1]
        return path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() in digest

    for ref in image_refs(store):
        info = json.loads(sysbake("inspect", "--json", ref, store=store).stdout)
        assert intact(info["Id"]), f"{ref}: config blob missing or corrupt"
        for layer in info["Layers"]:
            assert intact(layer["digest"]), f"{ref}: layer {layer['digest']} missing or corrupt"
    for rec in json.loads(sysbake("cache", "ls", "--json", store=store).stdout):
        assert (blobs / rec["layer"]["digest"].split(":", 1)[1]).is_file(), rec["key"]
    assert list((store / "tmp").iterdir()) == []
    assert sorted(p.name for p in (store / "locks").iterdir()) <= ["gc", "tmp"]


# -- -j 2 against -j 1 ----------------------------------------------------------------------------

PAIR = image(
    "left", "seq 1 300000 | sha256sum > /etc/hpar-left; mkdir /srv/left; seq 1 50000 > /srv/left/n"
) + image("right", "seq 2 300000 | md5sum > /etc/hpar-right; ln -s /etc/hpar-right /srv/right")


def test_two_images_at_once_are_the_images_of_one_at_a_time(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "pair", {"sysbake.toml": PAIR})
    env = {**os.environ, "SOURCE_DATE_EPOCH": "1700000000"}  # reproducible layers
    printed = {}
    for jobs in ("1", "2"):
        store = clone_store(shared_store, tmp_path / f"store-j{jobs}")
        done = sysbake("build", "-j", jobs, project, store=store, env=env, timeout=900)
        printed[jobs] = ids_printed(done.stdout)
        assert image_refs(store) | printed[jobs] == image_refs(store)
        assert_whole(store)
        if jobs == "2":  # each image's progress lines say whose they are
            for name in ("hpar-left", "hpar-right"):
                assert f"[{name}] ==> {name}: work (rebuilding" in done.stderr, done.stderr
    assert set(printed["1"]) == {"hpar-left:latest", "hpar-right:latest"}
    assert printed["2"] == printed["1"]


# -- two processes, one store ---------------------------------------------------------------------

# The image both projects hold (the same stage key: same step, same inputs); its step lasts
# long enough for the two builds to meet in it.
COMMON = image("common", "sleep 4; echo common > /etc/hpar-common")


def _start(project: Path, store: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(
            [*SYSBAKE, "--store", str(store), "build", *args, str(project)],
            stdout=subprocess.PIPE,
            stderr=out,
        )


def _finish(build: subprocess.Popen[bytes], log: Path) -> str:
    try:
        stdout, _ = build.communicate(timeout=900)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    assert build.returncode == 0, log.read_text()[-3000:]
    return stdout.decode()


def test_two_builds_on_one_store_make_a_shared_stage_once(store: Path, tmp_path: Path) -> None:
    one = write_project(tmp_path / "one", {"sysbake.toml": COMMON + image("one", "echo 1 > /1")})
    two = write_project(tmp_path / "two", {"sysbake.toml": COMMON + image("two", "echo 2 > /2")})
    logs = [tmp_path / "one.log", tmp_path / "two.log"]
    builds = [_start(one, store, logs[0]), _start(two, store, logs[1], "-j", "2")]
    printed = [ids_printed(_finish(build, log)) for build, log in zip(builds, logs, strict=True)]
    outputs = [log.read_text() for log in logs]
    made = [out for out in outputs if "hpar-common: work (rebuilding" in out]
    assert len(made) == 1, "the shared stage was made by both builds:\n" + "\n".join(outputs)
    assert "hpar-common: work: cached" in "".join(outputs)
    assert printed[0]["hpar-common:latest"] == printed[1]["hpar-common:latest"]
    refs = image_refs(store)
    for ref in ("hpar-common:latest", "hpar-one:latest", "hpar-two:latest"):
        assert refs[ref] == {**printed[0], **printed[1]}[ref]
    assert_whole(store)


def test_prune_and_rmi_during_a_build_leave_the_store_whole(store: Path, tmp_path: Path) -> None:
    project = write_project(tmp_path / "p", {"sysbake.toml": COMMON})
    log = tmp_path / "build.log"
    build = _start(project, store, log)
    deadline = time.monotonic() + 300
    while "hpar-common: work (rebuilding" not in log.read_text():
        assert build.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    sysbake("rmi", "base:latest", store=store)  # the parent of the image being built
    pruned = sysbake("cache", "prune", store=store, timeout=600)
    # The build was in its step when the prune began: the prune waited for it to end.
    assert "waiting for the builds and pulls using the store" in pruned.stderr
    printed = ids_printed(_finish(build, log))
    refs = image_refs(store)
    assert "base:latest" not in refs
    assert refs["hpar-common:latest"] == printed["hpar-common:latest"]
    assert_whole(store)
    # Every layer of the image survived the prune: its export reads and checks them all.
    rootfs = tmp_path / "rootfs.tar"
    sysbake(
        "export",
        "hpar-common",
        "--format",
        "rootfs",
        "--compression",
        "none",
        "-o",
        rootfs,
        store=store,
    )
    with tarfile.open(rootfs) as tar:
        member = tar.extractfile("etc/hpar-common")
        assert member is not None and member.read() == b"common\n"


# -- Ctrl-C during -j 2 ---------------------------------------------------------------------------

NAPPING = image("nap-boot", "touch /hpar-napping; sleep 6001", mode="boot") + image(
    "nap-chroot", "sleep 6002"
)


def _sleeps() -> list[int]:
    """PIDs of the two steps' sleeps (the booted one seen from the host's /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and (entry / "cmdline").read_bytes() in (
                b"sleep\x006001\x00",
                b"sleep\x006002\x00",
            ):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _alive_in_group(pgid: int) -> list[str]:
    """The processes of group `pgid` that are not zombies (a chroot step's namespace init,
    killed, waits for the host's init to reap it): their stat lines."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text() if entry.name.isdigit() else ""
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            found.append(stat.strip())
    return found


@pytest.mark.parametrize("to", ["group", "sysbake"])
def test_ctrl_c_during_two_jobs_leaves_nothing_behind(store: Path, tmp_path: Path, to: str) -> None:
    project = write_project(tmp_path / "nap", {"sysbake.toml": NAPPING})
    before = StoreState.of(store)
    log = tmp_path / "build.log"
    with open(log, "wb") as out:
        build = subprocess.Popen(
            [*SYSBAKE, "--store", str(store), "build", "-j", "2", str(project)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a shell's foreground job
        )
    try:
        deadline = time.monotonic() + 600
        while len(_sleeps()) < 2:
            assert build.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        if to == "group":  # what a terminal's Ctrl-C does
            os.killpg(build.pid, signal.SIGINT)
        else:
            os.kill(build.pid, signal.SIGINT)
        code = build.wait(180)
    finally:
        if build.poll() is None:
            os.killpg(build.pid, signal.SIGKILL)
            build.wait()
    output = log.read_text()
    assert code == 130, output[-3000:]
    assert "sysbake: interrupted" in output and "Traceback" not in output
    assert _sleeps() == []
    assert _alive_in_group(build.pid) == [], "a process of the build outlived it"
    StoreState.of(store).assert_same_as(before)
    assert sorted(p.name for p in (store / "locks").iterdir()) <= ["gc", "tmp"]
