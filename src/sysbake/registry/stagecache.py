"""A registry as the stage cache of machines that share nothing else (`build --cache-to`,
`--cache-from`, `[build] cache_to`/`cache_from`).

In the cache repository (`host[:port]/repository`), with docker-registry 2.8 or any registry
of the distribution API v2, each entry is an ordinary OCI manifest under a tag named by its
key, so a lookup is one manifest GET and needs no index to read or rewrite:

- `sysbake-stage-<key>`: a stage, as a one-layer OCI image: its layer is the stage's layer
  blob, its config labels the stage with its key (`io.sysbake.stage.<stage>`) and holds the
  stage's history entry (created, created_by, `sysbake <stage> <key>`): what a sysbake image
  says of each of its stages, so `seed.stage_records` reads both the same way.
- `sysbake-toolchain-<key>`: a Salt toolchain, as an OCI artifact: config MT_TOOLCHAIN (its
  key, identity and diff ID), one zstd layer: its tree.

Pushes add what the registry lacks (HEAD first), blobs before the manifest. Lookups are
lazy: a build asks a source for a stage only when its own store misses, and fetches only
that stage's layer blob (when the store lacks it), verified against its digest, its diff ID
and the one layer check (EntryCheck) before it is offered. Nothing but stage layers, their
keys and history lines, and toolchains travel: a stage's inputs (pillars among them) stay
on the machine that built it, hashed into its key.

A source is trusted because the user named it for this build; what it serves is still
checked. A layer the check refuses costs one warning and that stage is built; a source that
cannot be reached, is no registry, or lies about a digest costs one warning and is not
asked again by this build.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from sysbake import log
from sysbake.build.cache import Origin, StageRecord
from sysbake.build.context import Reporter, StageResult
from sysbake.errors import BuildError, CommandError, Interrupted, LayerError, SysbakeError
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Image, Layer
from sysbake.oci.reference import Reference
from sysbake.oci.store import Store
from sysbake.project.specs import Project, ProjectStep, SaltStep
from sysbake.records import record
from sysbake.registry.client import Session
from sysbake.registry.seed import STAGE_LABEL, stage_records
from sysbake.registry.transfer import (
    MAX_MANIFEST,
    ConnectOptions,
    ManifestNotFound,
    RegistryError,
    _check_sizes,
    _fetch_blob,
    _get_manifest,
    _parse_manifest,
    _push_blob,
    _resolve_manifest,
    connect,
)

if TYPE_CHECKING:
    from sysbake.build.salt.toolchain import Toolchain

_T = TypeVar("_T")

STAGE_TAG = "sysbake-stage-"
TOOLCHAIN_TAG = "sysbake-toolchain-"
MT_TOOLCHAIN = "application/vnd.sysbake.toolchain.config.v1+json"
_DOCKER_TO_OCI = {oci.MT_DOCKER_LAYER_GZIP: oci.MT_LAYER_GZIP}


def stage_tag(key: str) -> str:
    """The tag of stage `key` in a cache repository (78 characters: tags take 128)."""
    return STAGE_TAG + key


def toolchain_tag(key: str) -> str:
    """The tag of the Salt toolchain of key `key` in a cache repository."""
    return TOOLCHAIN_TAG + key


def stage_config(rec: StageRecord, architecture: str) -> dict[str, Any]:
    """The image config a stage travels with (pure): `seed.stage_records` of the one-layer
    image it describes gives back `rec`'s key, stage, layer, created and created_by."""
    return {
        "architecture": architecture,
        "os": "linux",
        "created": rec.created,
        "config": {"Labels": {"io.sysbake.image": rec.image, f"{STAGE_LABEL}{rec.stage}": rec.key}},
        "rootfs": {"type": "layers", "diff_ids": [rec.layer.diff_id]},
        "history": [
            {
                "created": rec.created,
                "created_by": rec.created_by,
                "comment": f"sysbake {rec.stage} {rec.key[:16]}",
            }
        ],
    }


