"""Two builder containers that share only a registry (issue 12): each with its own empty
store volume, the bundled example from the bind-mounted checkout, run with exactly the
flags `sysbake flags --builder ENGINE` prints (plus --network host for the loopback
docker-registry).

The first (podman) builds the example from nothing and pushes every stage and its Salt
toolchain with `--cache-to`; the second (docker: both engines at the cost of one build)
builds it with `--cache-from` and rebuilds nothing. `--explain` says reused, from the cache
repository, for each stage and the toolchain; mmdebstrap and pip are recording shims
mounted into the second builder (over /usr/bin/mmdebstrap, and a `pip` module first on
PYTHONPATH), which record nothing; the images are the same to the digest."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from builder_fixtures import Builder, LoadBuilder, Mount, caches, checkout, tail
from services import DockerService, PodmanService, RegistryService

from sysbake.oci.store import Store

pytestmark = pytest.mark.integration

EXAMPLE = "examples/web"  # relative to the checkout at /src, the builder's working directory
STAGES = ("base: bootstrap", "web: system", "web: site")
TOOLCHAIN = "toolchain: salt 3007.16"
IMAGES = ("base:latest", "web:latest")
SHIMS = "/opt/hpair-shims"  # in the second builder: the pip shim, and what the shims record
CALLS = f"{SHIMS}/calls/calls.log"


@dataclass(frozen=True)
class Run:
    """A builder's store volume (a host directory) and its `sysbake build` output."""

    store: Path
    out: subprocess.CompletedProcess[str]


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The stores of both builders and the shims; removed after the module (stores are large)."""
    path = tmp_path_factory.mktemp("hpair-builder-cache")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def cache(registry: RegistryService) -> str:
    """The cache repository the builders share, host:port/repository on loopback."""
    return f"{registry.address}/hpair/cache"


@pytest.fixture(scope="module")
def first(
    builders: LoadBuilder, podman: PodmanService, cache: str, scratch: Path
) -> tuple[Builder, Run]:
    """The podman builder, an empty store: the example built with --cache-to. Like a CI
    job's, its store volume holds the .deb cache and the Salt toolchains (no index needed)."""
    builder = builders("podman", podman)
    store = scratch / "store-first"
    out = builder.run(
        "build", "--json", "--cache-to", cache, EXAMPLE, store=store, mounts=(checkout(), *caches())
    )
    return builder, Run(store, out)


def _shims(root: Path) -> tuple[Mount, ...]:
    """Mounts that replace mmdebstrap and `python -m pip` (PYTHONPATH={SHIMS}/py) with
    shims that record their call in CALLS (under `root`/calls on the host) and fail."""
    (root / "calls").mkdir(parents=True)
    mmdebstrap = root / "mmdebstrap"
    mmdebstrap.write_text(f'#!/bin/sh\necho "mmdebstrap $*" >> {CALLS}\nexit 1\n')
    mmdebstrap.chmod(0o755)
    pip = root / "py" / "pip"
    pip.mkdir(parents=True)
    record = f"import sys\nopen({CALLS!r}, 'a').write('pip ' + ' '.join(sys.argv) + '\\n')\n"
    (pip / "__init__.py").write_text(record)
    (pip / "__main__.py").write_text("raise SystemExit(1)\n")
    return (
        Mount(mmdebstrap, "/usr/bin/mmdebstrap", readonly=True),
        Mount(root / "py", f"{SHIMS}/py", readonly=True),
        Mount(root / "calls", f"{SHIMS}/calls"),
    )


@pytest.fixture(scope="module")
def second(
    first: tuple[Builder, Run],
    builders: LoadBuilder,
    dockerd: DockerService,
    cache: str,
    scratch: Path,
) -> tuple[Builder, Run, tuple[Mount, ...]]:
    """The docker builder, another empty store (no .deb cache, no toolchain): the example
    built with --cache-from and --explain, mmdebstrap and pip replaced by recording shims."""
    _, built = first
    assert built.out.returncode == 0, tail(built.out)
    builder = builders("docker", dockerd)
    mounts = (checkout(), *_shims(scratch / "shims"))
    out = builder.run(
        "build",
        "--explain",
        "--cache-from",
        cache,
        EXAMPLE,
        store=scratch / "store-second",
        mounts=mounts,
        env={"PYTHONPATH": f"{SHIMS}/py"},
    )
    return builder, Run(scratch / "store-second", out), mounts


def test_the_first_builder_builds_and_pushes_every_stage_and_the_toolchain(
    first: tuple[Builder, Run],
) -> None:
    _, built = first
    assert built.out.returncode == 0, tail(built.out)
    doc = json.loads(built.out.stdout)
    stages = [s for image in doc["images"] for s in image["stages"]]
    assert [f"{s['image']}: {s['stage']}" for s in stages] == list(STAGES), stages
    assert not any(s["reused"] for s in stages), stages  # an empty store: all built here
    assert doc["cache_to"]["pushed"] == len(STAGES), doc["cache_to"]
    assert doc["cache_to"]["toolchains"] == ["3007.16"], doc["cache_to"]


def test_the_second_builder_reuses_every_stage_and_the_toolchain(
    second: tuple[Builder, Run, tuple[Mount, ...]], cache: str
) -> None:
    _, fresh, _ = second
    assert fresh.out.returncode == 0, tail(fresh.out)
    lines = fresh.out.stdout.splitlines()
    origin = f"reused: from {cache}@sha256:"
    for name in (TOOLCHAIN, *STAGES):
        [line] = [line for line in lines if line.startswith(f"{name}: ")]
        assert line.startswith(f"{name}: {origin}"), fresh.out.stdout
    assert len(lines) == len(STAGES) + 1, fresh.out.stdout
    assert "warning:" not in fresh.out.stderr, fresh.out.stderr


def test_no_mmdebstrap_and_no_pip_ran_in_the_second_builder(
    second: tuple[Builder, Run, tuple[Mount, ...]], scratch: Path
) -> None:
    builder, fresh, mounts = second
    assert fresh.out.returncode == 0, tail(fresh.out)
    calls = scratch / "shims" / "calls" / "calls.log"
    assert not calls.exists(), calls.read_text()
    assert not (fresh.store / "toolchains" / "wheels").exists()
    assert not any((fresh.store / "debs").glob("*.deb"))
    # The shims do catch what the builder's sysbake would run: its mmdebstrap and its
    # Python's `-m pip` (the wheelhouse's download), with the same mounts and environment.
    probe = "mmdebstrap --version; /opt/sysbake/bin/python3 -m pip download salt; exit 0"
    ran = builder.run(
        "-c",
        probe,
        store=fresh.store,
        mounts=mounts,
        env={"PYTHONPATH": f"{SHIMS}/py"},
        entrypoint="/bin/sh",
    )
    assert ran.returncode == 0, tail(ran)
    recorded = calls.read_text().splitlines()
    assert [line.split()[0] for line in recorded] == ["mmdebstrap", "pip"], recorded


def test_both_builders_made_the_same_images(
    first: tuple[Builder, Run], second: tuple[Builder, Run, tuple[Mount, ...]]
) -> None:
    (_, built), (_, fresh, _) = first, second
    assert built.out.returncode == 0 and fresh.out.returncode == 0, tail(fresh.out)
    a, b = Store(built.store), Store(fresh.store)
    for ref in IMAGES:
        assert b.resolve(ref).manifest.digest == a.resolve(ref).manifest.digest, ref
