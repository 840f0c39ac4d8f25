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
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

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
from sysbake.errors import BuildError, ImageNotFound
from sysbake.oci import model as oci
from sysbake.oci.layers.commit import epoch_stamp, source_date_epoch, stamp_epoch
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.project.specs import SQUASH_STAGE, ImageSpec, Project
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
    """Build the targets of `project` (default: all images) and their in-file parents;
    with options.jobs > 1, images whose parents are built at once (`_build_at_once`)."""
    store.hold()  # no GC until this build ends: what it adds is unreachable at first
    store.clean_stale()
    ctx = BuildContext(
        project=project, store=store, cache=StageCache(store), options=options, report=report
    )
    order = project.build_order(list(options.targets) or None)
    if options.jobs > 1 and len(order) > 1:
        return _build_at_once(ctx, order)
    built: dict[str, Image] = {}
    results = []
    for spec in order:
        result = build_image(ctx, spec, built)
        built[spec.name] = result.image
        results.append(result)
    return results


def _build_at_once(ctx: BuildContext, order: list[ImageSpec]) -> list[BuildResult]:
    """-j N: each image built in a process of its own (sysbake.build.schedule) once its
    in-file parent is built, N at a time; its stages' results come back as events, its
    image by its manifest digest. The same images as one at a time."""
    from sysbake.build import schedule

    specs = {spec.name: spec for spec in order}
    built: dict[str, Image] = {}  # as each job is forked, it holds the parents it needs
    results: dict[str, list[StageResult]] = {spec.name: [] for spec in order}

    def work(name: str, job: schedule.Job) -> schedule.Json:
        def send(result: StageResult) -> None:
            job.send({"event": _stage_json(result)})

        mine = replace(ctx, report=send, stopping=job.stopping)
        result = build_image(mine, specs[name], built)
        return {"ref": result.ref, "manifest": result.image.manifest.to_json()}

    def on_event(name: str, event: schedule.Json) -> None:
        result = _stage_from_json(event)
        results[name].append(result)
        ctx.report(result)

    def finish(name: str, done: schedule.Json) -> BuildResult:
        image = ctx.store.load_image(Descriptor.from_json(done["manifest"]))
        built[name] = image
        return BuildResult(name, str(done["ref"]), image, tuple(results[name]))

    deps = {
        spec.name: [spec.parent] if spec.parent_is_local and spec.parent else [] for spec in order
    }
    launcher = schedule.ForkLauncher(work, on_event, finish)
    done = schedule.run_graph(deps, launcher, ctx.options.jobs)
    return [done[spec.name] for spec in order]


def _stage_json(result: StageResult) -> dict[str, object]:
    """A stage's result as a job sends it: StageResult.to_json with its layer whole."""
    return {**result.to_json(), "blob": result.layer.blob.to_json(), "seconds": result.seconds}


def _stage_from_json(doc: Mapping[str, Any]) -> StageResult:
    return StageResult(
        image=str(doc["image"]),
        stage=str(doc["stage"]),
        key=str(doc["key"]),
        reused=bool(doc["reused"]),
        reason=str(doc["reason"]),
        layer=Layer(Descriptor.from_json(doc["blob"]), str(doc["diff_id"])),
        seconds=float(doc["seconds"]),
        origin=str(doc["origin"]),
    )


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
        stage = steps.provision_stage(ctx, spec, step, image.layers, epoch=_epoch(image))
        image = run_stage(ctx, image, stage)
    if spec.squash:
        image = _squashed(ctx, image)
    stored = _store_image(ctx, spec, image)
    ref = _tag(ctx, spec, stored)
    return BuildResult(spec.name, ref, stored, image.results)


def _from_parent(ctx: BuildContext, spec: ImageSpec, built: Mapping[str, Image]) -> PartialImage:
    """The image's start when it has no bootstrap: its parent's layers, history, labels;
    or, `from = "rootfs:FILE"`, the stage importing that tarball."""
    if spec.rootfs is not None:
        from sysbake.build.imported import rootfs_stage

        base = PartialImage(spec.name, bootstrap.host_architecture())
        return run_stage(ctx, base, rootfs_stage(ctx, spec))
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