def manifest(config: Descriptor, layers: Sequence[Descriptor]) -> dict[str, Any]:
    """An OCI image manifest of `config` and `layers` (pure)."""
    return {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "config": config.to_json(),
        "layers": [d.to_json() for d in layers],
    }


def verify_layer(store: Store, layer: Layer, what: str) -> None:
    """Refuse (LayerError) a layer blob of the store that is not a tar the one entry check
    accepts or does not unpack to its diff ID; the blob is read whole each time: a diff ID
    checked before does not vouch for another blob that claims it."""
    from sysbake.oci import compress
    from sysbake.oci.layers import archive

    try:
        with (
            store.open_blob(layer.blob.digest) as raw,
            compress.decompressor(layer.compression, raw) as plain,
        ):
            archive.validate_layer(plain, what, diff_id=layer.diff_id)
    except CommandError as exc:  # the decompressor refused the stream
        raise LayerError(f"{what}: not a valid {layer.compression} stream") from exc
    store.mark_checked(layer.diff_id)


def _vouched(store: Store, layer: Layer) -> bool:
    """Whether a tagged image of the store already binds this blob to this diff ID."""
    return any(la == layer for tagged in store.tags() for la in tagged.image.layers)


def _drop_blob(store: Store, digest: str) -> None:
    # A refused blob must not stay where a later lookup would find it present.
    with contextlib.suppress(OSError):
        store.blob_path(digest).unlink()


