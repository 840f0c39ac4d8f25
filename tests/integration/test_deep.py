"""Deep images (issue 16): a project of the run's base plus 200 small chroot steps builds,
boots to `running` on both overlay mount paths, exports in every format, and squashes to
one layer holding the same files; the mount paths hold up to overlayfs' 500 layers and
fail with one clear line past their limits.

The project (built once per module into the run's shared store, from its `base:latest`):
`half` is the base plus steps 1-127, `deep` is `half` plus steps 128-200 (201 layers) and
`flat` is `deep` with `squash = true`. Steps write files in /etc and /srv, overwrite,
delete (files of lower steps and of the base), replace a directory, link and hard-link.

podman's own limit: podman 4.3.1 (containers/storage's overlay driver) refuses to mount
more than 128 layers ("max depth exceeded"); `half` has exactly 128 and boots there. A
podman that takes more must boot `deep` too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shlex
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import SYSBAKE, new_store, sysbake
from services import PodmanService, RegistryService, mounts_under

from sysbake.build import steps
from sysbake.build.squash import squash_image
from sysbake.errors import RuntimeFailure
from sysbake.oci.layers.commit import commit_tree
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.runtime import overlay

STEPS = 200
HALF = 127  # steps in `half`: with the base, podman 4.3.1's limit of 128 layers
PODMAN_LIMIT = 128
DEEP, HALF_REF, FLAT = "hdeep:latest", "hdeep-half:latest", "hdeep-flat:latest"
SPECIAL = {
    10: "ln -s /etc/deep.d/001 /srv/deep/link",
    60: "rm -rf /srv/deep && mkdir -p /srv/deep && echo reborn > /srv/deep/marker",
    120: "rm /etc/deep.d/001",
    150: "echo changed > /etc/deep.d/003",
    170: "rm -f /etc/issue.net && chmod 600 /etc/issue",
    190: "mkdir -p /opt/tree/a/b && echo x > /opt/tree/a/b/c && ln /opt/tree/a/b/c /opt/tree/hard",
    200: "echo last > /srv/deep/last",
}


def step_script(i: int) -> str:
    if i in SPECIAL:
        return SPECIAL[i]
    where = "/etc/deep.d" if i % 2 else "/srv/deep"
    return f"mkdir -p {where} && echo {i} > {where}/{i:03}"


def project_text(tag: str = "hdeep", last: str = SPECIAL[200]) -> str:
    """The deep project; `tag` prefixes its tags, `last` is the 200th step's script."""

    def steps(image: str, numbers: range) -> str:
        return "".join(
            f'\n[[images.{image}.provision]]\ntype = "script"\nname = "s{i:03}"\n'
            f'mode = "chroot"\nnetwork = false\n'
            f"run = {json.dumps(last if i == STEPS else step_script(i))}\n"
            for i in numbers
        )

    return (
        '[project]\nname = "hdeep"\n\n'
        f'[images.half]\nfrom = "base:latest"\ntag = "{tag}-half:latest"\n'
        + steps("half", range(1, HALF + 1))
        + f'\n[images.deep]\nfrom = "half"\ntag = "{tag}:latest"\n'
        + steps("deep", range(HALF + 1, STEPS + 1))
        + f'\n[images.flat]\nfrom = "deep"\ntag = "{tag}-flat:latest"\nsquash = true\n'
    )


@dataclass(frozen=True)
class Deep:
    store: Path
    project: Path
    build: dict[str, Any]  # image name -> its `build --json` result

    def cli(
        self, *args: str | os.PathLike[str], check: bool = True, mode: str = "auto"
    ) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, overlay.MOUNT_ENV: mode}
        return sysbake(*args, store=self.store, check=check, env=env)

    def inspect(self, ref: str) -> Any:
        return json.loads(self.cli("inspect", "--json", ref).stdout)


