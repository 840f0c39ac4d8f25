"""What `push` publishes beside an image: its SBOM and provenance as OCI artifacts, and
sigstore signatures that podman, skopeo and cosign verify.

- **Artifacts** are OCI 1.1 image manifests with an `artifactType`, the empty config
  (`{}`), one layer (the document) and a `subject` naming the image's manifest. A registry
  with the referrers API indexes them itself (it answers the manifest's PUT with an
  `OCI-Subject` header); otherwise (docker-registry 2.8) the referrers tag scheme applies:
  the tag `sha256-<hex of the image's digest>` names an OCI index listing them, read,
  extended and written back.
- **Signatures** follow cosign's tag scheme: the tag `sha256-<hex>.sig` names an OCI
  manifest whose layers are simple-signing payloads (sysbake.supply.signing), each with
  its signature in the `dev.cosignproject.cosign/signature` annotation. A layer of
  another payload (another signer, another name) is kept; one of the same payload is
  replaced. The image is signed as DEST names it (tag included: podman's default
  `matchRepoDigestOrExact` compares it with what it pulls); each artifact is signed as
  `repository@digest`.
- **Provenance** signed with the same key is a DSSE envelope of the in-toto statement.

Documents are put in the store as blobs first (they are pushed from there like any blob;
no tag references them, so the next GC removes them).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sysbake import log
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Image
from sysbake.oci.reference import Reference
from sysbake.oci.store import Store
from sysbake.records import record
from sysbake.registry.auth import RegistryError
from sysbake.registry.client import Session
from sysbake.registry.transfer import MAX_MANIFEST, ConnectOptions, connect, push_blob
from sysbake.supply import signing

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

EMPTY_CONFIG = Descriptor("application/vnd.oci.empty.v1+json", oci.sha256_digest(b"{}"), 2)
ANN_PREDICATE = "in-toto.io/predicate-type"
_SIG_CONFIG_TIME = "0001-01-01T00:00:00Z"  # what cosign writes: a signature has no build time


@record
class Artifact:
    """A document to attach: its artifact type, its layer's media type, its bytes and the
    annotations of its manifest."""

    artifact_type: str
    media_type: str
    data: bytes
    annotations: tuple[tuple[str, str], ...] = ()


@record
class AttachResult:
    """What was published: artifact manifests (type, digest), how they are found
    ("referrers API" or the tag "sha256-..."), and the signature tags written."""

    attachments: tuple[tuple[str, str], ...]
    referrers: str
    signatures: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "attachments": [{"artifactType": t, "digest": d} for t, d in self.attachments],
            "referrers": self.referrers,
            "signatures": list(self.signatures),
        }


def docker_name(dest: Reference) -> str:
    """The repository as containers/image normalises it (Docker Hub's one-component names
    under library/)."""
    path = dest.path
    if dest.domain == "docker.io" and "/" not in path:
        path = f"library/{path}"
    return f"{dest.domain}/{path}"


def docker_reference(dest: Reference) -> str:
    """The name a signature of the image vouches for: the repository with its tag (or its
    digest when it has no tag)."""
    name = docker_name(dest)
    return f"{name}:{dest.tag}" if dest.tag else f"{name}@{dest.digest}"


def referrers_tag(digest: str) -> str:
    """The tag of the referrers tag scheme (and, with ".sig", of a cosign signature)."""
    return digest.replace(":", "-")


def provenance_artifact(statement: bytes, key: EllipticCurvePrivateKey | None) -> Artifact:
    """The provenance statement as an artifact: a DSSE envelope signed by `key`, or the
    bare statement."""
    from sysbake.supply import provenance

    annotations = ((ANN_PREDICATE, provenance.PREDICATE_TYPE),)
    if key is None:
        return Artifact(provenance.PAYLOAD_TYPE, provenance.PAYLOAD_TYPE, statement, annotations)
    envelope = signing.dsse_envelope(key, provenance.PAYLOAD_TYPE, statement)
    data = json.dumps(envelope, sort_keys=True, separators=(",", ":")).encode()
    return Artifact(provenance.PAYLOAD_TYPE, signing.DSSE_MEDIA_TYPE, data, annotations)


# -- registry requests ----------------------------------------------------------------------


def _put_manifest(
    session: Session,
    repo: str,
    reference: str,
    data: bytes,
    media_type: str,
    scopes: tuple[str, ...],
) -> str:
    """PUT a manifest or index; the OCI-Subject header of the answer ("" when none)."""
    resp = session.request(
        "PUT",
        f"/v2/{repo}/manifests/{reference}",
        scopes=scopes,
        body=data,
        headers={"Content-Type": media_type},
    )
    if resp.status not in (200, 201):
        raise session.fail(resp, f"PUT manifest {repo}:{reference}")
    with resp:
        resp.read(64 << 10)
        return str(resp.headers.get("OCI-Subject") or "")


def _get_document(
    session: Session, repo: str, reference: str, media_type: str, scopes: tuple[str, ...]
) -> dict[str, Any] | None:
    """The manifest or index `reference` of `repo` as JSON (None when the registry has
    none); RegistryError when it is too large, not JSON or of another media type."""
    resp = session.request(
        "GET", f"/v2/{repo}/manifests/{reference}", scopes=scopes, headers={"Accept": media_type}
    )
    if resp.status == 404:
        resp.close()
        return None
    if resp.status != 200:
        raise session.fail(resp, f"GET manifest {repo}:{reference}")
    with resp:
        data = resp.read(MAX_MANIFEST)
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{repo}:{reference}: not JSON") from exc
    if not isinstance(doc, dict) or doc.get("mediaType", media_type) != media_type:
        raise RegistryError(f"{repo}:{reference}: expected a {media_type} document")
    return doc


def _push_document(
    store: Store, session: Session, repo: str, scopes: tuple[str, ...], data: bytes, media_type: str
) -> Descriptor:
    desc = store.put_bytes(data, media_type)
    push_blob(store, session, repo, desc, scopes)
    return desc


# -- artifacts ------------------------------------------------------------------------------


def _artifact_manifest(subject: Descriptor, art: Artifact, layer: Descriptor) -> bytes:
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "artifactType": art.artifact_type,
        "config": EMPTY_CONFIG.to_json() | {"data": base64.b64encode(b"{}").decode()},
        "layers": [layer.to_json()],
        "subject": Descriptor(subject.media_type, subject.digest, subject.size).to_json(),
    }
    if art.annotations:
        doc["annotations"] = dict(art.annotations)
    return oci.canonical_json(doc)


def _attach(
    store: Store,
    session: Session,
    repo: str,
    scopes: tuple[str, ...],
    subject: Descriptor,
    artifacts: Sequence[Artifact],
) -> tuple[list[dict[str, Any]], str]:
    """Push each artifact's manifest; its index descriptors and how they are found."""
    _push_document(store, session, repo, scopes, b"{}", EMPTY_CONFIG.media_type)
    found: list[dict[str, Any]] = []
    api = True
    for art in artifacts:
        layer = _push_document(store, session, repo, scopes, art.data, art.media_type)
        manifest = _artifact_manifest(subject, art, layer)
        digest = oci.sha256_digest(manifest)
        echoed = _put_manifest(session, repo, digest, manifest, oci.MT_MANIFEST, scopes)
        api = api and echoed == subject.digest
        entry: dict[str, Any] = {
            "mediaType": oci.MT_MANIFEST,
            "digest": digest,
            "size": len(manifest),
            "artifactType": art.artifact_type,
        }
        if art.annotations:
            entry["annotations"] = dict(art.annotations)
        found.append(entry)
        log.info(f"    attached {art.artifact_type} {digest.removeprefix('sha256:')[:12]}")
    if api or not found:
        return found, "referrers API"
    tag = referrers_tag(subject.digest)
    index = _get_document(session, repo, tag, oci.MT_INDEX, scopes) or {}
    new = {e["digest"] for e in found}
    kept = [
        m
        for m in index.get("manifests") or []
        if isinstance(m, dict) and m.get("digest") not in new
    ]
    doc = {"schemaVersion": 2, "mediaType": oci.MT_INDEX, "manifests": kept + found}
    _put_manifest(session, repo, tag, oci.canonical_json(doc), oci.MT_INDEX, scopes)
    return found, tag