class RegistryCache:
    """One cache source named for a build: the image its reference names (if any: its
    stages are offered as `cache_source` offers them, its layers fetched only on a hit) and
    the stage tags of its repository, asked per key (a sysbake.build.cache.StageSource).
    Safe to share between threads: one request at a time."""

    def __init__(self, store: Store, source: Reference, options: ConnectOptions) -> None:
        self.store, self.source, self.options = store, source, options
        self.repo = source.path
        self.scopes = (f"repository:{source.path}:pull",)
        self.session: Session | None = None
        self.image_offers: dict[str, StageRecord] = {}
        self.dead = False
        self._answers: dict[str, StageRecord | None] = {}
        self._lock = threading.Lock()

    def __str__(self) -> str:
        return str(self.source)

    def open(self) -> RegistryCache:
        """Reach the registry and read the image the reference names, if there is one
        (manifest and config only). RegistryError when the registry cannot be used."""
        self.session = connect(self.source.domain, self.source.path, self.options)
        where = str(self.source)
        try:
            data, media_type = _resolve_manifest(
                self.session, self.repo, self.source, self.scopes, None, where
            )
        except ManifestNotFound:
            return self  # a cache repository without such an image: stage tags only
        image = self._image(data, media_type, where)
        origin = Origin(self.source.domain, self.repo, oci.sha256_digest(data))
        self.image_offers = {r.key: r for r in stage_records(image, origin)}
        return self

    def _session(self) -> Session:
        if self.session is None:
            raise RegistryError(f"{self.source}: not opened")
        return self.session

    def _image(self, data: bytes, media_type: str, where: str) -> Image:
        """The image of manifest `data`: its config fetched (checked against its digest),
        its layers named but not fetched."""
        _doc, config, blobs = _parse_manifest(data, where)
        _check_sizes(self.store, config, [config], where)
        _fetch_blob(self.store, self._session(), self.repo, config, self.scopes, where)
        try:
            conf = self.store.read_json(config.digest)
            diff_ids = conf["rootfs"]["diff_ids"]
            if not isinstance(diff_ids, list) or len(diff_ids) != len(blobs):
                raise ValueError(f"{len(diff_ids)} diff_ids for {len(blobs)} layers")
            if not all(isinstance(d, str) and oci.is_digest(d) for d in diff_ids):
                raise ValueError("a diff_id that is no sha256 digest")
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise RegistryError(f"{where}: malformed image config ({exc})") from exc
        layers = tuple(
            Layer(Descriptor(_DOCKER_TO_OCI.get(b.media_type, b.media_type), b.digest, b.size), d)
            for b, d in zip(blobs, diff_ids, strict=True)
        )
        desc = Descriptor(media_type, oci.sha256_digest(data), len(data))
        return Image(desc, config, conf, layers)

    # -- stages (a StageSource) -----------------------------------------------------------

    def offer(self, key: str) -> StageRecord | None:
        """The record of stage `key` with its layer fetched and checked, or None: no such
        stage here, a layer the check refuses (one warning) or a source given up on."""
        with self._lock:
            if self.dead or self.session is None:
                return None
            if key not in self._answers:  # a build may ask twice (under its stage lock)
                self._answers[key] = self._offer(key)
            return self._answers[key]

    def _offer(self, key: str) -> StageRecord | None:
        def fetch() -> StageRecord | None:
            found = self.image_offers.get(key) or self._tagged_stage(key)
            return None if found is None else self._fetched(found)

        return self._unless_failed(fetch, (LayerError,), f"stage {key[:16]}: ", "building it")

    def _unless_failed(
        self,
        fetch: Callable[[], _T | None],
        refused: tuple[type[SysbakeError], ...],
        what: str,
        instead: str,
    ) -> _T | None:
        """`fetch()`, or None when it fails: an error of `refused` is one warning (`what`
        prefixes it, `instead` says what the build does); any other error but an
        interruption gives this source up."""
        try:
            return fetch()
        except refused as exc:
            log.warn(f"--cache-from {self.source}: {what}{exc}: refused, {instead}")
            return None
        except Interrupted:
            raise
        except SysbakeError as exc:
            self._give_up(exc)
            return None

    def _give_up(self, exc: SysbakeError) -> None:
        self.dead = True
        log.warn(f"--cache-from {self.source}: {exc}; building without it")

    def _tagged_stage(self, key: str) -> StageRecord | None:
        """The stage the tag of `key` holds, when the registry has it and it proves `key`."""
        where = f"{self.source.name}:{stage_tag(key)}"
        found = self._tagged_manifest(self._session(), stage_tag(key), where)
        if found is None:
            return None
        data, media_type = found
        if media_type not in (oci.MT_MANIFEST, oci.MT_DOCKER_MANIFEST):
            raise RegistryError(f"{where}: expected an image manifest, got {media_type}")
        image = self._image(data, media_type, where)
        origin = Origin(self.source.domain, self.repo, oci.sha256_digest(data))
        records = [r for r in stage_records(image, origin) if r.key == key]
        if len(image.layers) != 1 or not records:
            raise RegistryError(f"{where}: its labels and history do not prove stage {key}")
        return records[0]

    def _tagged_manifest(self, session: Session, tag: str, where: str) -> tuple[bytes, str] | None:
        """The manifest the tag `tag` of the cache repository holds, and its media type;
        None when there is no such tag."""
        try:
            return _get_manifest(session, self.repo, tag, self.scopes, where)
        except ManifestNotFound:
            return None

    def _fetched(self, rec: StageRecord) -> StageRecord:
        """`rec` once its layer blob is in the store and passed the layer check."""
        layer, where = rec.layer, f"{self.source.name} layer {rec.layer.blob.digest}"
        _check_sizes(self.store, None, [layer.blob], where)
        fetched = _fetch_blob(
            self.store, self._session(), self.repo, layer.blob, self.scopes, where
        )
        if fetched or not _vouched(self.store, layer):
            try:
                verify_layer(self.store, layer, f"layer {layer.blob.digest}")
            except LayerError:
                if fetched:
                    _drop_blob(self.store, layer.blob.digest)
                raise
        return rec

    # -- the Salt toolchain ---------------------------------------------------------------

    def toolchain(self, version: str) -> tuple[Toolchain, Origin] | None:
        """The Salt toolchain of `version` for this host, fetched and installed into the
        store (sysbake.build.salt.toolchain.adopt_layer), with where it came from; None
        when this source has none, or it was refused (one warning)."""
        from sysbake.build.salt import toolchain as salt

        with self._lock:
            if self.dead or self.session is None:
                return None
            key = salt.toolchain_key(version)
            where = f"{self.source.name}:{toolchain_tag(key)}"

            def fetch() -> tuple[Toolchain, Origin] | None:
                found = self._toolchain_layer(key, where)
                if found is None:
                    return None
                layer, origin, fetched = found
                try:
                    return salt.adopt_layer(self.store, layer, str(origin), version), origin
                finally:
                    if fetched:  # unpacked into toolchains/: the blob is not kept twice
                        _drop_blob(self.store, layer.blob.digest)

            return self._unless_failed(
                fetch, (LayerError, BuildError), "", "built if a step needs it"
            )

    def _toolchain_layer(self, key: str, where: str) -> tuple[Layer, Origin, bool] | None:
        """The toolchain artifact of `key`: its layer fetched into the store (whether it
        was fetched now), its origin; None when the registry has none."""
        session = self._session()
        found = self._tagged_manifest(session, toolchain_tag(key), where)
        if found is None:
            return None
        data, media_type = found
        _doc, config, layers = _parse_manifest(data, where)
        if media_type != oci.MT_MANIFEST or config.media_type != MT_TOOLCHAIN or len(layers) != 1:
            raise RegistryError(f"{where}: not a sysbake toolchain artifact")
        _check_sizes(self.store, config, [config, *layers], where)
        _fetch_blob(self.store, session, self.repo, config, self.scopes, where)
        conf = self.store.read_json(config.digest)
        diff_id = conf.get("diff_id") if isinstance(conf, dict) else None
        if conf.get("key") != key or not isinstance(diff_id, str) or not oci.is_digest(diff_id):
            raise RegistryError(f"{where}: its config names another key or no diff_id")
        fetched = _fetch_blob(self.store, session, self.repo, layers[0], self.scopes, where)
        origin = Origin(self.source.domain, self.repo, oci.sha256_digest(data))
        return Layer(layers[0], diff_id), origin, fetched


