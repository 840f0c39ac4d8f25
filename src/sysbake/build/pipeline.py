"""The build: for each image, its stages in order, each cached by the hash of its inputs.

    bootstrap stage (or the parent image) -> one stage per provision step
        -> image config -> tag

`build_image` is that recipe, read top to bottom. The modules that know a kind of stage
return it as a value (sysbake.build.context.Stage: bootstrap.bootstrap_stage,
steps.provision_stage); `run_stage` alone runs one: it reuses the cached layer when the
stage's key matches, else produces and records one, and it is the one place a stage is
logged, timed and reported. An image is tagged only when all of its stages succeeded.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import UTC, datetime

from sysbake import log
from sysbake.build import bootstrap, finalize, steps
from sysbake.build.cache import StageCache, StageRecord, explain
from sysbake.build.context import (
    BuildContext,
    BuildOptions,
    Reporter,
    Stage,
    StageResult,
    no_report,
)
from sysbake.errors import BuildError
from sysbake.oci import model as oci
from sysbake.oci.layers.commit import source_date_epoch
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.project.specs import ImageSpec, Project
from sysbake.records import field, record, replace

# A history entry of an image config (created, created_by, comment, empty_layer...).
History = Mapping[str, object]


@record
class BuildResult:
    """A built and tagged image, and what happened to each of its stages."""

    name: str
    ref: str
    image: Image
    stages: tuple[StageResult, ...]

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ref": self.ref,
            "id": self.image.id,
            "manifest": self.image.manifest.digest,
            "stages": [s.to_json() for s in self.stages],
        }


@record
class PartialImage:
    """An image while its stages run: the layers so far (bottom to top) with their history
    and labels, the stage records of this build and what happened to each stage."""

    name: str
    architecture: str
    layers: tuple[Layer, ...] = ()
    history: tuple[History, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    records: tuple[StageRecord, ...] = ()
    results: tuple[StageResult, ...] = ()


def build_project(
    project: Project, store: Store, options: BuildOptions, report: Reporter = no_report
) -> list[BuildResult]:
    """Build the targets of `project` (default: all images) and their in-file parents."""
    store.ensure()
    store.clean_stale()
    ctx = BuildContext(
        project=project, store=store, cache=StageCache(store), options=options, report=report
    )
    built: dict[str, Image] = {}
    results = []
    for spec in project.build_order(list(options.targets) or None):
        result = build_image(ctx, spec, built)
        built[spec.name] = result.image
        results.append(result)
    return results


def build_image(ctx: BuildContext, spec: ImageSpec, built: Mapping[str, Image]) -> BuildResult:
    """Build image `spec` (its in-file parent, if any, is in `built`) and tag it."""
    if spec.bootstrap is not None:
        plan = bootstrap.plan_for(spec.bootstrap)
        image = PartialImage(
            spec.name, plan.architecture, labels={"io.sysbake.sources": "; ".join(plan.sources)}
        )
        image = run_stage(
            ctx, image, bootstrap.bootstrap_stage(ctx, spec.name, plan, spec.finalize)
        )
    else:
        image = _from_parent(ctx, spec, built)
    for step in spec.provision:
        image = run_stage(ctx, image, steps.provision_stage(ctx, spec, step, image.layers))
    stored = _store_image(ctx, spec, image)
    ref = _tag(ctx, spec, stored)
    return BuildResult(spec.name, ref, stored, image.results)


def _from_parent(ctx: BuildContext, spec: ImageSpec, built: Mapping[str, Image]) -> PartialImage:
    """The image's start when it has no bootstrap: its parent's layers, history, labels."""
    if spec.parent is None:
        raise BuildError(f"{spec.name}: neither a bootstrap nor a parent")
    parent = built[spec.parent] if spec.parent_is_local else ctx.store.resolve(spec.parent)
    config = parent.config
    labels = (config.get("config") or {}).get("Labels") or {}
    return PartialImage(
        spec.name,
        str(config.get("architecture", "amd64")),
        layers=parent.layers,
        history=tuple(dict(h) for h in config.get("history") or ()),
        labels={str(k): str(v) for k, v in labels.items()},
    )


def run_stage(ctx: BuildContext, image: PartialImage, stage: Stage) -> PartialImage:
    """Run `stage` on top of `image`: reuse its cached layer when its key matches, else
    produce one and record it (only once the layer blob is committed). The image with
    that layer on top; the stage's result goes to the reporter."""
    started = time.monotonic()
    key = stage.key
    cached = _cached(ctx, image.name, stage.name, key)
    if cached is not None:
        rec, reason = cached, "all inputs unchanged"
        if not ctx.options.explain:  # --explain says it on stdout
            log.info(f"==> {image.name}: {stage.name}: cached")
    else:
        rec, reason = _produce(ctx, image.name, stage, key)
    result = StageResult(
        image.name,
        stage.name,
        key,
        cached is not None,
        reason,
        rec.layer,
        time.monotonic() - started,
        str(rec.origin) if cached is not None and rec.origin else "",
    )
    ctx.report(result)
    entry = {
        "created": rec.created,
        "created_by": rec.created_by,
        "comment": f"sysbake {stage.name} {key[:16]}",
    }
    return replace(
        image,
        layers=(*image.layers, rec.layer),
        history=(*image.history, entry),
        records=(*image.records, rec),
        results=(*image.results, result),
    )


