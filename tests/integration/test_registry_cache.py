"""Machines that share only a registry (`build --cache-to`, `--cache-from`), against the
real CLI and docker-registry on loopback.

Store A builds an example-like project (the bundled example, its pillars holding secrets no
state uses) and pushes every stage and its Salt toolchain to a cache repository; a fresh
store B, sharing nothing with A (no toolchain, no .deb cache), rebuilds nothing: every
stage and the toolchain come from the registry, no mmdebstrap and no pip run (shims on
PATH and PYTHONPATH record any call), the images are the same to the digest, and the
fetched toolchain runs Salt (`sysbake test`'s idempotence check). No pillar value is in any
blob of the registry. Hostile: a stage whose layer fails the layer check, a reference that
is no registry, a server that is no registry, a registry that is down."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLE, new_store, sysbake
from services import RegistryService

from sysbake.build.cache import StageRecord
from sysbake.oci import compress
from sysbake.oci import model as oci
from sysbake.oci.reference import Reference
from sysbake.oci.store import Store
from sysbake.registry.stagecache import CacheTarget, stage_config, stage_tag
from sysbake.registry.transfer import ConnectOptions
from tests.unit.conftest import crafted_tar, put_image, put_layer

pytestmark = pytest.mark.integration
TINY = "hcache-tiny:latest"
SALT = "toolchain: salt 3007.16"


@dataclass(frozen=True)
class Project:
    """The example-like project and the secrets its pillars hold (used by no state)."""

    path: Path
    secrets: tuple[str, ...]


@dataclass(frozen=True)
class Built:
    """Store A after its build with --cache-to, and what `build --json` said."""

    store: Path
    cache: str  # the cache repository, host:port/repository
    images: dict[str, Any]


@dataclass(frozen=True)
class Fresh:
    """Store B after its build with --cache-from, and what ran on the way."""

    store: Path
    out: subprocess.CompletedProcess[str]
    env: dict[str, str]
    calls: Path  # what the mmdebstrap and pip shims recorded (absent: nothing ran)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A copy of the bundled example whose global and project pillars hold a secret each."""
    path = tmp_path_factory.mktemp("hcache-project") / "web"
    shutil.copytree(EXAMPLE, path, symlinks=True)
    hidden = (f"hcache-global-{secrets.token_hex(12)}", f"hcache-site-{secrets.token_hex(12)}")
    with open(path / "pillar" / "global.sls", "a") as f:
        f.write(f"hcache:\n  password: {hidden[0]}\n")
    with open(path / "projects" / "site" / "pillar" / "site.sls", "a") as f:
        f.write(f"hcache_site:\n  token: {hidden[1]}\n")
    return Project(path, hidden)


@pytest.fixture(scope="module")
def built(
    registry: RegistryService,
    project: Project,
    shared_store: Path,
    base_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Built:
    """Store A: the run's base image pushed as an image (so A takes its bootstrap stage
    from it instead of bootstrapping again), then the project built with --cache-to."""
    base = f"{registry.address}/hcache/base:latest"
    sysbake("push", base_image, base, store=shared_store)
    store = new_store(tmp_path_factory.mktemp("hcache-a"))
    cache = f"{registry.address}/hcache/cache"
    out = sysbake(
        "build", "--json", "--cache-from", base, "--cache-to", cache, project.path, store=store
    )
    doc = json.loads(out.stdout)
    images = {image["name"]: image for image in doc["images"]}
    # The bootstrap stage came from the image named as a source (its layer fetched lazily).
    [bootstrap] = images["base"]["stages"]
    assert bootstrap["reused"] and bootstrap["origin"].startswith(
        f"{registry.address}/hcache/base@sha256:"
    ), out.stderr
    assert doc["cache_to"]["pushed"] == 3, doc["cache_to"]
    assert doc["cache_to"]["toolchains"] == ["3007.16"], doc["cache_to"]
    return Built(store, cache, images)


def _shims(root: Path) -> tuple[dict[str, str], Path]:
    """An environment whose mmdebstrap (PATH) and pip (`python -m pip`: PYTHONPATH) only
    record that they ran, and fail; the record file."""
    calls = root / "calls.log"
    bin_dir, py_dir = root / "bin", root / "py" / "pip"
    bin_dir.mkdir(parents=True)
    py_dir.mkdir(parents=True)
    shim = bin_dir / "mmdebstrap"
    shim.write_text(f'#!/bin/sh\necho "mmdebstrap $*" >> {calls}\nexit 1\n')
    shim.chmod(0o755)
    record = f"import sys\nopen({str(calls)!r}, 'a').write('pip ' + ' '.join(sys.argv) + '\\n')\n"
    (py_dir / "__init__.py").write_text(record)
    (py_dir / "__main__.py").write_text("raise SystemExit(1)\n")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "PYTHONPATH": str(py_dir.parent),
        "REGISTRY_AUTH_FILE": str(root / "auth.json"),
    }
    return env, calls