@pytest.fixture(scope="module")
def deep(
    shared_store: Path, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Deep]:
    """The deep project, built (from the shared base, never bootstrapped again)."""
    project = tmp_path_factory.mktemp("hdeep-project")
    (project / "sysbake.toml").write_text(project_text())
    done = sysbake("build", "--json", project, store=shared_store, timeout=3600)
    results = {str(i["name"]): i for i in json.loads(done.stdout)["images"]}
    yield Deep(shared_store, project, results)
    for ref in (DEEP, HALF_REF, FLAT, "hdeep-cmd:latest"):
        sysbake("rmi", ref, store=shared_store, check=False)


def layer_count(deep: Deep, ref: str) -> int:
    return len(deep.inspect(ref)["Layers"])


def history(deep: Deep, ref: str) -> list[dict[str, Any]]:
    return list(deep.inspect(ref)["Config"]["history"])


# -- building ------------------------------------------------------------------------------


def test_each_step_is_a_layer_of_its_own(deep: Deep) -> None:
    assert [len(deep.build[n]["stages"]) for n in ("half", "deep", "flat")] == [HALF, 73, 1]
    assert layer_count(deep, HALF_REF) == HALF + 1
    assert layer_count(deep, DEEP) == STEPS + 1
    entries = history(deep, DEEP)
    assert len(entries) == STEPS + 1
    assert entries[-1]["created_by"] == "sysbake script s200 (chroot)"


def test_squash_true_gives_one_layer_and_a_history_of_what_it_holds(deep: Deep) -> None:
    stages = deep.build["flat"]["stages"]
    assert [s["stage"] for s in stages] == ["squash"]
    assert layer_count(deep, FLAT) == 1
    entries = history(deep, FLAT)
    assert len(entries) == STEPS + 2  # the base, 200 steps, the squash
    assert all(e.get("empty_layer") is True for e in entries[:-1])
    assert [e["created_by"] for e in entries[1:-1]] == [
        f"sysbake script s{i:03} (chroot)" for i in range(1, STEPS + 1)
    ]
    last = entries[-1]
    assert (
        "empty_layer" not in last and last["created_by"] == f"sysbake squash ({STEPS + 1} layers)"
    )
    assert str(last["comment"]).startswith("sysbake squash ")


def test_a_rebuild_reuses_every_stage_then_redoes_only_what_changed(
    deep: Deep, tmp_path: Path
) -> None:
    again = json.loads(deep.cli("build", "--json", deep.project).stdout)["images"]
    assert all(s["reused"] for image in again for s in image["stages"])
    # The last step changed, built on the legacy mount path: its stage and the squash are
    # redone, the 199 below it are reused one by one.
    (tmp_path / "sysbake.toml").write_text(
        project_text("hdeep2", "echo changed-last > /srv/deep/last")
    )
    try:
        done = deep.cli("build", "--json", tmp_path, mode="legacy")
        images = {i["name"]: i for i in json.loads(done.stdout)["images"]}
        redone = [s["stage"] for i in images.values() for s in i["stages"] if not s["reused"]]
        assert redone == ["s200", "squash"]
        assert sum(s["reused"] for s in images["deep"]["stages"]) == 72
        exported = tmp_path / "flat.tar"
        deep.cli("export", "--format", "rootfs", "-o", exported, "hdeep2-flat:latest")
        files = rootfs_index(exported)
        assert files["srv/deep/last"][-1] == sha256(b"changed-last\n")
    finally:
        for ref in ("hdeep2:latest", "hdeep2-half:latest", "hdeep2-flat:latest"):
            deep.cli("rmi", ref, check=False)


