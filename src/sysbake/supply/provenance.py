"""Provenance of a stored image: an in-toto statement (v1) with a SLSA provenance v1
predicate, made from the image's stage labels and this store's stage records.

What it states, and never more: the project file's digest (the `io.sysbake.project`
label, when the build recorded one), every stage's key and layer, the digests (never the
contents) of the state trees, pillars, projects and other input trees each stage hashed,
the Salt version and toolchain, the bootstrap's suite, mirror (apt source lines, any
user:password in a URL removed) and snapshot, and sysbake's version. Step environments,
grains and scripts are not stated: they may hold secrets. A stage whose record this store
does not hold (a pulled image) is stated by its key alone.

Deterministic: the same image and records give the same statement (no wall-clock time;
the image's `created` stands for when the build finished).
"""

from __future__ import annotations

import json
import re
from typing import Any

from sysbake import __version__
from sysbake.build.cache import StageCache, StageRecord
from sysbake.oci import model as oci
from sysbake.oci.model import Image
from sysbake.oci.store import Store

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
BUILD_TYPE = "urn:sysbake:build:v1"
BUILDER_ID = "urn:sysbake:builder"
STAGE_LABEL = "io.sysbake.stage."
PROJECT_LABEL = "io.sysbake.project"
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/@\s]*@", re.IGNORECASE)
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


def _digest(value: object) -> dict[str, str] | None:
    text = str(value)
    return {"sha256": oci.hex_of(text)} if oci.is_digest(text) else None


def redact(line: str) -> str:
    """An apt source line without the user:password of its URLs."""
    return _USERINFO.sub(r"\1", line)


def _labels(image: Image) -> dict[str, str]:
    labels = (image.config.get("config") or {}).get("Labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else {}


def _roles(step: dict[str, Any]) -> dict[str, str]:
    """Input tree (path relative to the project) -> what it is to the step."""
    roles: dict[str, str] = {}
    for role, key in (("state_tree", "state_tree"), ("pillar", "pillar")):
        value = step.get(key) or []
        for path in value if isinstance(value, list) else [value]:
            roles[str(path)] = role
    if step.get("path"):
        roles[str(step["path"])] = "project"
    return roles


def _stage_inputs(rec: StageRecord) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """What a stage record states (salt version, bootstrap settings), and the resolved
    dependencies it names (input trees by digest, apt sources)."""
    inputs = rec.inputs
    facts: dict[str, Any] = {}
    deps: list[dict[str, Any]] = []
    step = inputs.get("step") if isinstance(inputs.get("step"), dict) else {}
    roles = _roles(step or {})
    if step:
        facts["type"] = step.get("type")
        facts["mode"] = step.get("mode")
    trees = inputs.get("trees") if isinstance(inputs.get("trees"), dict) else {}
    for path, value in sorted((trees or {}).items()):
        dep: dict[str, Any] = {
            "name": f"{rec.stage}: {path}",
            "annotations": {"role": roles.get(path, "input"), "stage": rec.stage},
        }
        digest = _digest(value)
        if digest is not None:
            dep["digest"] = digest
        deps.append(dep)
    plan = inputs.get("plan") if isinstance(inputs.get("plan"), dict) else {}
    if plan and plan.get("salt_version"):
        facts["salt_version"] = plan["salt_version"]
        facts["salt_toolchain"] = plan.get("toolchain")
    boot = inputs.get("bootstrap") if isinstance(inputs.get("bootstrap"), dict) else {}
    if boot:
        facts |= {k: boot.get(k) for k in ("suite", "variant", "architecture", "snapshot")}
        for line in boot.get("sources") or []:
            clean = redact(str(line))
            deps.append(
                {
                    "name": f"{rec.stage}: apt source",
                    "uri": next((w for w in clean.split() if "://" in w), clean),
                    "annotations": {"source": clean, "snapshot": boot.get("snapshot") or ""},
                }
            )
    return facts, deps


def _stages(store: Store, image: Image) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Each stage the labels name, in layer order where a record places it, with what its
    record states; and the dependencies of all of them."""
    cache = StageCache(store)
    diff_ids = list(image.diff_ids)
    stages: list[dict[str, Any]] = []
    deps: list[dict[str, Any]] = []
    for label, key in sorted(_labels(image).items()):
        if not label.startswith(STAGE_LABEL):
            continue
        stage: dict[str, Any] = {"name": label.removeprefix(STAGE_LABEL), "key": key}
        rec = cache.lookup(key) if re.fullmatch(r"[0-9a-f]{64}", key) else None
        if rec is None or rec.layer.diff_id not in diff_ids:
            stage["record"] = "not in this store"
        else:
            facts, found = _stage_inputs(rec)
            stage |= {k: v for k, v in facts.items() if v not in (None, "")}
            stage["layer"] = {"diff_id": rec.layer.diff_id, "blob": rec.layer.blob.digest}
            if rec.origin is not None:
                stage["origin"] = str(rec.origin)
            deps += found
        stages.append(stage)
    order = {d: i for i, d in enumerate(diff_ids)}

    def place(stage: dict[str, Any]) -> tuple[int, str]:
        diff_id = str((stage.get("layer") or {}).get("diff_id", ""))
        return order.get(diff_id, len(order)), str(stage["name"])

    stages.sort(key=place)
    return stages, deps


def statement(store: Store, image: Image, subject: str) -> dict[str, Any]:
    """The in-toto statement of `image` (published or known as `subject`, a name without
    tag or digest) with its SLSA v1 provenance predicate."""
    labels = _labels(image)
    stages, deps = _stages(store, image)
    external: dict[str, Any] = {"image": labels.get("io.sysbake.image", "")}
    project = labels.get(PROJECT_LABEL, "")
    found = _DIGEST.search(project)
    if found is not None:
        external["project"] = {"digest": {"sha256": oci.hex_of(found[0])}}
    salt = sorted({s["salt_version"] for s in stages if s.get("salt_version")})
    created = str(image.config.get("created") or "")
    return {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": subject, "digest": {"sha256": oci.hex_of(image.manifest.digest)}}],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": external,
                "internalParameters": {"stages": stages, "salt_versions": salt},
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"sysbake": __version__}},
                "metadata": {"finishedOn": created} if created else {},
                "byproducts": [
                    {"name": f"layer {i}", "digest": {"sha256": oci.hex_of(layer.diff_id)}}
                    for i, layer in enumerate(image.layers)
                ],
            },
        },
    }


def render(doc: dict[str, Any]) -> bytes:
    """A statement as JSON bytes, deterministic."""
    return json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False).encode() + b"\n"
