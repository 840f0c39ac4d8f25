"""The start-up budget (the rule is stated in sysbake.commands' docstring): the modules that
`run`, `stop`, `exec`, `ps` and a no-op `build` import.

Each command line runs through sysbake.cli.main in a fresh interpreter, as far as it goes
without privileges or a container: `run` names an image the store lacks, `stop` and `exec`
a container it lacks, `ps` lists an empty store, `build` rebuilds a project whose every
stage is cached. The modules imported by then (those of sys.modules, less the
interpreter's own start-up) must keep within the path's budget: sysbake modules from its
list, none of the costly stdlib modules it must not load, and a count. A module new on one
of these paths fails here: import it in the function that needs it, or raise the budget
here on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from sysbake import cli
from sysbake.build import pipeline
from sysbake.build.context import BuildContext, Stage
from sysbake.oci.model import Layer
from sysbake.records import replace
from tests.unit.conftest import files_tar, put_layer

# Runs the command line after the output file's name; then writes the modules it imported.
_PROBE = """\
import sys
before = set(sys.modules)
from sysbake import cli
out = sys.argv.pop(1)
try:
    code = cli.main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
modules = sorted(set(sys.modules) - before)
import json
with open(out, "w") as f:
    json.dump({"code": code, "modules": modules}, f)
"""

_RUNTIME = frozenset(
    {
        "sysbake",
        "sysbake.cli",
        "sysbake.commands",
        "sysbake.commands.formats",  # ps: docker's columns and wording
        "sysbake.commands.runtime",
        "sysbake.errors",
        "sysbake.fsutil",
        "sysbake.log",
        "sysbake.oci",
        "sysbake.oci.model",
        "sysbake.oci.reference",
        "sysbake.oci.store",
        "sysbake.proc",
        "sysbake.rootfs",
        "sysbake.runtime",
        "sysbake.runtime.bundle",
        "sysbake.runtime.container_dir",
        "sysbake.runtime.containers",
        "sysbake.runtime.inside",
        "sysbake.runtime.overlay",
        "sysbake.runtime.owners",
        "sysbake.signals",
        "sysbake.cgroups",
    }
)
# What a cache hit needs: the project, the stage keys, the cache and the store; never what
# makes a layer (mmdebstrap, runc, Salt, tar writers) or the registry client.
_NOOP_BUILD = frozenset(
    {
        "sysbake",
        "sysbake.cli",
        "sysbake.commands",
        "sysbake.commands.build",
        "sysbake.commands.registry",
        "sysbake.errors",
        "sysbake.fsutil",
        "sysbake.log",
        "sysbake.proc",
        "sysbake.records",
        "sysbake.signals",
        "sysbake.oci",
        "sysbake.oci.model",
        "sysbake.oci.reference",
        "sysbake.oci.store",
        "sysbake.oci.layers",
        "sysbake.oci.layers.commit",
        "sysbake.project",
        "sysbake.project.load",
        "sysbake.project.reader",
        "sysbake.project.specs",
        "sysbake.runtime",
        "sysbake.runtime.owners",
        "sysbake.build",
        "sysbake.build.bootstrap",
        "sysbake.build.cache",
        "sysbake.build.context",
        "sysbake.build.finalize",
        "sysbake.build.pipeline",
        "sysbake.build.steps",
        "sysbake.build.salt",
        "sysbake.build.salt.run",
        "sysbake.build.salt.toolchain",
    }
)
# Costly for what they do on these paths (OpenSSL, code generation, archive formats...).
_COSTLY = frozenset(
    {
        "_hashlib",
        "asyncio",
        "dataclasses",
        "inspect",
        "random",
        "shutil",
        "socket",
        "ssl",
        "tarfile",
        "tempfile",
        "tomllib",
        "uuid",
        "zipfile",
    }
)


class Budget(NamedTuple):
    """What one command line may import: sysbake modules from `allowed`, none of
    `forbidden`, at most `most` modules in all (counted with CPython 3.11's stdlib)."""

    allowed: frozenset[str]
    forbidden: frozenset[str]
    most: int


# Counts: what these paths imported when the budget was set (run 80, ps 80, a no-op build
# 94), and a few to spare.
RUN = Budget(_RUNTIME, _COSTLY | {"datetime"}, 83)
PS = Budget(_RUNTIME, _COSTLY, 83)
NOOP_BUILD = Budget(_NOOP_BUILD, (_COSTLY - {"tomllib"}) | {"ctypes", "subprocess"}, 97)


class Probe(NamedTuple):
    """What a command line did: its exit code, its stdout, the modules it imported beyond
    the interpreter's own."""

    code: int
    stdout: str
    modules: list[str]


def probe(tmp_path: Path, *argv: str) -> Probe:
    """Run `sysbake ARGV` in a fresh interpreter."""
    out = tmp_path / "modules.json"
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(out), *argv],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    found = json.loads(out.read_text())
    return Probe(found["code"], done.stdout, found["modules"])


