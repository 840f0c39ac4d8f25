"""The build: for each image, its stages in order, each cached by the hash of its inputs.

    bootstrap (or the parent image) -> provision steps -> finalize (image config, tag)

Every stage either reuses a cached layer or produces one; the image is tagged only
when all of its stages succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sysbake import log
from sysbake.build import bootstrap, finalize
from sysbake.build.cache import StageCache, StageRecord, explain, hash_tree, stage_key
from sysbake.errors import BuildError
from sysbake.oci import model as oci
from sysbake.oci.layers.commit import commit_tree, source_date_epoch
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.records import field, record, replace
from sysbake.rootfs import Root


@record
class StageResult:
    """What happened to one stage: reused from the cache or rebuilt, and why."""

    image: str
    stage: str
    key: str
    reused: bool
    reason: str
    layer: Layer
    seconds: float
    origin: str = ""  # the cache source a reused stage came from ("": this store)

    def to_json(self) -> dict[str, Any]:
        return {"image": self.image, "stage": self.stage, "key": self.key,
                "reused": self.reused, "reason": self.reason, "diff_id": self.layer.diff_id,
                "digest": self.layer.blob.digest, "seconds": round(self.seconds, 3),
                "origin": self.origin}


@record
class BuildResult:
    name: str
    ref: str
    image: Image
    stages: tuple[StageResult, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "ref": self.ref, "id": self.image.id,
                "manifest": self.image.manifest.digest,
                "stages": [s.to_json() for s in self.stages]}


@record
class BuildOptions:
    targets: tuple[str, ...] = ()
    no_cache: bool = False
    compression: str = "gzip"
    keep_failed: bool = False
    # Stages offered by the cache sources the user named (--cache-from), for this build.
    cache_from: tuple[StageRecord, ...] = ()


@record(frozen=False)
class _ImageBuild:
    """The state of one image while its stages run (private to this module)."""

    name: str
    layers: list[Layer] = field(default_factory=list)
    records: list[StageRecord] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    results: list[StageResult] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def chain(self) -> str:
        return oci.chain_id([layer.diff_id for layer in self.layers])


Reporter = Callable[[StageResult], None]


def build_project(project: Any, store: Store, options: BuildOptions,
                  report: Reporter = lambda _: None) -> list[BuildResult]:
    """Build the targets of `project` (default: all images) and their in-file parents."""
    store.ensure()
    store.clean_stale()
    cache = StageCache(store)
    built: dict[str, Image] = {}
    results = []
    for spec in project.build_order(list(options.targets) or None):
        result = build_image(spec, project, store, cache, built, options, report)
        built[spec.name] = result.image
        results.append(result)
    return results


def build_image(spec: Any, project: Any, store: Store, cache: StageCache,
                built: dict[str, Image], options: BuildOptions, report: Reporter) -> BuildResult:
    cleanup = spec.finalize
    state = _ImageBuild(spec.name)
    inherited_labels: dict[str, str] = {}
    if spec.bootstrap is not None:
        plan = bootstrap_plan(spec.bootstrap, project.root)
        architecture = plan.architecture
        state.labels["io.sysbake.sources"] = "; ".join(plan.sources)
        _bootstrap_stage(spec, plan, cleanup, store, cache, state, options, report)
    else:
        parent = built[spec.parent] if spec.parent_is_local else store.resolve(spec.parent)
        architecture = parent.config.get("architecture", "amd64")
        state.layers = list(parent.layers)
        state.history = list(parent.config.get("history", []))
        inherited_labels = dict(parent.config.get("config", {}).get("Labels") or {})
    for index, step in enumerate(spec.provision):
        _provision_stage(spec, index, step, cleanup, project, store, cache, state, options,
                         report)
    created = _created(state)
    labels = {**inherited_labels, **state.labels, "io.sysbake.image": spec.name}
    for rec in state.records:
        labels[f"io.sysbake.stage.{rec.stage}"] = rec.key
    config = finalize.image_config(
        finalize.OciSettings.from_spec(spec.config), architecture=architecture,
        diff_ids=[layer.diff_id for layer in state.layers], history=state.history,
        created=created, labels=labels,
    )
    image = store.put_image(config, tuple(state.layers))
    ref = store.tag(spec.tag, image)
    log.info(f"==> tagged {ref} ({oci.hex_of(image.id)[:12]})")
    return BuildResult(spec.name, ref, image, tuple(state.results))


def bootstrap_plan(spec: Any, root: Path) -> bootstrap.BootstrapPlan:
    """Resolve a [bootstrap] section against this host: architecture and apt sources."""
    packages = tuple(dict.fromkeys((*bootstrap.BASE_PACKAGES, *spec.packages)))
    return bootstrap.BootstrapPlan(
        suite=spec.suite,
        variant=spec.variant,
        architecture=spec.architecture or bootstrap.host_architecture(),
        components=tuple(spec.components),
        packages=packages,
        sources=tuple(bootstrap.source_lines(
            distro=spec.distro, suite=spec.suite, components=tuple(spec.components),
            mirror=spec.mirror, snapshot=spec.snapshot, security=spec.security)),
        keyring=str(spec.keyring or ""),
        snapshot=spec.snapshot,
        hooks=tuple(Path(h) for h in spec.hooks),
    )


def _created(state: _ImageBuild) -> str:
    epoch = source_date_epoch()
    if epoch is not None:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamps = [r.created for r in state.records] or [h.get("created", "") for h in state.history]
    return max(stamps) if stamps else _now()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def run_stage(
    cache: StageCache,
    state: _ImageBuild,
    *,
    stage: str,
    inputs: dict[str, Any],
    created_by: str,
    options: BuildOptions,
    report: Reporter,
    produce: Callable[[], Layer],
) -> StageRecord:
    """Reuse the stage's cached layer when its key matches, else `produce` one and
    record it (only after the layer blob is committed)."""
    started = time.monotonic()
    key = stage_key(inputs)
    hit = None if options.no_cache else cache.lookup(key, options.cache_from)
    if hit is not None and hit.origin is not None:
        # Taken from a named cache source: now this store's record of its stage.
        hit = replace(hit, image=state.name, stage=stage)
        cache.save(hit)
    elif hit is not None:
        cache.remember(hit)
    if hit is not None:
        record, reused, reason = hit, True, "all inputs unchanged"
    else:
        last = cache.last(state.name, stage)
        reason = "--no-cache" if options.no_cache else explain(
            last.inputs if last else None, inputs)
        with log.step(f"{state.name}: {stage} (rebuilding: {reason})"):
            try:
                layer = produce()
            except OSError as exc:
                raise BuildError(f"{state.name}: {stage}: {exc.strerror or exc}") from exc
        record = StageRecord(key=key, image=state.name, stage=stage, inputs=inputs,
                             layer=layer, created=_now(), created_by=created_by)
        cache.save(record)
        reused = False
    state.records.append(record)
    state.layers.append(record.layer)
    state.history.append({"created": record.created, "created_by": record.created_by,
                          "comment": f"sysbake {stage} {key[:16]}"})
    result = StageResult(state.name, stage, key, reused, reason, record.layer,
                         time.monotonic() - started,
                         str(record.origin) if reused and record.origin else "")
    state.results.append(result)
    report(result)
    return record


def _bootstrap_stage(spec: Any, plan: bootstrap.BootstrapPlan, cleanup: finalize.Cleanup,
                     store: Store, cache: StageCache, state: _ImageBuild,
                     options: BuildOptions, report: Reporter) -> None:
    inputs = {
        "stage": "bootstrap",
        "bootstrap": plan.key_inputs(),
        "hooks": [hash_tree(h) for h in plan.hooks],
        "cleanup": _cleanup_inputs(cleanup),
        "container_ready": finalize.container_ready_inputs(cleanup),
        "compression": options.compression,
        "mtime": source_date_epoch(),
    }

    def produce() -> Layer:
        with store.staging("bootstrap") as staging:
            tree = staging / "rootfs"
            with log.step(f"{spec.name}: mmdebstrap {plan.suite} ({plan.variant}, "
                          f"{plan.architecture})"):
                bootstrap.run_bootstrap(plan, tree, store.debs_dir)
            with Root(tree) as root:
                finalize.make_container_ready(root, cleanup)
                finalize.clean_tree(root, cleanup)
            with log.step(f"{spec.name}: committing the base layer"):
                layer = commit_tree(store, tree, compression=options.compression,
                                    mtime=source_date_epoch())
            # The tree we just tarred is this layer unpacked: keep it for containers.
            store.adopt_tree(layer.diff_id, tree)
        return layer

    run_stage(cache, state, stage="bootstrap", inputs=inputs,
              created_by=f"sysbake bootstrap {plan.suite} {plan.variant}", options=options,
              report=report, produce=produce)


def _cleanup_inputs(cleanup: finalize.Cleanup) -> dict[str, Any]:
    return cleanup.key_inputs()


def _provision_stage(spec: Any, index: int, step: Any, cleanup: finalize.Cleanup,
                     project: Any, store: Store, cache: StageCache, state: _ImageBuild,
                     options: BuildOptions, report: Reporter) -> None:
    from sysbake.build import (
        steps as provision,  # imported on demand: the no-step fast path stays lean
    )

    provision.run_step(spec, index, step, cleanup, project, store, cache, state, options,
                       report, run_stage)