def open_sources(
    store: Store, refs: Sequence[str], options: ConnectOptions
) -> tuple[RegistryCache, ...]:
    """The cache sources `refs` (each parsed first: a typo is an InvalidReference, not a
    source that fails), opened; one that cannot be used is skipped with a warning, as
    docker does, and the build builds what it would have reused."""
    sources = [Reference.parse(text, need_registry=True) for text in refs]
    store.ensure()
    opened = []
    for source in sources:
        cache = RegistryCache(store, source, options)
        try:
            cache.open()
        except Interrupted:
            raise
        except SysbakeError as exc:
            log.warn(f"--cache-from {source}: {exc}; building without it")
            continue
        offered = f"{len(cache.image_offers)} stages of its image, " if cache.image_offers else ""
        log.info(f"==> cache source {source}: {offered}stages looked up by key")
        opened.append(cache)
    return tuple(opened)


# -- pushing ------------------------------------------------------------------------------


@record
class CachePush:
    """What a push to a cache repository did: stages and toolchains pushed, or already there."""

    ref: str
    pushed: int = 0
    present: int = 0
    toolchains: tuple[str, ...] = ()  # the versions pushed

    def to_json(self) -> dict[str, object]:
        return {
            "ref": self.ref,
            "pushed": self.pushed,
            "present": self.present,
            "toolchains": list(self.toolchains),
        }


