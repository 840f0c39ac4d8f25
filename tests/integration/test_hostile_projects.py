"""Issue 17, part 2 (and 8): hostile projects. A project's symlink to a host file or directory
never brings that file into an image: named as a `files` source, state tree or script it is
refused by `validate` and `build` (one line, exit 2, nothing built); inside a source it is
copied as a link; inside a state tree the step resolves it in the image's own root. Files
that are not UTF-8 named are hashed, mounted and copied like any other. After each test the
host files it planted are byte-identical.

Projects start `from = "base:latest"` (the shared store's base) with chroot steps.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, cast

import pytest
from helpers import TEST_ROOT, new_store, sysbake
from provision_fixtures import (
    StoreState,
    blob_path,
    files_containing,
    image_refs,
    inspect,
    layer_digests,
    plain,
    write_project,
)

pytestmark = pytest.mark.integration

SECRET_FILE = TEST_ROOT / "prj-secret"
SECRET_DIR = TEST_ROOT / "prj-hostdir"
ODD_NAME = b"caf\xe9-latin1.txt"  # not UTF-8


class Planted:
    """Host files a test planted: their secret bytes, and a fingerprint to compare."""

    def __init__(self) -> None:
        self.secret = f"prj-host-secret-{uuid.uuid4().hex}".encode()
        SECRET_FILE.write_bytes(self.secret + b"\n")
        SECRET_DIR.mkdir(exist_ok=True)
        (SECRET_DIR / "top.sls").write_bytes(b"base: {'*': [leak]}\n")
        (SECRET_DIR / "leak.sls").write_bytes(b"# " + self.secret + b"\n")
        (SECRET_DIR / "data").write_bytes(self.secret + b" in a dir\n")
        self.before = self.fingerprint()

    @staticmethod
    def fingerprint() -> dict[str, tuple[str, int, int]]:
        out = {}
        for path in (SECRET_FILE, *sorted(SECRET_DIR.iterdir())):
            st = path.lstat()
            out[str(path)] = (
                hashlib.sha256(path.read_bytes()).hexdigest(),
                st.st_mode,
                st.st_mtime_ns,
            )
        return out


@pytest.fixture
def planted() -> Iterator[Planted]:
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    host = Planted()
    yield host
    assert Planted.fingerprint() == host.before, "a planted host file changed"
    SECRET_FILE.unlink()
    shutil.rmtree(SECRET_DIR)


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [ln for ln in result.stderr.splitlines() if ln.startswith("sysbake: error:")]


def refused(root: Path, store: Path, expected: str) -> None:
    """`validate` and `build` of `root` both fail with exit 2 and the one line `expected`."""
    for command in ("validate", "build"):
        result = sysbake(command, root, store=store, check=False, timeout=300)
        assert result.returncode == 2, (command, result.stderr)
        assert error_lines(result) == [f"sysbake: error: {expected}"], result.stderr
        assert result.stderr.count("Traceback") == 0


def project(tmp_path: Path, name: str, steps: str, files: dict[str, str]) -> Path:
    toml = f'[images.{name}]\nfrom = "base:latest"\ntag = "{name}:latest"\n{steps}'
    return write_project(tmp_path / name, {"sysbake.toml": toml, **files})


# -- refused: a named input that is a link to a host path --------------------------------------


def test_files_source_linked_to_a_host_file_is_refused(
    planted: Planted, tmp_path: Path, shared_store: Path
) -> None:
    root = project(
        tmp_path,
        "prj-src",
        '[[images.prj-src.provision]]\ntype = "files"\nsource = "shadow"\ndest = "/etc/copied"\n',
        {},
    )
    (root / "shadow").symlink_to(SECRET_FILE)
    before = StoreState.of(shared_store)
    refused(
        root,
        shared_store,
        f'{root}/sysbake.toml: images.prj-src.provision[1].source: "shadow" resolves '
        f"outside the project (a symlink to {SECRET_FILE}): name the outside path "
        "explicitly if you mean it",
    )
    StoreState.of(shared_store).assert_same_as(before)


def test_state_tree_linked_to_a_host_dir_is_refused(planted: Planted, tmp_path: Path) -> None:
    root = project(
        tmp_path,
        "prj-tree",
        '[[images.prj-tree.provision]]\ntype = "salt"\nmode = "chroot"\nstate_tree = "salt"\n',
        {},
    )
    (root / "salt").symlink_to(SECRET_DIR)
    store = new_store(tmp_path / "store")
    refused(
        root,
        store,
        f'{root}/sysbake.toml: images.prj-tree.provision[1].state_tree: "salt" resolves '
        f"outside the project (a symlink to {SECRET_DIR}): name the outside path "
        "explicitly if you mean it",
    )
    assert image_refs(store) == {}


def test_script_and_pillar_linked_to_host_paths_are_refused(
    planted: Planted, tmp_path: Path
) -> None:
    store = new_store(tmp_path / "store")
    root = project(
        tmp_path,
        "prj-script",
        '[[images.prj-script.provision]]\ntype = "script"\n'
        'mode = "chroot"\nscript = "steps/run.sh"\n',
        {},
    )
    (root / "steps").symlink_to(SECRET_DIR)
    refused(
        root,
        store,
        f'{root}/sysbake.toml: images.prj-script.provision[1].script: "steps/run.sh" '
        f"resolves outside the project (steps is a symlink to {SECRET_DIR}): name the "
        "outside path explicitly if you mean it",
    )
    root = project(
        tmp_path,
        "prj-pillar",
        '[[images.prj-pillar.provision]]\ntype = "salt"\n'
        'mode = "chroot"\nstate_tree = "salt"\npillar = "pillar"\n',
        {"salt/top.sls": "base: {'*': []}\n"},
    )
    (root / "pillar").symlink_to(SECRET_DIR)
    refused(
        root,
        store,
        f'{root}/sysbake.toml: images.prj-pillar.provision[1].pillar: "pillar" resolves '
        f"outside the project (a symlink to {SECRET_DIR}): name the outside path "
        "explicitly if you mean it",
    )


# -- built safely: links inside inputs, names that are not UTF-8 ---------------------------------


INPUTS = """\
[[images.prj-inputs.provision]]
type = "files"
name = "conf"
source = "conf"
dest = "/etc/prj/"

