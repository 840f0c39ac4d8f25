"""Images from where users already keep them: a registry, for a build's `from` that the
store lacks, and a local docker or podman (`pull docker-daemon:NAME`, `pull
containers-storage:NAME`: skopeo's names of those sources).

An engine's image is saved by the engine itself (`docker save`, `podman save`) into the
store's staging and read from there as any archive (sysbake.oci.ingest.load_archive: every
blob, diff ID and layer entry checked). A pulled parent is pulled as `sysbake pull` does:
it never feeds the stage cache.
"""

from __future__ import annotations

from collections.abc import Sequence

from sysbake import log, proc
from sysbake.engines import find_client
from sysbake.oci.ingest import Loaded, load_archive
from sysbake.oci.reference import Reference
from sysbake.oci.store import Store
from sysbake.registry.auth import RegistryError
from sysbake.registry.transfer import ConnectOptions, PullResult, pull

# The prefix of an engine's source -> the engine whose `save` gives its images.
ENGINE_SOURCES = {"docker-daemon:": "docker", "containers-storage:": "podman"}


class SourceError(RegistryError):
    """An engine's image could not be had: names the source and why."""


def pull_parents(store: Store, refs: Sequence[str], options: ConnectOptions) -> list[PullResult]:
    """Pull the `from` images `refs` (each naming its registry) that a build needs and the
    store lacks, saying so; tagged as they are named, the stage cache untouched."""
    results = []
    for ref in refs:
        log.info(f"==> {ref}: not in the store: pulling it")
        results.append(pull(store, Reference.parse(ref, need_registry=True), options))
    return results


def engine_source(text: str) -> tuple[str, str] | None:
    """(engine, image name) of `docker-daemon:NAME` or `containers-storage:NAME`; None
    for any other text."""
    for prefix, engine in ENGINE_SOURCES.items():
        if text.startswith(prefix):
            return engine, text.removeprefix(prefix)
    return None


def pull_engine(store: Store, text: str, *, tag: str | None = None) -> list[Loaded]:
    """Bring the image a `docker-daemon:` or `containers-storage:` source names into the
    store, with the names the engine gives it (or `tag`); SourceError in one line when
    the engine is missing, does not answer or lacks the image."""
    found = engine_source(text)
    if found is None:
        raise SourceError(f"{text!r}: expected docker-daemon:NAME or containers-storage:NAME")
    engine, name = found
    if not name or name.startswith("-"):
        raise SourceError(f"pull {text}: expected an image name after the colon")
    client = find_client(
        engine,
        lambda remedy: SourceError(
            f"pull {text}: no {engine} on PATH, so no {engine} images to read: {remedy}"
        ),
    )
    store.ensure()
    with store.staging("engine") as staging:
        archive = staging / "image.tar"
        argv = [client, "save", "-o", str(archive), name]
        if engine == "podman":
            argv[2:2] = ["--format", "docker-archive"]
        with log.step(f"{engine} save {name}"):
            result = proc.run(argv, what=f"{engine} save", check=False, timeout=3600)
        if result.returncode != 0:
            said = (result.stderr or result.stdout).decode(errors="replace")
            raise SourceError(f"pull {text}: `{engine} save {name}` failed: {proc.tail(said, 1)}")
        return load_archive(store, archive, tag=tag)