class CacheTarget:
    """The cache repository a build pushes its stages and toolchains to."""

    def __init__(self, store: Store, dest: Reference, options: ConnectOptions) -> None:
        self.store, self.dest = store, dest
        self.repo = dest.path
        self.scopes = (f"repository:{dest.path}:pull,push",)
        self.session = connect(dest.domain, dest.path, options)

    def has(self, tag: str) -> bool:
        """Whether the repository holds a manifest tagged `tag`."""
        resp = self.session.request(
            "HEAD",
            f"/v2/{self.repo}/manifests/{tag}",
            scopes=self.scopes,
            headers={"Accept": oci.MT_MANIFEST},
        )
        with resp:
            status = resp.status
        if status == 200:
            return True
        if status == 404:
            return False
        raise self.session.fail(resp, f"HEAD manifest {self.dest.name}:{tag}")

    def put(self, tag: str, config: Descriptor, layers: Sequence[Descriptor]) -> str:
        """Push blobs `layers` and `config` (of the store), then their manifest as `tag`;
        its digest."""
        for desc in (*layers, config):
            _push_blob(self.store, self.session, self.repo, desc, self.scopes)
        body = oci.canonical_json(manifest(config, layers))
        if len(body) > MAX_MANIFEST:
            raise RegistryError(f"{self.dest.name}:{tag}: manifest too large")
        resp = self.session.request(
            "PUT",
            f"/v2/{self.repo}/manifests/{tag}",
            scopes=self.scopes,
            body=body,
            headers={"Content-Type": oci.MT_MANIFEST},
        )
        if resp.status not in (200, 201):
            raise self.session.fail(resp, f"PUT manifest {self.dest.name}:{tag}")
        resp.close()
        return oci.sha256_digest(body)

    def push_stage(self, rec: StageRecord, architecture: str) -> bool:
        """Push stage `rec` unless the repository has its tag; whether it was pushed."""
        origin = rec.origin
        if origin is not None and (origin.registry, origin.repository) == (
            self.dest.domain,
            self.repo,
        ):
            return False  # taken from this very repository
        if self.has(stage_tag(rec.key)):
            return False
        config = self.store.put_json(stage_config(rec, architecture), oci.MT_CONFIG)
        self.put(stage_tag(rec.key), config, [rec.layer.blob])
        return True

    def push_toolchain(self, toolchain: Toolchain) -> bool:
        """Push the Salt toolchain (sysbake.build.salt.toolchain.Toolchain) unless the
        repository has its tag; whether it was pushed. Its layer is committed for the push
        and dropped from the store afterwards."""
        from sysbake.build.salt import toolchain as salt

        tag = toolchain_tag(toolchain.key)
        if self.has(tag):
            return False
        with log.step(f"pushing the Salt {toolchain.version} toolchain to {self.dest.name}"):
            layer = salt.commit_layer(self.store, toolchain)
            try:
                config = self.store.put_json(
                    salt.artifact_config(toolchain, layer.diff_id), MT_TOOLCHAIN
                )
                self.put(tag, config, [layer.blob])
            finally:
                _drop_blob(self.store, layer.blob.digest)
        return True


def push_cache(
    store: Store,
    dest: Reference,
    records: Sequence[StageRecord],
    architectures: Mapping[str, str],
    toolchains: Sequence[Toolchain],
    options: ConnectOptions,
) -> CachePush:
    """Push `records` (each under the architecture of its image in `architectures`, else
    the host's) and `toolchains` to cache repository `dest`: what it lacks, stages first."""
    target = CacheTarget(store, dest, options)
    pushed = present = 0
    seen: set[str] = set()
    with log.step(f"pushing the build's stages to {dest.name}"):
        for rec in records:
            if rec.key in seen:
                continue
            seen.add(rec.key)
            arch = architectures.get(rec.image) or oci.host_platform()[1]
            if target.push_stage(rec, arch):
                pushed += 1
            else:
                present += 1
    versions = tuple(tc.version for tc in toolchains if target.push_toolchain(tc))
    return CachePush(dest.name, pushed, present, versions)


# -- one build's registry caches ----------------------------------------------------------


def salt_versions(project: Project, targets: Sequence[str] = ()) -> tuple[str, ...]:
    """The Salt versions ("" = the default) the salt and project steps of the targets (and
    their in-file parents) use, in order of first use."""
    versions = [
        str(step.salt_version)
        for spec in project.build_order(list(targets) or None)
        for step in spec.provision
        if isinstance(step, SaltStep | ProjectStep)
    ]
    return tuple(dict.fromkeys(versions))


