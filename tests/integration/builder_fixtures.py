"""The sysbake builder image in tests: built by sysbake from builder/sysbake.toml into the
run's shared store (its bootstrap is the example base's, reused through the stage cache),
loaded into docker or podman, and run with exactly the flags `sysbake flags --builder
ENGINE` prints (`Builder.run`: flags, mounts, a command).

What a CI job would mount, a test mounts too: the checkout at /src (read-only), and the
run-independent caches (.debs, Salt toolchains) inside the builder's store volume. Beyond
the printed flags a test adds `--network host`, for this machine's only network is loopback
(the registry listens on 127.0.0.1 and the test dockerd has no bridge)."""

from __future__ import annotations

import json
import shlex
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import REPO, TEST_ROOT, sysbake
from services import DockerService, PodmanService

from sysbake.engines import Engine

BUILDER_PROJECT = REPO / "builder"
BUILDER_REF = "sysbake-builder:latest"
STORE = "/var/lib/sysbake"  # the builder's store volume
CHECKOUT = "/src"  # the builder's working directory


@dataclass(frozen=True)
class Mount:
    """A host path bind-mounted into the builder (`-v SOURCE:TARGET[:ro]`)."""

    source: Path
    target: str
    readonly: bool = False

    def flags(self) -> list[str]:
        return ["-v", f"{self.source}:{self.target}" + (":ro" if self.readonly else "")]


def checkout(path: Path = REPO) -> Mount:
    """The checkout (this repository: its examples/ among it) at /src, read-only."""
    return Mount(path, CHECKOUT, readonly=True)


def caches() -> tuple[Mount, ...]:
    """The shared .deb cache and Salt toolchains, in the store as a CI cache would be."""
    return (
        Mount(TEST_ROOT / "debs", f"{STORE}/debs"),
        Mount(TEST_ROOT / "toolchains", f"{STORE}/toolchains"),
    )


def printed_flags(engine: Engine, seccomp: Path) -> tuple[str, ...]:
    """`sysbake flags --builder ENGINE`, naming `seccomp` (written here) as the profile."""
    store = seccomp.parent  # the command never opens it
    profile = sysbake("flags", "--builder", engine, "--seccomp-json", store=store)
    seccomp.write_text(profile.stdout)
    out = sysbake("flags", "--builder", engine, "--seccomp-profile", seccomp, store=store).stdout
    return tuple(shlex.split(out))


@dataclass(frozen=True)
class Builder:
    """The builder image loaded into `service` (a private dockerd or podman store) as
    `image`, run with `flags`."""

    engine: Engine
    service: DockerService | PodmanService
    image: str
    flags: tuple[str, ...]

    def run(
        self,
        *command: str,
        store: Path,
        mounts: Iterable[Mount] = (),
        flags: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        entrypoint: str | None = None,
        timeout: float = 1800,
    ) -> subprocess.CompletedProcess[str]:
        """`<engine> run --rm` of the builder with its flags (or `flags` instead), `store`
        as its store volume, `mounts`, `env` and `command`; never raises on failure."""
        store.mkdir(parents=True, exist_ok=True)
        argv = ["run", "--rm", "--pull", "never", "--network", "host"]
        argv += list(self.flags if flags is None else flags)
        argv += ["-v", f"{store}:{STORE}"]
        for mount in mounts:
            argv += mount.flags()
        for key, value in (env or {}).items():
            argv += ["-e", f"{key}={value}"]
        if entrypoint is not None:
            argv += ["--entrypoint", entrypoint]
        return self.service.cli(*argv, self.image, *command, check=False, timeout=timeout)

    def without(self, flag: str) -> tuple[str, ...]:
        """The builder's flags less `flag` (and the value it takes, for --security-opt)."""
        flags = list(self.flags)
        i = flags.index(flag)
        del flags[i : i + (2 if flag == "--security-opt" else 1)]
        return tuple(flags)


def build_builder(store: Path) -> dict[str, object]:
    """`sysbake build --json builder/` into `store`: the build's JSON report of the image."""
    out = sysbake("build", "--json", BUILDER_PROJECT, store=store).stdout
    images = json.loads(out)["images"]
    assert [i["name"] for i in images] == ["sysbake-builder"], out
    return dict(images[0])


def load_builder(store: Path, archive: Path, service: DockerService | PodmanService) -> str:
    """Export the builder from `store` as a docker-archive and load it into `service`;
    the reference that engine knows it by."""
    if not archive.exists():
        sysbake("export", BUILDER_REF, "--format", "docker-archive", "-o", archive, store=store)
    service.cli("load", "-i", str(archive), timeout=600)
    return f"localhost/{BUILDER_REF}" if isinstance(service, PodmanService) else BUILDER_REF


def builder_for(
    engine: Engine, service: DockerService | PodmanService, store: Path, scratch: Path
) -> Builder:
    """The builder of `store` loaded into `service` (through a docker-archive kept in
    `scratch`, written once), with the flags `sysbake flags --builder ENGINE` prints (its
    seccomp profile written in `scratch` too)."""
    image = load_builder(store, scratch / "sysbake-builder.tar", service)
    flags = printed_flags(engine, scratch / f"{engine}-seccomp.json")
    return Builder(engine, service, image, flags)


# builder_for(engine, service), memoized for the run (the `builders` fixture).
LoadBuilder = Callable[[Engine, DockerService | PodmanService], Builder]


@pytest.fixture(scope="session")
def builder_store(shared_store: Path, base_image: str) -> Path:
    """The run's shared store, now also holding the builder image, whose bootstrap stage
    is the example base's (reused, not bootstrapped again)."""
    report = build_builder(shared_store)
    first = report["stages"][0]  # type: ignore[index]
    assert first["stage"] == "bootstrap" and first["reused"], first
    return shared_store


@pytest.fixture(scope="session")
def builders(builder_store: Path, tmp_path_factory: pytest.TempPathFactory) -> LoadBuilder:
    """`builder_for` once per engine and run, whichever module asks first: the builder is
    built, exported and loaded into each engine once (a scratch directory of the run)."""
    scratch = tmp_path_factory.mktemp("builder")
    loaded: dict[Engine, Builder] = {}

    def load(engine: Engine, service: DockerService | PodmanService) -> Builder:
        if engine not in loaded:
            loaded[engine] = builder_for(engine, service, builder_store, scratch)
        return loaded[engine]

    return load


def tail(result: subprocess.CompletedProcess[str], lines: int = 30) -> str:
    """The end of a command's output, for assertion messages."""
    text = (result.stdout + "\n" + result.stderr).strip().splitlines()
    return "\n".join([f"exit {result.returncode}", *text[-lines:]])