# -- signatures -----------------------------------------------------------------------------


def _sign(
    store: Store,
    session: Session,
    repo: str,
    scopes: tuple[str, ...],
    digest: str,
    identity: str,
    key: EllipticCurvePrivateKey,
) -> str:
    """Sign manifest `digest` as `identity` into its `.sig` tag; the tag."""
    payload = signing.simple_signing_payload(digest, identity)
    signature = base64.b64encode(signing.sign(key, payload)).decode()
    layer = _push_document(store, session, repo, scopes, payload, signing.SIMPLE_SIGNING_MEDIA_TYPE)
    ours = layer.with_annotations(**{signing.SIGNATURE_ANNOTATION: signature}).to_json()
    tag = referrers_tag(digest) + ".sig"
    old = _get_document(session, repo, tag, oci.MT_MANIFEST, scopes) or {}
    layers = [
        la
        for la in old.get("layers") or []
        if isinstance(la, dict) and la.get("digest") != layer.digest
    ]
    layers.append(ours)
    config = {
        "architecture": "",
        "config": {},
        "created": _SIG_CONFIG_TIME,
        "history": [{"created": _SIG_CONFIG_TIME}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": [str(la.get("digest")) for la in layers]},
    }
    config_desc = _push_document(
        store, session, repo, scopes, oci.canonical_json(config), oci.MT_CONFIG
    )
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "config": config_desc.to_json(),
        "layers": layers,
    }
    _put_manifest(session, repo, tag, oci.canonical_json(manifest), oci.MT_MANIFEST, scopes)
    log.info(f"    signed {digest.removeprefix('sha256:')[:12]} as {identity}")
    return tag