class BuildCache:
    """The registry caches of one build: the sources it reads (`sources`, opened) and the
    cache repository it writes (`target`). It hears every stage of the build (`listen`)
    and pushes them when the build ends (`pushing`), also when it failed: what finished is
    worth sharing."""

    def __init__(
        self,
        store: Store,
        sources: tuple[RegistryCache, ...],
        target: Reference | None,
        options: ConnectOptions,
    ) -> None:
        self.store, self.sources, self.target, self.options = store, sources, target, options
        self.stages: list[StageResult] = []
        self.pushed: CachePush | None = None

    def toolchains(self, versions: Sequence[str]) -> list[str]:
        """Make sure the store has the Salt toolchain of each of `versions` when a source
        has it (before any stage runs: a step that misses needs it, and so does `sysbake
        test`'s idempotence check); one line per version for --explain."""
        from sysbake.build.salt import toolchain as salt

        if not self.sources:
            return []
        lines = []
        for version in versions:
            name = f"toolchain: salt {version or salt.DEFAULT_SALT_VERSION}"
            try:
                have = salt.installed(self.store, version)
            except BuildError as exc:  # no toolchain for this host: steps will say why
                lines.append(f"{name}: {exc}")
                continue
            if have is not None:
                origin = salt.origin_of(self.store, have)
                lines.append(f"{name}: reused" + (f": from {origin}" if origin else ""))
                continue
            found = next(filter(None, (src.toolchain(version) for src in self.sources)), None)
            if found is None:
                lines.append(f"{name}: in no cache source: built if a step needs it")
            else:
                log.info(f"==> {name}: fetched from {found[1]}")
                lines.append(f"{name}: reused: from {found[1]}")
        return lines

    def listen(self, inner: Reporter) -> Reporter:
        """A reporter that keeps each stage for the push, then tells `inner`."""

        def report(result: StageResult) -> None:
            self.stages.append(result)
            inner(result)

        return report

    @contextlib.contextmanager
    def pushing(self, project: Project) -> Iterator[None]:
        """Push the stages heard (and the toolchains of `project`'s salt steps) to the
        target when the block ends, unless the user interrupted it."""
        try:
            yield
        except (KeyboardInterrupt, Interrupted):
            raise
        except BaseException:
            self.push(project)
            raise
        self.push(project)

    def push(self, project: Project) -> CachePush | None:
        """Push what the build made to the target; a registry that fails costs one
        warning (the images are built and tagged all the same)."""
        from sysbake.build.cache import StageCache
        from sysbake.build.salt import toolchain as salt

        if self.target is None:
            return None
        cache = StageCache(self.store)
        records = [r for r in (cache.lookup(s.key) for s in self.stages) if r is not None]
        names = {s.image for s in self.stages}
        toolchains = []
        for version in salt_versions(project, tuple(names)):
            with contextlib.suppress(BuildError):  # no toolchain for this host: none to push
                if (tc := salt.installed(self.store, version)) is not None:
                    toolchains.append(tc)
        try:
            self.pushed = push_cache(
                self.store,
                self.target,
                records,
                _architectures(self.store, project, names),
                toolchains,
                self.options,
            )
        except (KeyboardInterrupt, Interrupted):
            raise
        except SysbakeError as exc:
            log.warn(f"--cache-to {self.target.name}: {exc}; nothing more pushed")
            return None
        log.info(
            f"==> cache {self.pushed.ref}: {self.pushed.pushed} stages pushed, "
            f"{self.pushed.present} already there"
        )
        return self.pushed


def _architectures(store: Store, project: Project, names: set[str]) -> dict[str, str]:
    """The architecture of each image `names` the store has tagged (a stage's config says it)."""
    out = {}
    for spec in project.images:
        if spec.name in names:
            with contextlib.suppress(SysbakeError, KeyError):
                out[spec.name] = str(store.resolve(spec.tag).config["architecture"])
    return out