# -- running -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["new", "legacy"])
def test_the_deep_image_boots_to_running(deep: Deep, mode: str) -> None:
    if mode == "new" and not overlay.new_api_available():
        pytest.skip("this kernel has no overlay lowerdir+ (Linux 6.8+)")
    name = f"hdeep-boot-{mode}"
    deep.cli("run", "-d", "--name", name, DEEP, mode=mode)
    try:
        state = deep.cli("exec", name, "systemctl", "is-system-running", "--wait", check=False)
        assert state.stdout.strip() == "running", state.stderr
        seen = deep.cli(
            "exec", name, "sh", "-c", "cat /srv/deep/marker /etc/deep.d/003 /srv/deep/last"
        )
        assert seen.stdout.split() == ["reborn", "changed", "last"]
        gone = deep.cli("exec", name, "ls", "/etc/deep.d/001", "/etc/issue.net", check=False)
        assert gone.returncode != 0
        options = rootfs_mount_options(deep.store / "containers" / name)
        if mode == "new":
            assert options.count("lowerdir+=") == STEPS + 1
        else:
            lower = options.split("lowerdir=", 1)[1].split(",", 1)[0].split(":")
            assert len(lower) == STEPS + 1 and all("/" not in n for n in lower)
            for short in lower:  # each a link in the store's l/ to one of its trees
                assert Path(os.readlink(deep.store / "l" / short)).parent == deep.store / "trees"
        deep.cli("stop", name)
    finally:
        deep.cli("rm", "-f", name, check=False)
    assert mounts_under(deep.store / "containers" / name) == []