def publish(
    store: Store,
    image: Image,
    dest: Reference,
    options: ConnectOptions,
    *,
    artifacts: Sequence[Artifact] = (),
    key: EllipticCurvePrivateKey | None = None,
) -> AttachResult:
    """Attach `artifacts` to the pushed `image` at `dest` and, with `key`, sign the image
    and each artifact (module docstring)."""
    session = connect(dest.domain, dest.path, options)
    repo = dest.path
    scopes = (f"repository:{repo}:pull,push",)
    with log.step(f"attaching to {dest}"):
        found, how = _attach(store, session, repo, scopes, image.manifest, artifacts)
        tags = []
        if key is not None:
            tags.append(
                _sign(
                    store, session, repo, scopes, image.manifest.digest, docker_reference(dest), key
                )
            )
            name = docker_name(dest)
            for entry in found:
                digest = str(entry["digest"])
                tags.append(_sign(store, session, repo, scopes, digest, f"{name}@{digest}", key))
    return AttachResult(
        tuple((str(e["artifactType"]), str(e["digest"])) for e in found),
        how if found else "",
        tuple(tags),
    )


def publish_supply(
    store: Store,
    source: str,
    dest: Reference,
    options: ConnectOptions,
    *,
    sbom_format: str | None,
    provenance: bool,
    key: EllipticCurvePrivateKey | None,
) -> AttachResult:
    """After `push` of image `source` to `dest`: its SBOM in `sbom_format` (None: none) and,
    with `provenance`, its provenance (when it has sysbake stages), attached; with `key`,
    the image and both signed. An SBOM the image does not allow (a hostile or foreign
    image) is left out with a warning: the push itself stands."""
    from sysbake.errors import SysbakeError
    from sysbake.supply import provenance as prov
    from sysbake.supply import sbom
    from sysbake.supply.inventory import inventory

    image = store.resolve(source)
    artifacts = []
    if sbom_format is not None:
        try:
            document = sbom.render(inventory(store, source), sbom_format)
        except (SysbakeError, OSError) as exc:
            log.warn(f"no SBOM attached to {dest}: {exc}")
        else:
            kind = sbom.MEDIA_TYPES[sbom_format]
            artifacts.append(Artifact(kind, kind, document))
    if provenance:
        statement = prov.statement(store, image, docker_name(dest))
        if statement["predicate"]["buildDefinition"]["internalParameters"]["stages"]:
            artifacts.append(provenance_artifact(prov.render(statement), key))
        else:
            log.info(f"{source}: not built by sysbake (no stage labels): no provenance attached")
    return publish(store, image, dest, options, artifacts=artifacts, key=key)