[[images.prj-inputs.provision]]
type = "salt"
name = "states"
mode = "chroot"
state_tree = "salt"
"""
STATES = {
    "salt/top.sls": "base: {'*': [ran]}\n",
    "salt/ran.sls": "/etc/prj-salt-ran:\n  file.managed:\n    - contents: ran\n",
    "conf/plain.txt": "plain\n",
}


def members(store: Path, digest: str) -> dict[bytes, tuple[tarfile.TarInfo, bytes]]:
    """The entries of a layer blob by raw name (without './'), with file contents."""
    out = {}
    with (
        plain(blob_path(store, digest)) as f,
        tarfile.open(fileobj=cast(IO[bytes], f), mode="r|", errors="surrogateescape") as tar,
    ):
        for m in tar:
            data = tar.extractfile(m).read() if m.isfile() else b""  # type: ignore[union-attr]
            out[os.fsencode(m.name).removeprefix(b"./").rstrip(b"/")] = (m, data)
    return out


def test_links_inside_inputs_stay_links_and_odd_names_build(
    planted: Planted, tmp_path: Path, shared_store: Path, base_image: str
) -> None:
    root = project(tmp_path, "prj-inputs", INPUTS, STATES)
    (root / "conf/secret-link").symlink_to(SECRET_FILE)
    (root / "conf/dir-link").symlink_to(SECRET_DIR)
    (root / "salt/leak").symlink_to(SECRET_FILE)  # mounted, resolved in the image's root
    with open(os.fsencode(root / "conf") + b"/" + ODD_NAME, "wb") as f:
        f.write(b"odd\n")
    with open(os.fsencode(root / "salt") + b"/" + ODD_NAME, "wb") as f:
        f.write(b"odd\n")
    sysbake("validate", root, store=shared_store)
    built = sysbake("build", root, store=shared_store, timeout=900)
    # Salt cannot serve that name: the step says so and runs without it.
    assert (
        f"warning: {root}/salt/caf\\xe9-latin1.txt: names that are not UTF-8, which "
        "Salt cannot serve: they are left out of the state tree or pillar" in built.stderr
    )

    base = layer_digests(shared_store, base_image)
    ours = [d for d in layer_digests(shared_store, "prj-inputs:latest") if d not in base]
    assert len(ours) == 2
    conf = members(shared_store, ours[0])
    link, _ = conf[b"etc/prj/secret-link"]
    assert link.issym() and link.linkname == str(SECRET_FILE)
    link, _ = conf[b"etc/prj/dir-link"]
    assert link.issym() and link.linkname == str(SECRET_DIR)
    assert not any(name.startswith(b"etc/prj/dir-link/") for name in conf)
    assert conf[b"etc/prj/plain.txt"][1] == b"plain\n"
    assert conf[b"etc/prj/" + ODD_NAME][1] == b"odd\n"
    states = members(shared_store, ours[1])
    assert states[b"etc/prj-salt-ran"][1] == b"ran\n"
    # The secret is in no layer of the image, nor in its adopted trees.
    for digest in ours:
        with plain(blob_path(shared_store, digest)) as f:
            assert planted.secret not in f.read()
    for layer in inspect(shared_store, "prj-inputs:latest")["Layers"]:  # type: ignore
        tree = shared_store / "trees" / str(layer["diff_id"]).split(":")[1]
        if layer["digest"] in ours and tree.is_dir():
            assert files_containing(tree, planted.secret) == []

    # Cached: the same inputs hit, a changed odd-named file misses (it is hashed).
    explain = sysbake("build", "--explain", root, store=shared_store).stdout
    assert "prj-inputs: conf: reused" in explain and "prj-inputs: states: reused" in explain
    with open(os.fsencode(root / "salt") + b"/" + ODD_NAME, "wb") as f:
        f.write(b"changed\n")
    explain = sysbake("build", "--explain", root, store=shared_store, timeout=900).stdout
    assert "prj-inputs: conf: reused" in explain
    assert "prj-inputs: states: rebuilt because" in explain


def test_salt_reads_a_tree_link_in_the_image_not_on_the_host(
    planted: Planted, tmp_path: Path, shared_store: Path, base_image: str
) -> None:
    steps = '[[images.prj-leak.provision]]\ntype = "salt"\nmode = "chroot"\nstate_tree = "salt"\n'
    root = project(
        tmp_path,
        "prj-leak",
        steps,
        {
            "salt/top.sls": "base: {'*': [copy]}\n",
            "salt/copy.sls": "/etc/prj-leaked:\n  file.managed:\n    - source: salt://leak\n",
        },
    )
    (root / "salt/leak").symlink_to(SECRET_FILE)
    before = StoreState.of(shared_store)
    result = sysbake("build", root, store=shared_store, check=False, timeout=900)
    # The link leads nowhere in the image: the state fails, nothing is tagged.
    assert result.returncode == 1, result.stderr
    (line,) = error_lines(result)
    assert line.startswith(
        "sysbake: error: prj-leak: salt-1: salt: 1 of 1 states failed, "
        "first: /etc/prj-leaked (file.managed '/etc/prj-leaked', sls copy):"
    ), line
    assert "salt://leak not found" in line, line
    StoreState.of(shared_store).assert_same_as(before)
    assert files_containing(shared_store / "tmp", planted.secret) == []
