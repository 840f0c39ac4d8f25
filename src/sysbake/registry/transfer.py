"""Push images to and pull them from any OCI registry (distribution API v2).

Push: every blob is checked with HEAD and skipped when present, mounted from another
repository of the same registry when one is known to hold it, else uploaded streamed from
its store file (in chunks, resumed or started over: registry.client's `upload_blob`); the
manifest goes last, so a tag never names a half-pushed image.
Pull: the manifest (an index or Docker manifest list picks linux/<host architecture>), then
each missing blob streamed into the store and verified against its digest before it is
committed; the image is tagged last, so a failed pull tags nothing and leaves no partial blob.
Docker schema2 manifests are stored as OCI manifests (same config and layer bytes, so the
image ID is kept); OCI manifests are stored byte for byte.

A registry is not trusted: manifests and configs are capped in size, blobs whose declared
sizes the store's file system cannot hold are refused before any download, every transfer
keeps to a minimum rate (registry_client.Limits), and a pull never writes into the stage
cache: only `cache_source`, for a source the user named (`build --cache-from`), offers an
image's stages, to one build.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from sysbake import log
from sysbake.build.cache import Origin, StageRecord
from sysbake.oci import compress
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Image, host_platform
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.progress import Blob as _Progress
from sysbake.progress import transfer as transfer_progress
from sysbake.records import field, record
from sysbake.registry.auth import Credentials, RegistryError, auth_files, lookup_credentials
from sysbake.registry.client import (
    Limits,
    Session,
    SlowTransfer,
    TlsOptions,
)
from sysbake.registry.seed import blob_repositories, remember_blobs, stage_records

__all__ = [
    "ConnectOptions",
    "Limits",
    "ManifestNotFound",
    "PullResult",
    "PushResult",
    "Reference",
    "RegistryError",
    "TlsOptions",
    "cache_source",
    "connect",
    "host_platform",
    "pull",
    "push",
    "push_blob",
    "select_platform",
]

MAX_MANIFEST = 4 << 20  # bytes: what docker and containerd accept for a manifest or index
MAX_CONFIG = 8 << 20  # bytes: an image config (labels, history) is kilobytes in practice
MANIFEST_TYPES = (oci.MT_MANIFEST, oci.MT_INDEX, oci.MT_DOCKER_MANIFEST, oci.MT_DOCKER_LIST)
_OCI_LAYER_OF = {oci.MT_DOCKER_LAYER_GZIP: oci.MT_LAYER_GZIP}


class ManifestNotFound(RegistryError):
    """The registry has no manifest by that tag or digest (it answered 404)."""


@record
class ConnectOptions:
    """How to reach a registry: TLS settings, explicit credentials, the auth file to read,
    how slow it may be."""

    tls: TlsOptions = field(default_factory=TlsOptions)
    creds: Credentials | None = None
    auth_file: Path | None = None
    limits: Limits = field(default_factory=Limits.from_env)


@record
class PushResult:
    ref: str
    digest: str
    uploaded: int
    present: int
    mounted: int

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref,
            "digest": self.digest,
            "uploaded": self.uploaded,
            "present": self.present,
            "mounted": self.mounted,
        }


@record
class PullResult:
    """A pulled image; `ref` is its store tag ("" when pulled without tagging), `digest`
    its manifest digest in the registry (a Docker manifest is stored converted to OCI)."""

    source: str
    ref: str
    image: Image
    fetched: int
    present: int
    digest: str

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "ref": self.ref,
            "id": self.image.id,
            "manifest": self.image.manifest.digest,
            "fetched": self.fetched,
            "present": self.present,
        }


def connect(registry: str, repository: str, options: ConnectOptions) -> Session:
    """A session to `registry`, with explicit credentials or those of the auth files."""
    creds = options.creds or lookup_credentials(registry, repository, auth_files(options.auth_file))
    return Session(registry, tls=options.tls, creds=creds, limits=options.limits)


def _short(digest: str) -> str:
    return digest.removeprefix("sha256:")[:12]


# -- push -------------------------------------------------------------------------------------


def push(store: Store, source: str, dest: Reference | None, options: ConnectOptions) -> PushResult:
    """Push image `source` of the store to `dest` (default: its own name, which must name a
    registry host). Blobs first, manifest last; returns the pushed manifest digest."""
    image = store.resolve(source)
    if dest is None:
        try:
            dest = Reference.parse(source, need_registry=True)
        except InvalidReference as exc:
            raise RegistryError(
                f"{source!r} names no registry: give a destination host[:port]/repository[:tag]"
            ) from exc
    if dest.digest and dest.digest != image.manifest.digest:
        raise RegistryError(f"{dest}: the image's manifest digest is {image.manifest.digest}")
    session = connect(dest.domain, dest.path, options)
    scopes = (f"repository:{dest.path}:pull,push",)
    with store.open_blob(image.manifest.digest) as f:
        manifest = f.read()
    counts = {"uploaded": 0, "present": 0, "mounted": 0}
    blobs = [layer.blob for layer in image.layers] + [image.config_descriptor]
    with log.step(f"pushing {source} to {dest}"):
        with transfer_progress("pushing", blobs):
            for desc in blobs:
                counts[_push_blob(store, session, dest.path, desc, scopes)] += 1
        media_type = json.loads(manifest).get("mediaType") or oci.MT_MANIFEST
        path = f"/v2/{dest.path}/manifests/{dest.reference}"
        resp = session.request(
            "PUT", path, scopes=scopes, body=manifest, headers={"Content-Type": media_type}
        )
        if resp.status not in (200, 201):
            raise session.fail(resp, f"PUT manifest {dest}")
        with resp:
            resp.read(64 << 10)
            echoed = resp.headers.get("Docker-Content-Digest")
        if echoed and echoed != image.manifest.digest:
            raise RegistryError(
                f"{dest}: the registry stored manifest {echoed}, expected {image.manifest.digest}"
            )
    remember_blobs(store, dest.domain, dest.path, [b.digest for b in blobs])
    return PushResult(str(dest), image.manifest.digest, **counts)


def push_blob(
    store: Store, session: Session, repo: str, desc: Descriptor, scopes: tuple[str, ...]
) -> str:
    """Push the store blob `desc` to `repo` as push does (skipped when present, mounted
    when known elsewhere); "present", "mounted" or "uploaded"."""
    return _push_blob(store, session, repo, desc, scopes)


def _push_blob(
    store: Store, session: Session, repo: str, desc: Descriptor, scopes: tuple[str, ...]
) -> str:
    head = session.request("HEAD", f"/v2/{repo}/blobs/{desc.digest}", scopes=scopes)
    with head:
        status = head.status
    if status == 200:
        log.info(f"    {_short(desc.digest)}: already in {repo}")
        return "present"
    if status != 404:
        raise session.fail(head, f"HEAD blob {desc.digest}")
    location = None
    for origin in blob_repositories(store, session.registry, desc.digest):
        if origin == repo:
            continue
        query = urllib.parse.urlencode({"mount": desc.digest, "from": origin})
        resp = session.request(
            "POST",
            f"/v2/{repo}/blobs/uploads/?{query}",
            scopes=(*scopes, f"repository:{origin}:pull"),
            body=b"",
        )
        with resp:
            resp.read(64 << 10)
            if resp.status == 201:
                log.info(f"    {_short(desc.digest)}: mounted from {origin}")
                return "mounted"
            if resp.status == 202:  # not mountable: the registry opened an upload instead
                location = urllib.parse.urljoin(resp.url, resp.headers.get("Location") or "")
                break
    # Chunked and resumed where the registry allows, started over when it must be.
    progress = _Progress("pushing", desc)
    with store.open_blob(desc.digest) as f:
        session.upload_blob(
            repo, desc.digest, desc.size, f, scopes=scopes, location=location, sent=progress
        )
    progress.finish("pushed")
    return "uploaded"


# -- pull -------------------------------------------------------------------------------------


def select_platform(
    index: dict[str, Any], wanted: tuple[str, str, str | None], where: str
) -> dict[str, Any]:
    """The manifest descriptor of an index for platform `wanted` (os, arch, variant): an
    exact variant match first, then one without a variant (arm64's v8 is the default)."""
    os_name, arch, variant = wanted
    candidates = []
    for desc in index.get("manifests") or []:
        plat = desc.get("platform") or {}
        if plat.get("os") == os_name and plat.get("architecture") == arch:
            candidates.append(desc)
    for desc in candidates:
        if (desc.get("platform") or {}).get("variant") == variant:
            return dict(desc)
    for desc in candidates:
        if variant is None and (desc.get("platform") or {}).get("variant") in (None, "v8"):
            return dict(desc)
    found = sorted(
        {
            "/".join(filter(None, (p.get("os"), p.get("architecture"), p.get("variant"))))
            for d in index.get("manifests") or []
            if (p := d.get("platform") or {})
        }
    )
    want = "/".join(filter(None, wanted))
    raise RegistryError(
        f"{where} has no image for {want} (it has: {', '.join(found) or 'no platforms'})"
    )


def _get_manifest(
    session: Session, repo: str, reference: str, scopes: tuple[str, ...], where: str
) -> tuple[bytes, str]:
    resp = session.request(
        "GET",
        f"/v2/{repo}/manifests/{reference}",
        scopes=scopes,
        headers={"Accept": ", ".join(MANIFEST_TYPES)},
    )
    if resp.status == 404:
        with resp:
            raise ManifestNotFound(f"{where} not found in the registry ({resp.error_text()})")
    if resp.status != 200:
        raise session.fail(resp, f"GET manifest {where}")
    with resp:
        declared = resp.headers.get("Content-Length") or "0"
        if not declared.isdigit() or int(declared) > MAX_MANIFEST:
            raise RegistryError(
                f"pull {where}: the registry declares a manifest of "
                f"{declared} bytes (at most {MAX_MANIFEST} are accepted): "
                "refused"
            )
        try:
            data = resp.read(MAX_MANIFEST)
        except RegistryError as exc:
            raise RegistryError(f"pull {where}: manifest: {exc}") from exc
        content_type = (resp.headers.get("Content-Type") or "").split(";")[0].strip()
        echoed = resp.headers.get("Docker-Content-Digest")
    digest = oci.sha256_digest(data)
    expected = reference if oci.is_digest(reference) else echoed
    if expected and oci.is_digest(expected) and expected != digest:
        raise RegistryError(
            f"{where}: manifest digest mismatch: the registry promised "
            f"{expected}, the bytes hash to {digest}"
        )
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise RegistryError(f"{where}: the manifest is not JSON") from exc
    media_type = (doc.get("mediaType") if isinstance(doc, dict) else None) or content_type
    if media_type not in MANIFEST_TYPES:
        raise RegistryError(
            f"{where}: unsupported manifest type {media_type!r} "
            f"(expected an OCI or Docker schema2 manifest or index)"
        )
    return data, media_type


def _free_bytes(store: Store) -> int:
    """Bytes an unprivileged writer may still use on the store's file system."""
    st = os.statvfs(store.tmp_dir)
    return st.f_bavail * st.f_frsize


def _check_sizes(
    store: Store, config: Descriptor | None, blobs: list[Descriptor], where: str
) -> None:
    """Refuse, before any download, declared sizes that are nonsense or that the store's
    file system cannot hold (the blobs still missing, together); `config` is capped."""
    for desc in blobs:
        if desc.size < 0:
            raise RegistryError(f"pull {where}: blob {desc.digest} declares a negative size")
    if config is not None and config.size > MAX_CONFIG:
        raise RegistryError(
            f"pull {where}: config {config.digest} declares {config.size} "
            f"bytes (at most {MAX_CONFIG} are accepted): refused"
        )
    missing = {d.digest: d.size for d in blobs if not store.has_blob(d.digest)}
    free = _free_bytes(store)
    for digest, size in missing.items():
        if size > free:
            raise RegistryError(
                f"pull {where}: blob {digest} declares {size} bytes, more "
                f"than the {free} bytes free in {store.root}: refused"
            )
    if sum(missing.values()) > free:
        raise RegistryError(
            f"pull {where}: the image's blobs declare "
            f"{sum(missing.values())} bytes, more than the {free} bytes "
            f"free in {store.root}: refused"
        )


def _fetch_blob(
    store: Store, session: Session, repo: str, desc: Descriptor, scopes: tuple[str, ...], where: str
) -> bool:
    """Stream a blob into the store, verified; False when it was already there."""
    if store.has_blob(desc.digest):
        return False
    progress = _Progress("pulling", desc)
    writer = store.blob_writer()
    try:
        resp = session.request("GET", f"/v2/{repo}/blobs/{desc.digest}", scopes=scopes)
        if resp.status != 200:
            raise session.fail(resp, f"GET blob {desc.digest}")
        with resp:
            dropped: BaseException | None = None
            try:
                for chunk in resp.chunks():
                    writer.write(chunk)
                    progress.add(len(chunk))
                    if writer.size > desc.size:
                        raise RegistryError(
                            f"blob {desc.digest}: the registry sent more than its {desc.size} bytes"
                        )
            except (OSError, http.client.HTTPException) as exc:
                dropped = exc
        if isinstance(dropped, SlowTransfer):
            raise RegistryError(
                f"pull {where}: blob {desc.digest}: {dropped}: dropped"
            ) from dropped
        if dropped is not None or writer.size < desc.size:
            # http.client returns a short body, rather than raising, when the peer hangs up.
            raise RegistryError(
                f"connection to {session.registry} dropped while pulling blob "
                f"{desc.digest} ({writer.size} of {desc.size} bytes received)"
            ) from dropped
        if writer.digest != desc.digest:
            raise RegistryError(
                f"blob {desc.digest}: digest mismatch, the registry sent "
                f"bytes hashing to {writer.digest}"
            )
        writer.commit(desc.media_type)
    except BaseException:
        writer.discard()
        raise
    progress.finish("pulled")
    return True


def _verify_diff_ids(store: Store, layers: list[Descriptor], config: Any, where: str) -> None:
    """Check that every layer unpacks to the diff ID its config names: trees are unpacked
    and shared by diff ID, so a lying config must not bind a foreign blob to one."""
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") if isinstance(config, dict) else None
    if not isinstance(diff_ids, list) or len(diff_ids) != len(layers):
        raise RegistryError(
            f"{where}: the config names {len(diff_ids or [])} diff_ids for {len(layers)} layers"
        )
    known = {(la.blob.digest, la.diff_id) for t in store.tags() for la in t.image.layers}
    for desc, diff_id in zip(layers, diff_ids, strict=True):
        if (desc.digest, diff_id) in known:
            continue  # a pair a stored image already vouches for
        digest = hashlib.sha256()
        with (
            store.open_blob(desc.digest) as raw,
            compress.decompressor(oci.LAYER_COMPRESSION[desc.media_type], raw) as plain,
        ):
            while chunk := plain.read(1 << 20):
                digest.update(chunk)
        if f"sha256:{digest.hexdigest()}" != diff_id:
            raise RegistryError(
                f"{where}: layer {desc.digest} does not unpack to the diff_id "
                f"{diff_id} its config names"
            )


def _store_manifest(
    store: Store, data: bytes, media_type: str, doc: dict[str, Any], where: str
) -> Descriptor:
    if media_type == oci.MT_MANIFEST:
        return store.put_bytes(data, oci.MT_MANIFEST)
    # Docker schema2 -> OCI: same config and layer bytes, only the media types change.
    config = Descriptor.from_json(doc["config"])
    layers = [Descriptor.from_json(d) for d in doc.get("layers") or []]
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "config": Descriptor(oci.MT_CONFIG, config.digest, config.size).to_json(),
        "layers": [
            Descriptor(_OCI_LAYER_OF.get(d.media_type, d.media_type), d.digest, d.size).to_json()
            for d in layers
        ],
    }
    return store.put_json(manifest, oci.MT_MANIFEST)


