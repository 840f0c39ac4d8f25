"""Hostile images: a parent whose directories are symlinks aimed at host paths, in every
directory that sysbake's own code touches (clean-up, `files` steps, make-container-ready,
the runtime's /etc files, chroot mode's mounts and policy-rc.d). After each build, run
and export every host file the test planted is byte-identical, the command either
succeeded (having written inside the image) or failed with one clear line, and the
store is consistent."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import TEST_ROOT, sysbake
from provision_fixtures import StoreState, write_project

# Host paths the image's symlinks aim at (made below a fresh host dir per test run).
PLANTED = {
    "log/syslog": b"host syslog\n",
    "log/wtmp": b"host wtmp\n",
    "log/journal/0123/system.journal": b"host journal\n",
    "lists/deb_Packages": b"host lists\n",
    "lists/lock": b"",
    "cache/pkgcache.bin": b"host cache\n",
    "cache/archives/x.deb": b"host deb\n",
    "ssh/ssh_host_rsa_key": b"host key\n",
    "tmp/junk": b"host tmp\n",
    "etc-somefile": b"host file, must not be overwritten\n",
    "optdir/existing": b"host dir entry\n",
    "machine-id": b"host machine id\n",
    "dbus/machine-id": b"host dbus id\n",
    "salt/pki/minion.pem": b"host pem\n",
    "systemd/random-seed": b"host seed\n",
    "systemd/timers/stamp-x": b"host stamp\n",
    "bash_history": b"host history\n",
    "up/victim": b"reached by ..\n",
    "usrsbin/keep": b"host sbin\n",
}

# Each line of the planting step (a chroot script inside the image) makes one directory
# or file of the image a symlink to a host path ($H is the host dir).
PLANT = r"""
set -e
rm -rf /var/log && ln -s "$H/log" /var/log
rm -rf /var/lib/apt/lists && ln -s "$H/lists" /var/lib/apt/lists
rm -rf /var/cache/apt && ln -s "$H/cache" /var/cache/apt
rm -rf /etc/ssh && ln -s "$H/ssh" /etc/ssh
rm -rf /tmp && ln -s "$H/tmp" /tmp
ln -sfn "$H/etc-somefile" /etc/somefile
ln -sfn "$H/optdir" /opt/dir
rm -f /etc/machine-id && ln -s "$H/machine-id" /etc/machine-id
rm -rf /var/lib/dbus && ln -s "$H/dbus" /var/lib/dbus
mkdir -p /etc/salt && ln -sfn "$H/salt/pki" /etc/salt/pki
rm -rf /var/lib/systemd/timers && ln -s "$H/systemd/timers" /var/lib/systemd/timers
ln -sfn "$H/systemd/random-seed" /var/lib/systemd/random-seed
ln -sfn "$H/bash_history" /root/.bash_history
mkdir -p /srv && ln -sfn "../../../../../../../../../../..$H/up" /srv/up
ln -sfn "$H/hosts" /etc/hostname
"""


def _fingerprint(top: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry below `top`: mode, owner, group and content hash (or link target)."""
    out: dict[str, tuple[int, int, int, str]] = {}
    for dirpath, dirs, files in os.walk(top):
        for name in dirs + files:
            path = Path(dirpath, name)
            st = path.lstat()
            if path.is_symlink():
                what = "-> " + os.readlink(path)
            elif path.is_file():
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = "dir"
            out[str(path.relative_to(top))] = (st.st_mode, st.st_uid, st.st_gid, what)
    return out


@pytest.fixture
def untagged(shared_store: Path) -> Iterator[None]:
    """The shared store without this module's tag afterwards (other tests list its tags)."""
    yield
    sysbake("rmi", "hostile:latest", store=shared_store, check=False)


@pytest.fixture
def host_dir() -> Iterator[Path]:
    """A host directory full of files a hostile image aims at."""
    top = TEST_ROOT / f"hostile-{uuid.uuid4().hex[:8]}"
    for rel, data in PLANTED.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
    yield top
    shutil.rmtree(top, ignore_errors=True)


