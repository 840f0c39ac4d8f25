"""The example's `web` image, built once per run, and helpers for provisioning tests.

`web_build` runs `sysbake build --json --test examples/web` into the run's shared store
(the base is already there: `base_image`); `web_image` is the tagged result. Variants of
the example are copies with one thing changed (`copy_example`), tagged apart so that
`web:latest` stays the example's. Small projects start `from = "base:latest"` (the store's
base image) so that no test bootstraps again.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import re
import shutil
import subprocess
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Protocol, cast

import pytest
from helpers import EXAMPLE, sysbake
from services import mounts_under

RUNC_ROOT = "/run/sysbake/runc"
WEB = "web:latest"
MESSAGE = "Hello from the site project"  # the page text the example serves
_GZIP = b"\x1f\x8b"
_ZSTD = b"\x28\xb5\x2f\xfd"
_CHUNK = 1 << 20


# -- the example, built once ---------------------------------------------------------------


@pytest.fixture(scope="session")
def web_build(shared_store: Path, base_image: str) -> subprocess.CompletedProcess[str]:
    """`sysbake build --json --test examples/web` (once per run; its exit status is for the
    test of the example to judge: the image is tagged before it is tested)."""
    return sysbake(
        "build", "--json", "--test", EXAMPLE, store=shared_store, check=False, timeout=3600
    )


@pytest.fixture(scope="session")
def web_image(web_build: subprocess.CompletedProcess[str], shared_store: Path) -> str:
    """The example's `web:latest` in the shared store."""
    if WEB not in image_refs(shared_store):
        pytest.fail(
            f"the example did not build (exit {web_build.returncode}):\n{web_build.stderr[-4000:]}"
        )
    return WEB


# -- projects --------------------------------------------------------------------------------


def copy_example(dest: Path, tag: str) -> Path:
    """A copy of examples/web at `dest` whose `web` image is tagged `tag` (not web:latest)."""
    shutil.copytree(EXAMPLE, dest)
    edit(
        dest / "sysbake.toml",
        '[images.web]\nfrom = "base"\n',
        f'[images.web]\nfrom = "base"\ntag = "{tag}"\n',
    )
    return dest


def edit(path: Path, old: str, new: str) -> None:
    """Replace the one occurrence of `old` in the file `path` with `new`."""
    text = path.read_text()
    assert text.count(old) == 1, f"{path}: expected {old!r} once"
    path.write_text(text.replace(old, new))


def write_project(root: Path, files: dict[str, str]) -> Path:
    """A project directory made of `files` (relative path -> text)."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


# -- the store, seen from outside ------------------------------------------------------------


def image_refs(store: Path) -> dict[str, str]:
    """Tagged refs -> image IDs."""
    images = json.loads(sysbake("images", "--json", store=store).stdout)
    return {i["ref"]: i["id"] for i in images}


def inspect(store: Path, ref: str) -> dict[str, object]:
    return dict(json.loads(sysbake("inspect", "--json", ref, store=store).stdout))


def layer_digests(store: Path, ref: str) -> list[str]:
    """The image's layer blob digests, bottom to top."""
    layers = inspect(store, ref)["Layers"]
    assert isinstance(layers, list)
    return [str(layer["digest"]) for layer in layers]


def blob_path(store: Path, digest: str) -> Path:
    return store / "oci" / "blobs" / "sha256" / digest.split(":", 1)[1]


def runtime_salt(store: Path) -> str:
    """The suffix sysbake gives the runc IDs of this store's containers."""
    import hashlib

    return hashlib.sha256(str((store / "containers").resolve()).encode()).hexdigest()[:8]