def _resolve_manifest(
    session: Session,
    repo: str,
    source: Reference,
    scopes: tuple[str, ...],
    wanted: tuple[str, str, str | None] | None,
    where: str,
) -> tuple[bytes, str]:
    """The image manifest `source` names (data, media type): through an index, the entry
    for the `wanted` platform (default: the host's); a nested index is refused."""
    data, media_type = _get_manifest(session, repo, source.reference, scopes, where)
    if media_type not in (oci.MT_INDEX, oci.MT_DOCKER_LIST):
        return data, media_type
    chosen = select_platform(json.loads(data), wanted or host_platform(), where)
    digest = str(chosen.get("digest"))
    if not oci.is_digest(digest):
        raise RegistryError(f"{where}: index entry without a sha256 digest")
    size = chosen.get("size")
    if not isinstance(size, int) or not 0 <= size <= MAX_MANIFEST:
        raise RegistryError(
            f"pull {where}: the index declares a manifest of {size} "
            f"bytes (at most {MAX_MANIFEST} are accepted): refused"
        )
    data, media_type = _get_manifest(session, repo, digest, scopes, where)
    if media_type not in (oci.MT_MANIFEST, oci.MT_DOCKER_MANIFEST):
        raise RegistryError(f"{where}: nested indexes are not supported")
    return data, media_type


