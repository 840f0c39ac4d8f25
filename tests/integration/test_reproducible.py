"""Issue 13, parts 1-2: reproducible by default, and `sysbake verify`.

The bundled example, built in the run's store (its base bootstrapped there from nothing),
and rebuilt from nothing by `sysbake verify` in a scratch store of its own: the same
digest for every image, no SOURCE_DATE_EPOCH set. Then one byte of a state tree changes
and `verify`, against the image built before, names exactly the file it changes. Two
bootstraps in all: the run's (shared with the other tests) and verify's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import EXAMPLE, sysbake

STATE = """\
/etc/hrepro-motd:
  file.managed:
    - contents: "built by sysbake\\n"

/etc/hrepro-other:
  file.managed:
    - contents: "left as it is\\n"
"""
PROJECT = """\
[images.hrepro-motd]
from = "base:latest"

[[images.hrepro-motd.provision]]
type = "salt"
name = "motd"
state_tree = "salt"
"""


@pytest.fixture(autouse=True)
def _default_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)  # the default is under test


def _built(result: subprocess.CompletedProcess[str]) -> dict[str, str]:
    """Image name -> manifest digest, from `build --json`."""
    return {image["name"]: image["manifest"] for image in json.loads(result.stdout)["images"]}


def _clean(store: Path) -> None:
    """Nothing of a verify stays: no scratch store, no mount of one."""
    assert not list((store / "tmp").glob("verify-*"))
    assert str(store) not in Path("/proc/self/mountinfo").read_text()


def test_the_example_rebuilds_to_the_same_digests(shared_store: Path, base_image: str) -> None:
    built = _built(sysbake("build", "--json", EXAMPLE, store=shared_store))
    assert set(built) == {"base", "web"}
    done = sysbake("verify", "--json", "web:latest", EXAMPLE, store=shared_store, check=False)
    verdict = json.loads(done.stdout)
    if not verdict["reproducible"] and "created" in verdict["config"]:
        pytest.skip("the mirror published a new Release between the two builds")
    assert done.returncode == 0, done.stdout + done.stderr
    assert verdict["reproducible"] is True
    assert verdict["digest"] == verdict["rebuilt"] == built["web"]
    assert verdict["images"] == built  # every image of the two builds: base too
    assert verdict["files"] == [] and verdict["config"] == []
    _clean(shared_store)


def test_verify_names_exactly_the_file_a_changed_byte_changes(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "salt/motd").mkdir(parents=True)
    (project / "sysbake.toml").write_text(PROJECT)
    (project / "salt/top.sls").write_text("base:\n  '*':\n    - motd\n")
    state = project / "salt/motd/init.sls"
    state.write_text(STATE)
    built = _built(sysbake("build", "--json", project, store=shared_store))

    data = state.read_bytes()
    at = data.index(b"built")
    state.write_bytes(data[:at] + b"B" + data[at + 1 :])  # one byte: "built" -> "Built"
    done = sysbake("verify", "hrepro-motd:latest", project, store=shared_store, check=False)

    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"not reproducible: hrepro-motd:latest is {built['hrepro-motd']}")
    assert [line for line in lines if line.startswith("layer ")] == [
        "layer 2 (motd): /etc/hrepro-motd: content"
    ]
    assert any(
        line.startswith("stage motd: its inputs changed since the image was built: trees.salt")
        for line in lines
    ), lines
    _clean(shared_store)
    # The image verified is the one built before, untouched.
    inspect = json.loads(sysbake("inspect", "hrepro-motd:latest", store=shared_store).stdout)
    assert inspect["Manifest"]["digest"] == built["hrepro-motd"]
    sysbake("rmi", "hrepro-motd:latest", store=shared_store)
