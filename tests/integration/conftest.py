"""Integration fixtures: real tools, run as root. One base image is bootstrapped per test
run into a per-run store (the .deb cache is shared across runs) and every test that needs
an image uses it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from builder_fixtures import builder_store, builders  # noqa: F401 (the builder, once per run)
from helpers import EXAMPLE, TEST_ROOT, new_store, sysbake
from services import RegistryService, docker_daemon, fixture, podman_store, registry_server

NEEDS_ROOT = "integration tests need root (they bootstrap, mount and boot containers)"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the integration tests; without root, skip them with the reason (unit tests run)."""
    not_root = os.geteuid() != 0
    for item in items:
        if "tests/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)
            if not_root:
                item.add_marker(pytest.mark.skip(reason=NEEDS_ROOT))


# A test run started in the background by a non-interactive shell inherits SIGINT ignored,
# and so would every sysbake it starts; the Ctrl-C tests need it delivered. A handler (not
# SIG_IGN) is reset to the default in each child at exec.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The per-run store holding the example base image."""
    TEST_ROOT.mkdir(parents=True, exist_ok=True)
    path = new_store(Path(tmp_path_factory.mktemp("store", numbered=True)))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def first_build(shared_store: Path) -> subprocess.CompletedProcess[str]:
    """`sysbake build` of the example's base image from nothing (once per run)."""
    return sysbake("build", "--json", "--target", "base", EXAMPLE, store=shared_store)


@pytest.fixture(scope="session")
def base_image(first_build: subprocess.CompletedProcess[str]) -> str:
    return "base:latest"


dockerd = fixture(docker_daemon, scope="session", name="dockerd")
podman = fixture(podman_store, scope="session", name="podman")


@pytest.fixture(scope="module")
def registry() -> Iterator[RegistryService]:
    """A docker-registry on loopback for the tests of one module (stopped by pid)."""
    with registry_server() as service:
        yield service


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of sysbake: a private auth.json, never the host's."""
    return {**os.environ, "REGISTRY_AUTH_FILE": str(tmp_path / "auth.json")}