def _parse_manifest(data: bytes, where: str) -> tuple[dict[str, Any], Descriptor, list[Descriptor]]:
    """The manifest document, its config and its layers; refuses a malformed manifest, a
    digest other than sha256 and a layer media type sysbake cannot decompress."""
    doc = json.loads(data)
    try:
        config = Descriptor.from_json(doc["config"])
        layers = [Descriptor.from_json(d) for d in doc.get("layers") or []]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RegistryError(f"{where}: malformed manifest ({exc})") from exc
    for desc in (config, *layers):
        if not oci.is_digest(desc.digest):
            raise RegistryError(f"{where}: unsupported blob digest {desc.digest!r}")
    for desc in layers:
        if desc.media_type not in oci.LAYER_COMPRESSION:
            raise RegistryError(f"{where}: unsupported layer type {desc.media_type!r}")
    return doc, config, layers


def _fetch_blobs(
    store: Store,
    session: Session,
    repo: str,
    blobs: list[Descriptor],
    scopes: tuple[str, ...],
    where: str,
) -> tuple[int, int]:
    """_fetch_blob for each of `blobs`, in order; returns (fetched, already present)."""
    fetched = present = 0
    for desc in blobs:
        if _fetch_blob(store, session, repo, desc, scopes, where):
            fetched += 1
        else:
            present += 1
    return fetched, present