def _cached(ctx: BuildContext, image: str, stage: str, key: str) -> StageRecord | None:
    """The cached record of stage `key` (this store's, or one a cache source offers, then
    made this store's), remembered as the last build of the stage; None on a miss."""
    if ctx.options.no_cache:
        return None
    hit = ctx.cache.lookup(key, ctx.options.cache_from)
    if hit is None:
        return None
    if hit.origin is not None:
        hit = replace(hit, image=image, stage=stage)
        ctx.cache.save(hit)
    else:
        ctx.cache.remember(hit)
    return hit


def _produce(ctx: BuildContext, image: str, stage: Stage, key: str) -> tuple[StageRecord, str]:
    """Make the stage's layer and record it; the record and why it was (re)built."""
    if ctx.options.no_cache:
        reason = "--no-cache"
    else:
        last = ctx.cache.last(image, stage.name)
        reason = explain(last.inputs if last else None, stage.inputs)
    with log.step(f"{image}: {stage.name} (rebuilding: {reason})"):
        try:
            layer = stage.produce()
        except OSError as exc:
            raise BuildError(f"{image}: {stage.name}: {exc.strerror or exc}") from exc
    rec = StageRecord(
        key=key,
        image=image,
        stage=stage.name,
        inputs=stage.inputs,
        layer=layer,
        created=_now(),
        created_by=stage.created_by,
    )
    ctx.cache.save(rec)
    return rec, reason


def _store_image(ctx: BuildContext, spec: ImageSpec, image: PartialImage) -> Image:
    """The image's config (the project's [config], labels naming each stage's key) and
    manifest, written to the store."""
    labels = {**image.labels, "io.sysbake.image": spec.name}
    labels |= {f"io.sysbake.stage.{rec.stage}": rec.key for rec in image.records}
    config = finalize.image_config(
        spec.config,
        architecture=image.architecture,
        diff_ids=[layer.diff_id for layer in image.layers],
        history=image.history,
        created=_created(image),
        labels=labels,
    )
    return ctx.store.put_image(config, image.layers)


def _tag(ctx: BuildContext, spec: ImageSpec, image: Image) -> str:
    ref = ctx.store.tag(spec.tag, image)
    log.info(f"==> tagged {ref} ({oci.hex_of(image.id)[:12]})")
    return ref


def _created(image: PartialImage) -> str:
    """The image's creation time: SOURCE_DATE_EPOCH's, else its newest stage's."""
    epoch = source_date_epoch()
    if epoch is not None:
        return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    stamps = [r.created for r in image.records] or [
        str(h.get("created", "")) for h in image.history
    ]
    return max(stamps) if stamps else _now()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