def _squashed(ctx: BuildContext, image: PartialImage) -> PartialImage:
    """The image as one layer (`squash = true`): a stage like the others, keyed by the
    layers it merges, whose layer replaces them; their history entries stay, marked
    empty (sysbake.build.squash)."""
    from sysbake.build.squash import SQUASH_BY, emptied

    layers = image.layers
    inputs: dict[str, object] = {
        "stage": SQUASH_STAGE,
        "layers": oci.chain_id([layer.diff_id for layer in layers]),
        "compression": ctx.options.compression,
    }

    def produce() -> Layer:
        from sysbake.build.squash import squash_layers

        return squash_layers(ctx.store, layers, compression=ctx.options.compression)

    epoch = _epoch(image)  # its history's date, as every stage's (reproducible builds)
    created_by = f"{SQUASH_BY} ({len(layers)} layers)"
    stage = Stage(SQUASH_STAGE, inputs, created_by, produce, epoch=lambda: epoch)
    return run_stage(ctx, replace(image, layers=(), history=emptied(image.history)), stage)


def run_stage(ctx: BuildContext, image: PartialImage, stage: Stage) -> PartialImage:
    """Run `stage` on top of `image`: reuse its cached layer when its key matches, else
    produce one and record it (only once the layer blob is committed). The image with
    that layer on top; the stage's result goes to the reporter."""
    started = time.monotonic()
    if ctx.stopping():
        raise BuildError(f"{image.name}: stopped before {stage.name}: another image failed")
    key = stage.key
    cached = _cached(ctx, image.name, stage.name, key)
    if cached is None:
        # Made once per store: a build making the same stage (another image of this build,
        # another process on this store) goes first, and this one then reuses its layer.
        with ctx.store.exclusive(f"stage-{key}", lambda: _waiting(image.name, stage.name)):
            cached = _cached(ctx, image.name, stage.name, key)
            if cached is None:
                rec, reason = _produce(ctx, image.name, stage, key)
    if cached is not None:
        rec, reason = cached, "all inputs unchanged"
        if not ctx.options.explain:  # --explain says it on stdout
            log.info(f"==> {image.name}: {stage.name}: cached")
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


def _waiting(image: str, stage: str) -> None:
    log.info(f"==> {image}: {stage}: waiting for another build of the same stage")


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
        created=_now(stage),
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
    """The image's creation time: its epoch (see _epoch), never the wall clock."""
    return epoch_stamp(_epoch(image))


def _epoch(image: PartialImage) -> int:
    """The epoch of an image being built (README, "Reproducible builds"): SOURCE_DATE_EPOCH,
    else the newest `created` of its history so far (its bootstrap's epoch, or its parent
    image's; none before 1970, as Go's zero time some images carry), else 0."""
    epoch = source_date_epoch()
    if epoch is not None:
        return epoch
    stamps = [stamp_epoch(h.get("created")) for h in image.history]
    return max((s for s in stamps if s is not None and s >= 0), default=0)


def _now(stage: Stage) -> str:
    """The `created` of the layer `stage` just made: its epoch, else SOURCE_DATE_EPOCH's,
    else the wall clock (a stage that knows no epoch)."""
    epoch = stage.epoch() if stage.epoch is not None else None
    if epoch is None:
        epoch = source_date_epoch()
    if epoch is None:
        return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return epoch_stamp(epoch)


def missing_parents(project: Project, store: Store, targets: Sequence[str] = ()) -> list[str]:
    """The `from` images of a build of `targets` (default: all) that name a registry
    (host[:port]/repository...) and that the store lacks: `build` pulls them first."""
    missing: list[str] = []
    for spec in project.build_order(list(targets) or None):
        if spec.parent is None or spec.parent_is_local or spec.parent in missing:
            continue
        try:
            Reference.parse(spec.parent, need_registry=True)
            store.resolve(spec.parent)
        except InvalidReference:
            continue  # a store name or an image ID: the build says so when it is missing
        except ImageNotFound:
            missing.append(spec.parent)
    return missing