def check(modules: list[str], budget: Budget) -> None:
    ours = {m for m in modules if m.partition(".")[0] == "sysbake"}
    new = sorted(ours - budget.allowed)
    assert not new, f"sysbake modules new on this path: {new}"
    costly = sorted(budget.forbidden.intersection(modules))
    assert not costly, f"modules this path must not load: {costly}"
    if sys.version_info[:2] == (3, 11):
        assert len(modules) <= budget.most, f"{len(modules)} modules: {modules}"


@pytest.mark.parametrize(
    ("argv", "budget"),
    [
        (["run", "startup-absent:latest"], RUN),
        (["stop", "startup-absent"], RUN),
        (["exec", "startup-absent", "true"], RUN),
        (["ps", "--all"], PS),
    ],
)
def test_container_commands_keep_to_their_budget(
    tmp_path: Path, argv: list[str], budget: Budget
) -> None:
    found = probe(tmp_path, "--store", str(tmp_path / "store"), *argv)
    assert found.code == (0 if argv[0] == "ps" else 1)  # the image or container is absent
    check(found.modules, budget)


PROJECT = """\
[images.base.bootstrap]
distro = "debian"
suite = "bookworm"
mirror = "http://deb.example.invalid/debian"

[images.app]
from = "base"

[[images.app.provision]]
type = "salt"
name = "system"
state_tree = "salt"
pillar = "pillar"

[[images.app.provision]]
type = "project"
name = "site"
path = "projects/site"
pillar = "pillar"

[[images.app.provision]]
type = "script"
name = "hello"
run = "echo hello > /etc/hello"

[[images.app.provision]]
type = "files"
name = "motd"
source = "motd"
dest = "/etc/motd"
"""
FILES = {
    "salt/top.sls": "base:\n  '*':\n    - system\n",
    "salt/system/init.sls": "ops:\n  user.present: []\n",
    "pillar/top.sls": "base:\n  '*':\n    - global\n",
    "pillar/global.sls": "greeting: hello\n",
    "projects/site/salt/top.sls": "base:\n  '*':\n    - site\n",
    "projects/site/salt/site/init.sls": "/srv/site:\n  file.directory: []\n",
    "projects/site/pillar/top.sls": "base:\n  '*':\n    - site\n",
    "projects/site/pillar/site.sls": "site: {}\n",
    "motd": "welcome\n",
}


def _made_by_stand_in(
    run_stage: Callable[[BuildContext, pipeline.PartialImage, Stage], pipeline.PartialImage],
) -> Callable[[BuildContext, pipeline.PartialImage, Stage], pipeline.PartialImage]:
    """`run_stage` whose stages' layers are made by a stand-in (a one-file tar), so that a
    build fills the cache without running anything."""

    def stand_in(
        ctx: BuildContext, image: pipeline.PartialImage, stage: Stage
    ) -> pipeline.PartialImage:
        def produce() -> Layer:
            return put_layer(ctx.store, files_tar({f"{image.name}-{stage.name}": b"x"}))

        return run_stage(ctx, image, replace(stage, produce=produce))

    return stand_in


@pytest.fixture
def cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A project (every kind of stage) and a store holding all of its stages: built once
    with each layer made by a stand-in."""
    project, store = tmp_path / "project", tmp_path / "store"
    for name, text in {"sysbake.toml": PROJECT, **FILES}.items():
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        (project / name).write_text(text)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "run_stage", _made_by_stand_in(pipeline.run_stage))
        assert cli.main(["--store", str(store), "-q", "build", str(project)]) == 0
    return project, store


def test_a_no_op_build_keeps_to_its_budget(tmp_path: Path, cached: tuple[Path, Path]) -> None:
    project, store = cached
    found = probe(tmp_path, "--store", str(store), "-q", "--json", "build", str(project))
    assert found.code == 0
    # A no-op: every stage reused, none on its way to the modules that make layers.
    stages = [
        (image["name"], stage["stage"], stage["reused"])
        for image in json.loads(found.stdout)["images"]
        for stage in image["stages"]
    ]
    assert stages == [
        ("base", "bootstrap", True),
        ("app", "system", True),
        ("app", "site", True),
        ("app", "hello", True),
        ("app", "motd", True),
    ]
    check(found.modules, NOOP_BUILD)


def _files(top: Path) -> dict[str, tuple[int, int, int]]:
    return {
        str(p.relative_to(top)): (st.st_ino, st.st_size, st.st_mtime_ns)
        for p in sorted(top.rglob("*"))
        if not p.is_symlink()
        for st in [p.lstat()]
        if not p.is_dir()
    }


def test_a_no_op_build_writes_nothing(cached: tuple[Path, Path]) -> None:
    """No file of the store is written again (an fsync each) when nothing changed."""
    project, store = cached
    before = _files(store)
    assert cli.main(["--store", str(store), "-q", "build", str(project)]) == 0
    assert _files(store) == before