@pytest.fixture(scope="module")
def fresh(built: Built, project: Project, tmp_path_factory: pytest.TempPathFactory) -> Fresh:
    """Store B, sharing nothing (no toolchain, no .deb cache): the project built with
    --cache-from the cache repository, mmdebstrap and pip replaced by recording shims."""
    root = tmp_path_factory.mktemp("hcache-b")
    store = new_store(root / "store", share=())
    env, calls = _shims(root / "shims")
    out = sysbake(
        "build", "--explain", "--cache-from", built.cache, project.path, store=store, env=env
    )
    return Fresh(store, out, env, calls)


def test_a_fresh_store_rebuilds_nothing(built: Built, fresh: Fresh, project: Project) -> None:
    lines = fresh.out.stdout.splitlines()
    origin = f"reused: from {built.cache}@sha256:"
    expected = ["base: bootstrap", "web: system", "web: site", SALT]
    for name in expected:
        [line] = [line for line in lines if line.startswith(f"{name}: ")]
        assert line.startswith(f"{name}: {origin}"), fresh.out.stdout
    assert len(lines) == len(expected), fresh.out.stdout
    assert not fresh.calls.exists(), fresh.calls.read_text()
    assert "rebuilding" not in fresh.out.stderr
    assert "building the Salt" not in fresh.out.stderr
    assert not (fresh.store / "toolchains" / "wheels").exists()
    assert not (fresh.store / "debs").exists() or not any((fresh.store / "debs").iterdir())
    # The same stages, timestamps and labels: the very same images.
    a, b = Store(built.store), Store(fresh.store)
    for ref in ("base:latest", "web:latest"):
        assert b.resolve(ref).manifest.digest == a.resolve(ref).manifest.digest
    # A second build, naming no source, reuses it all from the store, naming the origins.
    again = sysbake("build", "--explain", project.path, store=fresh.store, env=fresh.env)
    stage_lines = again.stdout.splitlines()
    assert len(stage_lines) == 3 and all(origin in line for line in stage_lines), again.stdout


def test_the_fetched_toolchain_runs_salt(fresh: Fresh, project: Project) -> None:
    # `sysbake test` re-applies each Salt step (idempotence) with the store's toolchain.
    out = sysbake(
        "test",
        "--project",
        project.path,
        "web:latest",
        store=fresh.store,
        env=fresh.env,
        timeout=900,
    )
    assert "idempotence: system" in out.stdout and "idempotence: site" in out.stdout, out.stdout
    assert not fresh.calls.exists(), fresh.calls.read_text()


def _blobs(registry: RegistryService) -> Iterator[Path]:
    """Every blob file of the registry's filesystem storage."""
    yield from (registry.root / "data").glob("docker/registry/v2/blobs/sha256/*/*/data")


def _holds(blob: Path, needles: list[bytes]) -> set[bytes]:
    """Which of `needles` the blob holds, decompressed when it is gzip or zstd."""
    with open(blob, "rb") as raw:
        kind = compress.sniff(raw.read(8))
        raw.seek(0)
        found: set[bytes] = set()
        tail = b""
        overlap = max(map(len, needles))
        with compress.decompressor(kind, raw) as plain:
            while chunk := plain.read(1 << 20):
                window = tail + chunk
                found |= {n for n in needles if n in window}
                tail = window[-overlap:]
    return found


def test_no_pillar_value_is_in_any_pushed_blob(
    registry: RegistryService, built: Built, project: Project
) -> None:
    control = b"Hello from the site project"  # a pillar value a state writes into the image
    needles = [s.encode() for s in project.secrets]
    seen: set[bytes] = set()
    blobs = list(_blobs(registry))
    assert len(blobs) >= 8  # stage layers and configs, base's, the toolchain's
    for blob in blobs:
        found = _holds(blob, [*needles, control])
        assert not found & set(needles), f"{blob} holds a pillar secret"
        seen |= found
    assert control in seen  # the search does read inside the layers


# -- hostile --------------------------------------------------------------------------------


TINY_PROJECT = """\
[images.t]
from = "hcache-tiny:latest"

[[images.t.provision]]
type = "files"
name = "hello"
source = "hello.txt"
dest = "/srv/hello.txt"
"""