def test_sysbake_test_passes_on_the_legacy_path(deep: Deep) -> None:
    done = deep.cli("test", "--json", DEEP, mode="legacy", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def rootfs_mount_options(container: Path) -> str:
    """The super options of the container's rootfs overlay (from this namespace)."""
    rootfs = os.path.realpath(container / "bundle" / "rootfs")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split(" - ", 1)
            if fields[0].split()[4] == rootfs:
                return fields[1].split()[2]
    raise AssertionError(f"{rootfs} is not mounted")


# -- exporting -----------------------------------------------------------------------------


def test_exports_in_every_format(deep: Deep, tmp_path: Path) -> None:
    layout = tmp_path / "layout"
    deep.cli("export", "--format", "oci", "-o", layout, DEEP)
    info = json.loads(run("skopeo", "inspect", f"oci:{layout}:{DEEP}"))
    assert len(info["Layers"]) == STEPS + 1

    archive = tmp_path / "deep.oci.tar"
    deep.cli("export", "--format", "oci-archive", "-o", archive, DEEP)
    info = json.loads(run("skopeo", "inspect", f"oci-archive:{archive}:{DEEP}"))
    assert len(info["Layers"]) == STEPS + 1

    docker = tmp_path / "deep.docker.tar"
    deep.cli("export", "--format", "docker-archive", "-o", docker, DEEP)
    with tarfile.open(docker) as tar:
        member = tar.extractfile("manifest.json")
        assert member is not None
        manifest = json.loads(member.read())
    assert manifest[0]["RepoTags"] == [DEEP] and len(manifest[0]["Layers"]) == STEPS + 1

    rootfs = tmp_path / "deep.rootfs.tar"
    deep.cli("export", "--format", "rootfs", "--compression", "none", "-o", rootfs, DEEP)
    files = rootfs_index(rootfs)
    assert files["srv/deep/marker"][-1] == sha256(b"reborn\n")
    assert "etc/deep.d/001" not in files and "etc/issue.net" not in files
    assert files["etc/issue"][1] == 0o600


def test_podman_boots_the_exported_oci_archive_within_its_limit(
    deep: Deep, podman: PodmanService, tmp_path: Path
) -> None:
    flags = shlex.split(deep.cli("flags", "podman").stdout)
    for ref, layers, marker in ((HALF_REF, HALF + 1, "3"), (DEEP, STEPS + 1, "changed")):
        archive = tmp_path / "image.oci.tar"
        deep.cli("export", "--format", "oci-archive", "-o", archive, ref)
        podman.cli("load", "-i", str(archive), timeout=600)
        archive.unlink()
        image = f"localhost/{ref}"
        started = podman.cli(
            "run", "-d", "--network", "none", "--pull", "never", *flags, image, check=False
        )
        if started.returncode != 0:
            # Only past podman's own limit, and saying so.
            assert layers > PODMAN_LIMIT and "max depth exceeded" in started.stderr, started.stderr
            podman.cli("rm", "-af", check=False)
        else:
            container = started.stdout.strip()
            try:
                assert podman.wait_running(container, timeout=120) == "running"
                seen = podman.cli("exec", container, "cat", "/etc/deep.d/003").stdout
                assert seen.strip() == marker
                assert podman.stop(container, timeout=30) == 0
            finally:
                podman.cli("rm", "-f", container, check=False)
        podman.cli("rmi", "-f", image, check=False)


# -- squashing -----------------------------------------------------------------------------


def test_squashed_and_unsquashed_have_the_same_files(deep: Deep, tmp_path: Path) -> None:
    deep.cli("squash", DEEP, "hdeep-cmd:latest")
    by_command, by_project = deep.inspect("hdeep-cmd:latest"), deep.inspect(FLAT)
    assert [lay["diff_id"] for lay in by_command["Layers"]] == [
        lay["diff_id"] for lay in by_project["Layers"]
    ]
    indexes = []
    for ref in (DEEP, FLAT, "hdeep-cmd:latest"):
        out = tmp_path / "rootfs.tar"
        deep.cli("export", "--format", "rootfs", "--compression", "none", "-o", out, ref)
        indexes.append(rootfs_index(out))
        out.unlink()
    assert len(indexes[0]) > 1000
    assert indexes[0] == indexes[1] == indexes[2]
    # The one layer itself: no whiteout, every name once, in canonical order.
    (layer,) = by_project["Layers"]
    blob = deep.store / "oci/blobs/sha256" / layer["digest"].split(":")[1]
    names = [name for name, _ in layer_files(blob)]
    assert not [n for n in names if ".wh." in n]
    assert len(names) == len(set(names)) == len(indexes[0])


def layer_files(blob: Path) -> list[tuple[str, bytes]]:
    """The entries of a gzip layer blob, in order: names, and the content of files."""
    found = []
    with gzip.open(blob) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
        for m in tar:
            data = tar.extractfile(m) if m.isreg() else None
            found.append((m.name, data.read() if data is not None else b""))
    return found


def rootfs_index(path: Path) -> dict[str, tuple[object, ...]]:
    """Each path of a rootfs tar -> (kind, mode, uid, gid, mtime, link, xattrs, content
    digest); a hardlink counts as the file it links to."""
    found: dict[str, tuple[object, ...]] = {}
    links: dict[str, str] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            name = m.name.removeprefix("./").strip("/")
            if not name:
                continue
            data = tar.extractfile(m) if m.isreg() else None
            digest = sha256(data.read()) if data is not None else ""
            xattrs = tuple(sorted((k, v) for k, v in m.pax_headers.items() if "xattr" in k))
            kind = tarfile.REGTYPE if m.islnk() else m.type
            link = m.linkname if m.issym() else ""
            dev = (m.devmajor, m.devminor) if m.ischr() or m.isblk() else ()
            found[name] = (kind, m.mode, m.uid, m.gid, int(m.mtime), link, xattrs, dev, digest)
            if m.islnk():
                links[name] = m.linkname.strip("/")
    for name, target in links.items():
        found[name] = (*found[name][:-1], found[target][-1])
    return found


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def run(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout


# -- the mount paths at their limits (synthetic layers) ---------------------------------------


@pytest.fixture
def layers(tmp_path: Path) -> Iterator[tuple[Path, list[Path]]]:
    """A store with 501 one-file layer trees (trees/<hex>), nothing tagged; unmounted after."""
    store = Store(tmp_path / "store").ensure()
    trees = []
    for i in range(501):
        tree = store.trees_dir / sha256(f"hdeep-{i}".encode())
        tree.mkdir()
        (tree / f"f{i}").write_text(str(i))
        (tree / "top").write_text(str(i))
        trees.append(tree)
    yield store.root, trees
    for target in mounts_under(tmp_path):
        overlay.umount(Path(target))
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.parametrize("mode", ["new", "legacy"])
def test_500_layers_mount_and_501_are_one_clear_error(
    layers: tuple[Path, list[Path]], mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if mode == "new" and not overlay.new_api_available():
        pytest.skip("this kernel has no overlay lowerdir+ (Linux 6.8+)")
    monkeypatch.setenv(overlay.MOUNT_ENV, mode)
    root, trees = layers
    upper, work, target = (root / n for n in ("upper", "work", "merged"))
    for d in (upper, work, target):
        d.mkdir()
    with pytest.raises(RuntimeFailure, match=r"^501 layers are too many .* at most 500\)"):
        overlay.mount_overlay(trees, upper, work, target)
    assert not overlay.is_mounted(target)
    overlay.mount_overlay(trees[:500], upper, work, target)
    try:
        assert (target / "top").read_text() == "499"  # the top layer wins
        assert len(os.listdir(target)) == 501
        options = rootfs_options_at(target)
        if mode == "legacy":
            assert len(options) < os.sysconf("SC_PAGE_SIZE")
            assert len(os.listdir(root / "l")) == 500
        else:
            assert options.count("lowerdir+=") == 500
        # The sweep keeps the trees a mount uses (a legacy one names them by short links).
        Store(root).gc()
        assert all(t.is_dir() for t in trees[:500]) and not trees[500].exists()
    finally:
        overlay.umount(target)
    assert not overlay.is_mounted(target)


def test_past_a_page_the_legacy_path_is_one_clear_error(
    layers: tuple[Path, list[Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(overlay.MOUNT_ENV, "legacy")
    root, trees = layers
    # Upper and work dirs of long paths leave too little of the page for 450 short names.
    deep_dir = root.joinpath(*["d" * 200] * 4)
    upper, work, target = (deep_dir / n for n in ("upper", "work", "merged"))
    for d in (upper, work, target):
        d.mkdir(parents=True)
    with pytest.raises(RuntimeFailure) as err:
        overlay.mount_overlay(trees[:450], upper, work, target)
    message = str(err.value)
    assert message.startswith("450 layers do not fit in one overlay mount on this kernel")
    assert "sysbake squash" in message and "\n" not in message
    assert not overlay.is_mounted(target)
    overlay.mount_overlay(trees[:100], upper, work, target)  # fewer layers still mount
    try:
        assert (target / "top").read_text() == "99"
    finally:
        overlay.umount(target)


def rootfs_options_at(target: Path) -> str:
    point = os.path.realpath(target)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            before, _, after = line.partition(" - ")
            if before.split()[4] == point:
                return after.split()[2]
    raise AssertionError(f"{point} is not mounted")


# -- a step's capture: what it shadows, looked up through the merged parent ----------------------


def test_pruning_through_the_merged_parent_equals_pruning_layer_by_layer(tmp_path: Path) -> None:
    lowers = [tmp_path / f"trees/{sha256(str(i).encode())}" for i in range(3)]
    for tree, files in zip(lowers, LOWER_FILES, strict=True):
        write_tree(tree, files)
    (lowers[1] / "etc").mkdir()
    os.chmod(lowers[1] / "etc", 0o755)
    os.mknod(lowers[1] / "etc/b", 0o600 | stat.S_IFCHR, os.makedev(0, 0))  # b deleted
    os.setxattr(lowers[1] / "opt/d", "trusted.overlay.opaque", b"y")  # d made again
    uppers = [tmp_path / "by-layer", tmp_path / "by-view"]
    for upper in uppers:
        write_tree(upper, UPPER_FILES)
    steps.prune_copy_ups(uppers[0], lowers)
    view, work, merged = (tmp_path / n for n in ("view-upper", "view-work", "view"))
    for d in (view, work, merged):
        d.mkdir()
    overlay.mount_overlay(lowers, view, work, merged)
    try:
        steps.prune_copy_ups(uppers[1], lowers, view=merged)
    finally:
        overlay.umount(merged)
    kept = [sorted(str(p.relative_to(u)) for p in u.rglob("*")) for u in uppers]
    assert (
        kept[0]
        == kept[1]
        == [
            "etc",
            "etc/b",  # the lower one is deleted: a new file
            "etc/c",  # changed
            "new",
            "new/file",
            "opt",
            "opt/d",
            "opt/d/f",  # the lower one is hidden by an opaque dir
        ]
    )


LOWER_FILES = [
    {"etc/a": "a", "etc/b": "b", "usr/x": "x", "opt/d/f": "f"},
    {"usr/x": "x2", "opt/d/g": "g"},
    {"etc/c": "c"},
]
UPPER_FILES = {
    "etc/a": "a",  # as below: a copy-up without a change
    "etc/b": "b",
    "etc/c": "c2",
    "usr/x": "x2",  # as in the layer that last wrote it
    "opt/d/f": "f",
    "opt/d/g": "g",
    "new/file": "n",
}


def write_tree(root: Path, files: dict[str, str]) -> None:
    """Files of `files` under `root`, directories 0755 and files 0644 (the same everywhere,
    so that only content and presence tell a change)."""
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        os.chmod(path, 0o644)
    for d in [root, *(p for p in root.rglob("*") if p.is_dir())]:
        os.chmod(d, 0o755)


def test_push_and_pull_carry_every_layer(
    deep: Deep, registry: RegistryService, env: dict[str, str], tmp_path: Path
) -> None:
    ref = f"{registry.address}/hdeep:latest"
    sysbake("push", DEEP, ref, store=deep.store, env=env)
    store = new_store(tmp_path / "pulled")
    sysbake("pull", ref, store=store, env=env)
    pulled = json.loads(sysbake("inspect", "--json", ref, store=store).stdout)
    assert pulled["Id"] == deep.inspect(DEEP)["Id"] and len(pulled["Layers"]) == STEPS + 1


def test_more_layers_than_one_mount_stacks_still_squash(tmp_path: Path) -> None:
    store = Store(tmp_path / "store").ensure()
    layers = []
    for i in range(overlay.MAX_LAYERS + 2):
        tree = tmp_path / "src" / str(i)
        (tree / "files").mkdir(parents=True)
        (tree / "files" / f"{i:03}").write_text(str(i))
        (tree / "top").write_text(str(i))
        layers.append(commit_tree(store, tree))
        shutil.rmtree(tree)
    (layer,) = squash_image(store, put_image(store, layers)).layers
    found = dict(layer_files(store.blob_path(layer.blob.digest)))
    assert found["top"] == str(overlay.MAX_LAYERS + 1).encode()
    assert sorted(n for n in found if n.startswith("files/")) == [
        f"files/{i:03}" for i in range(overlay.MAX_LAYERS + 2)
    ]
    shutil.rmtree(tmp_path, ignore_errors=True)


def put_image(store: Store, layers: list[Layer]) -> Image:
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]},
        "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
    }
    return store.put_image(config, tuple(layers))


def test_a_killed_chroot_step_leaves_no_mount(deep: Deep, tmp_path: Path) -> None:
    # The step's overlay lives in its own mount namespace: it goes with the step.
    (tmp_path / "sysbake.toml").write_text(
        f'[images.hold]\nfrom = "{DEEP}"\ntag = "hdeep-hold:latest"\n'
        '[[images.hold.provision]]\ntype = "script"\nname = "hold"\nmode = "chroot"\n'
        'network = false\nrun = "touch /srv/started-$$ && sleep 300"\n'
    )
    with subprocess.Popen(
        [*SYSBAKE, "--store", str(deep.store), "build", "--no-cache", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as build:
        try:
            assert build.stderr is not None
            for line in build.stderr:
                if "running in a chroot" in line:
                    break
            time.sleep(1)
            assert mounts_under(deep.store / "tmp") == []  # not even while it runs
        finally:
            build.kill()
            build.wait(timeout=30)
    deadline = time.monotonic() + 30
    while mounts_under(deep.store) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert mounts_under(deep.store) == []
    deep.cli("build", deep.project)  # the next build clears the dead one's staging
    assert not any((deep.store / "tmp").glob("step-hold-*"))