def runc_ids(store: Path) -> frozenset[str]:
    """runc container IDs of this store's containers."""
    result = subprocess.run(
        ["runc", "--root", RUNC_ROOT, "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        return frozenset()
    suffix = "." + runtime_salt(store)
    return frozenset(
        c["id"] for c in json.loads(result.stdout or "null") or [] if c["id"].endswith(suffix)
    )


def containers(store: Path) -> frozenset[str]:
    """Names of the store's containers (`sysbake ps --all`)."""
    rows = json.loads(sysbake("ps", "--all", "--json", store=store).stdout)
    return frozenset(r["name"] for r in rows)


@dataclass(frozen=True)
class StoreState:
    """What a failed or interrupted build must leave exactly as it was."""

    images: dict[str, str]
    stages: frozenset[str]
    containers: frozenset[str]
    runc: frozenset[str]
    mounts: frozenset[str]
    staging: frozenset[str]

    @classmethod
    def of(cls, store: Path) -> StoreState:
        tmp = store / "tmp"
        return cls(
            images=image_refs(store),
            stages=frozenset(p.name for p in (store / "cache" / "stages").glob("*.json")),
            containers=containers(store),
            runc=runc_ids(store),
            mounts=frozenset(mounts_under(store)),
            staging=frozenset(p.name for p in tmp.iterdir()) if tmp.is_dir() else frozenset(),
        )

    def assert_same_as(self, before: StoreState) -> None:
        """Nothing tagged, cached, running, mounted or staged since `before`; no build
        container at all."""
        assert self.images == before.images, "the failed build changed the tags"
        assert self.stages - before.stages == set(), "the failed build cached a stage"
        assert self.containers - before.containers == set(), "a container was left"
        assert [c for c in self.containers if c.startswith("build-")] == []
        assert self.runc - before.runc == set(), "a runc container was left"
        assert self.mounts - before.mounts == set(), "a mount was left under the store"
        assert self.staging - before.staging == set(), "staging was left in tmp/"


# -- containers ------------------------------------------------------------------------------


@contextlib.contextmanager
def running(store: Path, ref: str) -> Iterator[str]:
    """A container of `ref` started with `sysbake run -d` (runc, no daemon); stopped and
    removed afterwards."""
    name = f"prov-{uuid.uuid4().hex[:8]}"
    sysbake("run", "-d", "--name", name, ref, store=store, timeout=300)
    try:
        yield name
    finally:
        sysbake("stop", name, store=store, check=False, timeout=120)
        sysbake("rm", "-f", name, store=store, check=False, timeout=120)


def exec_in(
    store: Path, name: str, *command: str, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return sysbake("exec", "-T", name, *command, store=store, check=check, timeout=300)


# -- looking into blobs, layers and exports --------------------------------------------------


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@contextlib.contextmanager
def plain(path: Path) -> Iterator[Readable]:
    """The file at `path`, decompressed when it is gzip or zstd (by its magic bytes)."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic.startswith(_GZIP):
        with gzip.open(path, "rb") as g:
            yield g
    elif magic == _ZSTD:
        with subprocess.Popen(["zstd", "-dc", str(path)], stdout=subprocess.PIPE) as z:
            assert z.stdout is not None
            yield z.stdout
    else:
        with open(path, "rb") as f:
            yield f


def stream_contains(stream: Readable, needle: bytes) -> bool:
    """Whether `needle` occurs in what `stream` yields (read in chunks, overlapping)."""
    tail = b""
    while chunk := stream.read(_CHUNK):
        data = tail + chunk
        if needle in data:
            return True
        tail = data[-(len(needle) - 1) :]
    return False


def files_containing(root: Path, needle: bytes) -> list[str]:
    """Regular files under `root` (symlinks not followed) whose bytes, decompressed when
    gzip or zstd, contain `needle`."""
    hits = []
    for dirpath, _dirs, names in os.walk(root):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                with plain(path) as f:
                    if stream_contains(f, needle):
                        hits.append(str(path))
    return hits


def layer_entries(store: Path, ref: str) -> list[list[str]]:
    """The entry names of each of the image's layer tars, bottom to top."""
    out = []
    for digest in layer_digests(store, ref):
        with (
            plain(blob_path(store, digest)) as f,
            tarfile.open(fileobj=cast(IO[bytes], f), mode="r|") as tar,
        ):
            out.append([m.name.removeprefix("./") for m in tar])
    return out


def salt_traces(names: list[str]) -> list[str]:
    """Entries of a layer that only Salt or a step's inputs would have put there."""
    pattern = re.compile(
        r"^(opt/sysbake|etc/salt|run/sysbake|var/cache/salt|var/log/salt|"
        r"srv/(salt|pillar))(/|$)|(^|/)salt-(call|minion)$"
    )
    return [n for n in names if pattern.search(n.rstrip("/"))]