def pull(
    store: Store,
    source: Reference,
    options: ConnectOptions,
    *,
    tag: str | None = None,
    wanted: tuple[str, str, str | None] | None = None,
    untagged: bool = False,
) -> PullResult:
    """Pull `source` into the store and tag it `tag` (default: the source's own name), or
    with `untagged` only fetch it (tags it already has stay). Never touches the stage cache."""
    local = source if tag is None else Reference.parse(tag, allow_digest=False)
    store.ensure()
    store.clean_stale()
    session = connect(source.domain, source.path, options)
    repo = source.path
    scopes = (f"repository:{repo}:pull",)
    where = str(source)
    with log.step(f"pulling {source}"):
        data, media_type = _resolve_manifest(session, repo, source, scopes, wanted, where)
        doc, config, layers = _parse_manifest(data, where)
        _check_sizes(store, config, [config, *layers], where)
        with transfer_progress("pulling", [config, *layers]):
            fetched, present = _fetch_blobs(store, session, repo, [config, *layers], scopes, where)
        _verify_diff_ids(store, layers, store.read_json(config.digest), where)
        manifest = _store_manifest(store, data, media_type, doc, where)
        try:
            image = store.load_image(manifest)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"{where}: malformed image config ({exc})") from exc
        store.check_image(image)  # a hostile or broken layer: refused before any tag
        ref = "" if untagged else store.tag(local.store_name(), image)
    remember_blobs(store, source.domain, repo, [d.digest for d in (config, *layers)])
    return PullResult(where, ref, image, fetched, present, oci.sha256_digest(data))


def cache_source(store: Store, source: Reference, options: ConnectOptions) -> list[StageRecord]:
    """Fetch cache source `source` (named by the user: `build --cache-from`) into the store
    without tagging it, and return the stage records its labels and history prove, each
    naming its origin (registry, repository, manifest digest); nothing is recorded."""
    result = pull(store, source, options, untagged=True)
    origin = Origin(source.domain, source.path, result.digest)
    return stage_records(result.image, origin)