def _tiny_store(path: Path) -> Path:
    """A store holding TINY, a one-layer image a `files` step can build on."""
    store = Store(new_store(path)).ensure()
    put_image(
        store,
        {"etc/passwd": b"root:x:0:0:root:/root:/bin/sh\n", "etc/group": b"root:x:0:\n"},
        ref=TINY,
        history=[{"created": "2026-01-01T00:00:00Z", "created_by": "hcache test"}],
    )
    return store.root


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A project of one image: TINY plus a `files` step (no container, no Salt)."""
    path = tmp_path / "tiny"
    path.mkdir()
    (path / "hello.txt").write_text("hello\n")
    (path / "sysbake.toml").write_text(TINY_PROJECT)
    return path


def _warnings(out: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in out.stderr.splitlines() if line.startswith("warning:")]


def test_a_stage_whose_layer_fails_the_check_is_refused_and_built(
    registry: RegistryService, tiny: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    cache = f"{registry.address}/hcache/hostile"
    a = _tiny_store(tmp_path / "a")
    out = sysbake("build", "--json", "--cache-to", cache, tiny, store=a, env=env)
    [stage] = json.loads(out.stdout)["images"][0]["stages"]
    # The stage's tag now names a layer escaping its root, with a diff ID that matches it.
    attacker = Store(tmp_path / "attacker").ensure()
    evil = put_layer(attacker, crafted_tar(("../hcache-escape", tarfile.REGTYPE, {"data": b"x"})))
    rec = StageRecord(stage["key"], "t", "hello", {}, evil, "2026-01-01T00:00:00Z", "evil")
    config = attacker.put_json(stage_config(rec, "amd64"), oci.MT_CONFIG)
    CacheTarget(attacker, Reference.parse(cache), ConnectOptions()).put(
        stage_tag(stage["key"]), config, [evil.blob]
    )

    b = _tiny_store(tmp_path / "b")
    out = sysbake("build", "--explain", "--cache-from", cache, tiny, store=b, env=env)
    warnings = _warnings(out)
    assert len(warnings) == 1, out.stderr
    [warning] = warnings
    assert evil.blob.digest in warning and "refused" in warning, out.stderr
    assert "t: hello: rebuilt because" in out.stdout
    assert not Store(b).has_blob(evil.blob.digest)
    assert not list(tmp_path.rglob("hcache-escape"))
    assert [t.ref for t in Store(b).tags()] == [TINY, "t:latest"]


def test_a_reference_that_names_no_registry_is_a_usage_error(
    tiny: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    store = _tiny_store(tmp_path / "s")
    for option, ref, problem in (
        ("--cache-from", TINY, "names no registry"),
        ("--cache-to", TINY, "names no registry"),
        ("--cache-to", "127.0.0.1:5000/cache:main", "without a tag or digest"),
    ):
        out = sysbake("build", option, ref, tiny, store=store, env=env, check=False)
        errors = [line for line in out.stderr.splitlines() if line.startswith("sysbake: error:")]
        assert out.returncode == 2 and len(errors) == 1 and problem in errors[0], out.stderr
        assert "Traceback" not in out.stderr
    assert [t.ref for t in Store(store).tags()] == [TINY]  # nothing was built


class _NotARegistry(BaseHTTPRequestHandler):
    """A web server, not a registry: 404 for everything."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_HEAD = do_GET
    do_POST = do_GET

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def web_server() -> Iterator[str]:
    """host:port of a plain web server on loopback that is no registry."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NotARegistry)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def down() -> Iterator[str]:
    """host:port where nothing listens (bound, not listening: connections are refused)."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{closed.getsockname()[1]}"


@pytest.mark.parametrize(
    ("server", "problem"), [("web_server", "is not an OCI registry"), ("down", "cannot connect")]
)
def test_a_registry_that_cannot_serve_costs_one_warning_each(
    server: str,
    problem: str,
    tiny: Path,
    tmp_path: Path,
    env: dict[str, str],
    request: pytest.FixtureRequest,
) -> None:
    address = request.getfixturevalue(server)
    store = _tiny_store(tmp_path / "s")
    out = sysbake(
        "build",
        "--explain",
        "--cache-from",
        f"{address}/cache",
        "--cache-to",
        f"{address}/cache",
        tiny,
        store=store,
        env=env,
    )
    warnings = _warnings(out)
    assert len(warnings) == 2, out.stderr
    assert warnings[0].startswith(f"warning: --cache-from {address}/cache")
    assert warnings[1].startswith(f"warning: --cache-to {address}/cache")
    assert all(problem in w for w in warnings), out.stderr
    assert "t: hello: rebuilt because" in out.stdout
    assert "t:latest" in [t.ref for t in Store(store).tags()]


def test_the_project_file_names_the_caches(
    registry: RegistryService, tiny: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    cache = f"{registry.address}/hcache/settings"
    text = (tiny / "sysbake.toml").read_text()
    (tiny / "sysbake.toml").write_text(
        f'[build]\ncache_from = ["{cache}"]\ncache_to = "{cache}"\n\n{text}'
    )
    a = _tiny_store(tmp_path / "a")
    first = sysbake("build", "--json", tiny, store=a, env=env)
    assert json.loads(first.stdout)["cache_to"]["pushed"] == 1
    b = _tiny_store(tmp_path / "b")
    out = sysbake("build", "--explain", tiny, store=b, env=env)
    assert f"t: hello: reused: from {cache}@sha256:" in out.stdout, out.stderr
    # The command line replaces the file's sources: --no-cache reads none of them.
    c = _tiny_store(tmp_path / "c")
    out = sysbake("build", "--explain", "--no-cache", tiny, store=c, env=env)
    assert "t: hello: rebuilt because --no-cache" in out.stdout