def _one_clear_line(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("sysbake: "), result.stderr


def _project(tmp: Path, host: Path, steps: str) -> Path:
    return write_project(
        tmp,
        {
            "sysbake.toml": f"""\
[images.hostile]
from = "base:latest"

[[images.hostile.provision]]
type = "script"
name = "plant"
mode = "chroot"
env = {{ H = "{host}" }}
run = '''{PLANT}'''

[images.hostile.finalize]
remove = ["/opt/dir/*", "/srv/up/*"]
tmp = false  # what the files steps wrote inside the image (its /var/tmp/...) stays
{steps}""",
            "files/somefile": "written by the files step\n",
            "files/tree/new-in-dir": "copied into /opt/dir\n",
            "files/tree/sub/deeper": "deeper\n",
        },
    )


def _build(store: Path, host: Path, tmp: Path, steps: str, before: object) -> None:
    """Build the hostile project with `steps` as hostile:latest: it must succeed, and
    leave the planted host files as they were (`before`)."""
    project = _project(tmp / "proj", host, steps)
    result = sysbake("build", "--target", "hostile", project, store=store, check=False)
    assert _fingerprint(host) == before, result.stderr
    assert result.returncode == 0, result.stderr


FILES_STEPS = """
[[images.hostile.provision]]
type = "files"
name = "onto-symlinked-file"
source = "files/somefile"
dest = "/etc/somefile"

[[images.hostile.provision]]
type = "files"
name = "into-symlinked-dir"
source = "files/tree"
dest = "/opt/dir/"

[[images.hostile.provision]]
type = "files"
name = "through-dotdot"
source = "files/somefile"
dest = "/srv/up/victim"

[[images.hostile.provision]]
type = "script"
name = "chroot-after"
mode = "chroot"
run = "echo chroot step ran > /etc/chroot-after"
"""


def test_symlinks_to_host_paths_in_a_parent_never_reach_the_host(
    shared_store: Path, base_image: str, host_dir: Path, tmp_path: Path, untagged: None
) -> None:
    before = _fingerprint(host_dir)
    state = StoreState.of(shared_store)
    _build(shared_store, host_dir, tmp_path, FILES_STEPS, before)
    # The writes went inside the image, where its symlinks lead there.
    out = tmp_path / "rootfs.tar"
    sysbake(
        "export",
        "hostile:latest",
        "--format",
        "rootfs",
        "--compression",
        "none",
        "-o",
        out,
        store=shared_store,
    )
    assert _fingerprint(host_dir) == before
    inner = str(host_dir).lstrip("/")
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        somefile = tar.extractfile(f"{inner}/etc-somefile")
        assert somefile is not None and somefile.read() == b"written by the files step\n"
        assert f"{inner}/optdir/new-in-dir" not in names  # removed by finalize's remove
        assert "etc/chroot-after" in names
    after = StoreState.of(shared_store)
    assert after.mounts == state.mounts and after.runc == state.runc
    assert [c for c in after.containers if c.startswith("build-")] == []


BOOT_STEPS = """
[[images.hostile.provision]]
type = "script"
name = "booted"
run = "echo booted step ran > /etc/booted-step"
"""


def test_a_booted_step_and_run_of_a_hostile_parent_never_reach_the_host(
    shared_store: Path, base_image: str, host_dir: Path, tmp_path: Path, untagged: None
) -> None:
    before = _fingerprint(host_dir)
    state = StoreState.of(shared_store)
    _build(shared_store, host_dir, tmp_path, BOOT_STEPS, before)
    name = f"hostile-{uuid.uuid4().hex[:6]}"
    run = sysbake("run", "-d", "--name", name, "hostile:latest", store=shared_store, check=False)
    try:
        assert _fingerprint(host_dir) == before
        if run.returncode != 0:
            _one_clear_line(run)
    finally:
        sysbake("rm", "-f", name, store=shared_store, check=False)
    assert _fingerprint(host_dir) == before
    after = StoreState.of(shared_store)
    assert after.mounts == state.mounts and after.runc == state.runc
