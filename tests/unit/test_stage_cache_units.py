"""A registry as a stage cache (sysbake.registry.stagecache), root-free: the tags and configs
a stage travels with, the cache settings of the project file and command line, the order in
which a build asks its sources, and a cache source served from loopback by the test itself:
lazy per-key lookups, hostile layers refused with one warning, a lying registry given up
on, and a Salt toolchain that travels as an artifact and is checked like an image."""

from __future__ import annotations

import json
import tarfile
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sysbake.build.cache import Origin, StageCache, StageRecord
from sysbake.build.salt import toolchain as salt
from sysbake.errors import BuildError, ConfigError, LayerError
from sysbake.oci import model as oci
from sysbake.oci.model import Descriptor, Layer
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.oci.store import Store
from sysbake.project.load import load_project
from sysbake.project.specs import cache_repository
from sysbake.registry.seed import stage_records
from sysbake.registry.stagecache import (
    MT_TOOLCHAIN,
    STAGE_TAG,
    BuildCache,
    RegistryCache,
    manifest,
    salt_versions,
    stage_config,
    stage_tag,
    toolchain_tag,
)
from sysbake.registry.transfer import ConnectOptions, Limits
from tests.unit.conftest import crafted_tar, files_tar, layer_blob, noise, put_layer

KEY = "ab" * 32
OTHER = "cd" * 32
FAST = ConnectOptions(limits=Limits(min_rate=1.0, window=2.0))


def _record(layer: Layer, key: str = KEY, stage: str = "system") -> StageRecord:
    return StageRecord(
        key, "web", stage, {"secret": "never pushed"}, layer, "2026-01-01T00:00:00Z", "sysbake x"
    )


# -- pure: tags, configs, settings --------------------------------------------------------


def test_tags_fit_the_reference_grammar() -> None:
    for tag in (stage_tag(KEY), toolchain_tag(KEY)):
        assert len(tag) <= 128
        assert Reference.parse(f"127.0.0.1:5000/cache:{tag}").tag == tag
    assert stage_tag(KEY) == STAGE_TAG + KEY != toolchain_tag(KEY)


def test_a_stage_config_proves_its_stage_and_nothing_of_its_inputs() -> None:
    layer = Layer(Descriptor(oci.MT_LAYER_GZIP, "sha256:" + "1" * 64, 10), "sha256:" + "2" * 64)
    rec = _record(layer)
    config = stage_config(rec, "arm64")
    assert "never pushed" not in json.dumps(config)  # inputs stay home: the key stands for them
    desc = Descriptor(oci.MT_MANIFEST, "sha256:" + "3" * 64, 1)
    image = oci.Image(desc, Descriptor(oci.MT_CONFIG, "sha256:" + "4" * 64, 1), config, (layer,))
    origin = Origin("127.0.0.1:5000", "cache", desc.digest)
    [back] = stage_records(image, origin)
    assert (back.key, back.stage, back.layer, back.created, back.created_by, back.origin) == (
        KEY,
        "system",
        layer,
        rec.created,
        rec.created_by,
        origin,
    )
    assert config["architecture"] == "arm64"
    doc = manifest(image.config_descriptor, [layer.blob])
    assert doc["mediaType"] == oci.MT_MANIFEST and doc["layers"] == [layer.blob.to_json()]


@pytest.mark.parametrize("text", ["127.0.0.1:5000/cache", "reg.example/team/cache", "localhost/c"])
def test_a_cache_repository_is_a_registry_repository(text: str) -> None:
    assert cache_repository(text).name == text


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("cache", "names no registry"),
        ("127.0.0.1:5000/cache:main", "without a tag or digest"),
        ("127.0.0.1:5000/cache@sha256:" + "a" * 64, "without a tag or digest"),
        ("127.0.0.1:5000/../cache", "component"),
    ],
)
def test_a_cache_repository_names_no_tag(text: str, problem: str) -> None:
    with pytest.raises(InvalidReference, match=problem):
        cache_repository(text)


PROJECT = """\
{build}
[images.t]
from = "base:latest"

[[images.t.provision]]
type = "salt"
name = "one"
state_tree = "salt"
sls = ["x"]
{more}
"""


def _project(tmp_path: Path, build: str, more: str = "") -> Path:
    (tmp_path / "salt").mkdir(exist_ok=True)
    (tmp_path / "sysbake.toml").write_text(PROJECT.format(build=build, more=more))
    return tmp_path


def test_the_build_table_names_the_caches(tmp_path: Path) -> None:
    build = '[build]\ncache_from = ["127.0.0.1:5000/cache", "reg.example/base:1"]\n'
    build += 'cache_to = "127.0.0.1:5000/cache"\n'
    project = load_project(_project(tmp_path, build))
    assert project.build.cache_from == ("127.0.0.1:5000/cache", "reg.example/base:1")
    assert project.build.cache_to == "127.0.0.1:5000/cache"
    assert load_project(_project(tmp_path, "")).build.cache_to == ""


@pytest.mark.parametrize(
    ("build", "message"),
    [
        ('[build]\ncache_to = "127.0.0.1:5000/c:tag"', "build.cache_to: expected host[:port]"),
        ('[build]\ncache_to = "cache"', "build.cache_to: names no registry"),
        ('[build]\ncache_from = "127.0.0.1:5000/c"', "build.cache_from: expected an array"),
        ('[build]\ncache_from = ["web:latest"]', "build.cache_from[1]: names no registry"),
        ("[build]\ncache_from = [1]", "build.cache_from[1]: expected a registry reference"),
        ('[build]\ncache = "x"', "build.cache: unknown key"),
    ],
)
def test_the_build_table_is_checked(tmp_path: Path, build: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_project(_project(tmp_path, build))
    text = str(caught.value)
    assert "sysbake.toml: " in text and message in text and "\n" not in text


def test_salt_versions_of_the_targets(tmp_path: Path) -> None:
    more = (
        '\n[images.u]\nfrom = "t"\n[[images.u.provision]]\ntype = "salt"\nname = "two"\n'
        'state_tree = "salt"\nsls = ["x"]\nsalt_version = "3006.30"\n'
    )
    project = load_project(_project(tmp_path, "", more))
    assert salt_versions(project) == ("", "3006.30")
    assert salt_versions(project, ("t",)) == ("",)


# -- the order of lookups -----------------------------------------------------------------


@dataclass
class Source:
    """A StageSource answering from a dict, noting every key it is asked."""

    answers: dict[str, StageRecord]
    asked: list[str] = field(default_factory=list)

    def offer(self, key: str) -> StageRecord | None:
        self.asked.append(key)
        return self.answers.get(key)


def test_sources_are_asked_only_after_the_store_misses(tmp_path: Path) -> None:
    store = Store(tmp_path / "s").ensure()
    cache = StageCache(store)
    own = put_layer(store, files_tar({"own": b"1"}))
    cache.save(_record(own, KEY))
    theirs = put_layer(store, files_tar({"theirs": b"2"}))
    origin = Origin("r:1", "cache", "sha256:" + "5" * 64)
    offered = StageRecord(OTHER, "web", "site", {}, theirs, "", "", origin)
    source = Source({OTHER: offered})
    assert cache.lookup(KEY, [source]).layer == own  # type: ignore[union-attr]
    assert source.asked == []
    assert cache.lookup(OTHER, [source]) == offered
    assert source.asked == [OTHER]
    # Not proven (no origin), for another key, or without its blob: not reused.
    unproven = StageRecord(OTHER, "web", "site", {}, theirs, "", "")
    missing = Layer(Descriptor(oci.MT_LAYER_GZIP, "sha256:" + "6" * 64, 1), "sha256:" + "7" * 64)
    for bad in (
        unproven,
        StageRecord("ef" * 32, "web", "site", {}, theirs, "", "", origin),
        StageRecord(OTHER, "web", "site", {}, missing, "", "", origin),
    ):
        assert cache.lookup(OTHER, [Source({OTHER: bad})]) is None


# -- a cache source on loopback -----------------------------------------------------------


@dataclass
class Registry:
    """What the loopback registry serves (per repository path) and what it was asked."""

    manifests: dict[tuple[str, str], bytes] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)
    lies: set[str] = field(default_factory=set)  # blob digests answered with other bytes
    requests: list[tuple[str, str]] = field(default_factory=list)

    def blob(self, data: bytes) -> str:
        digest = oci.sha256_digest(data)
        self.blobs[digest] = data
        return digest

    def publish(self, repo: str, tag: str, config: bytes, media: str, layers: list[Layer]) -> str:
        """Serve a manifest of `config` (of `media` type) and `layers` as repo:tag."""
        desc = Descriptor(media, self.blob(config), len(config))
        data = oci.canonical_json(manifest(desc, [la.blob for la in layers]))
        self.manifests[(repo, tag)] = data
        return oci.sha256_digest(data)

    def stage(self, repo: str, rec: StageRecord, blob: bytes) -> str:
        """Serve stage `rec` (its layer blob `blob`) under its tag; the manifest digest."""
        self.blob(blob)
        config = oci.canonical_json(stage_config(rec, "amd64"))
        return self.publish(repo, stage_tag(rec.key), config, oci.MT_CONFIG, [rec.layer])


class Handler(BaseHTTPRequestHandler):
    registry: Registry
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes = b"{}", ctype: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", ctype)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_GET(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        self.registry.requests.append((self.command, path))
        if path == "/v2/":
            return self._answer(200)
        repo, _, ref = path.removeprefix("/v2/").partition("/manifests/")
        if ref:
            data = self.registry.manifests.get((repo, ref))
            return self._answer(200, data, oci.MT_MANIFEST) if data else self._answer(404)
        _repo, _, digest = path.removeprefix("/v2/").partition("/blobs/")
        data = self.registry.blobs.get(digest)
        if data is None:
            return self._answer(404)
        return self._answer(200, b"x" * len(data) if digest in self.registry.lies else data)

    do_HEAD = do_GET


@pytest.fixture
def served() -> Iterator[tuple[str, Registry]]:
    """A registry on 127.0.0.1:<free port>: its address and what it serves."""
    state = Registry()
    handler = type("Bound", (Handler,), {"registry": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _layer(files: dict[str, bytes]) -> tuple[Layer, bytes]:
    blob, diff_id = layer_blob(files_tar(files))
    return Layer(Descriptor(oci.MT_LAYER_GZIP, oci.sha256_digest(blob), len(blob)), diff_id), blob


def _source(tmp_path: Path, address: str, ref: str = "cache") -> RegistryCache:
    store = Store(tmp_path / "b").ensure()
    return RegistryCache(store, Reference.parse(f"{address}/{ref}"), FAST).open()


def _fetched(state: Registry) -> list[str]:
    return [p.rpartition("/")[2] for m, p in state.requests if m == "GET" and "/blobs/" in p]


def test_a_stage_is_looked_up_by_key_and_only_its_blobs_are_fetched(
    served: tuple[str, Registry], tmp_path: Path
) -> None:
    address, state = served
    layer, blob = _layer({"srv/site": b"site"})
    digest = state.stage("cache", _record(layer), blob)
    _unused, unused_blob = _layer({"srv/other": b"never fetched"})
    state.blob(unused_blob)
    source = _source(tmp_path, address)
    assert source.image_offers == {}  # cache:latest is no image: stage tags only
    assert _fetched(state) == []
    assert source.offer(OTHER) is None
    assert source.offer(OTHER) is None  # asked again (a build's second look): no request
    assert state.requests.count(("GET", f"/v2/cache/manifests/{stage_tag(OTHER)}")) == 1
    found = source.offer(KEY)
    assert found is not None
    assert (found.key, found.layer, found.origin) == (
        KEY,
        layer,
        Origin(address, "cache", digest),
    )
    assert source.store.has_blob(layer.blob.digest)
    assert oci.sha256_digest(unused_blob) not in _fetched(state)
    assert StageCache(source.store).lookup(KEY, [source]) == found


def test_a_stage_layer_may_be_larger_than_a_config(
    served: tuple[str, Registry], tmp_path: Path
) -> None:
    address, state = served
    plain = files_tar({"srv/big": noise(9 << 20)})  # configs are capped at 8 MiB, layers not
    layer = Layer(
        Descriptor(oci.MT_LAYER, oci.sha256_digest(plain), len(plain)), oci.sha256_digest(plain)
    )
    state.stage("cache", _record(layer), plain)
    found = _source(tmp_path, address).offer(KEY)
    assert found is not None and found.layer == layer


def test_an_image_named_as_a_source_offers_its_stages_layer_by_layer(
    served: tuple[str, Registry], tmp_path: Path
) -> None:
    address, state = served
    low, low_blob = _layer({"etc/os": b"base"})
    top, top_blob = _layer({"srv/site": b"site"})
    state.blob(low_blob)
    state.blob(top_blob)
    config = {
        "architecture": "amd64",
        "os": "linux",
        "config": {"Labels": {"io.sysbake.image": "web", "io.sysbake.stage.site": KEY}},
        "rootfs": {"type": "layers", "diff_ids": [low.diff_id, top.diff_id]},
        "history": [
            {"created": "2026-01-01T00:00:00Z", "created_by": "base"},
            {"created": "2026-01-02T00:00:00Z", "comment": f"sysbake site {KEY[:16]}"},
        ],
    }
    digest = state.publish("web", "1", oci.canonical_json(config), oci.MT_CONFIG, [low, top])
    source = _source(tmp_path, address, "web:1")
    assert list(source.image_offers) == [KEY]
    found = source.offer(KEY)
    assert found is not None and found.layer == top
    assert found.origin == Origin(address, "web", digest)
    assert _fetched(state)[-1] == top.blob.digest
    assert low.blob.digest not in _fetched(state)  # the rest of the image never travels


def test_a_layer_the_check_refuses_costs_one_warning_and_that_stage(
    served: tuple[str, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = served
    plain = crafted_tar(("../escape", tarfile.REGTYPE, {"data": b"x"}))
    blob, diff_id = layer_blob(plain)
    evil = Layer(Descriptor(oci.MT_LAYER_GZIP, oci.sha256_digest(blob), len(blob)), diff_id)
    state.stage("cache", _record(evil), blob)
    # A layer whose content is not its diff ID is refused the same way.
    good, good_blob = _layer({"srv/ok": b"ok"})
    liar = Layer(good.blob, "sha256:" + "9" * 64)
    state.stage("cache", _record(liar, OTHER), good_blob)
    fine, fine_blob = _layer({"srv/fine": b"fine"})
    state.stage("cache", _record(fine, "ef" * 32), fine_blob)
    source = _source(tmp_path, address)
    assert source.offer(KEY) is None
    assert source.offer(KEY) is None
    assert source.offer(OTHER) is None
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, err
    assert f"stage {KEY[:16]}: layer {evil.blob.digest}" in warnings[-2] and "'..'" in warnings[-2]
    assert "hashes to" in warnings[-1] and "refused, building it" in warnings[-1]
    assert not source.store.has_blob(evil.blob.digest)  # not kept, not found "present" later
    assert not source.store.has_blob(good.blob.digest)
    assert not (tmp_path / "escape").exists() and not (tmp_path / "b" / "escape").exists()
    # The source is still asked for the other stages.
    assert source.offer("ef" * 32) is not None


def test_a_registry_that_lies_about_a_blob_is_given_up(
    served: tuple[str, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = served
    layer, blob = _layer({"srv/site": b"site"})
    state.stage("cache", _record(layer), blob)
    state.lies.add(layer.blob.digest)
    source = _source(tmp_path, address)
    assert source.offer(KEY) is None
    err = capsys.readouterr().err
    assert "digest mismatch" in err and "building without it" in err
    asked = len(state.requests)
    assert source.offer(OTHER) is None and len(state.requests) == asked
    assert not source.store.has_blob(layer.blob.digest)


def test_a_stage_tag_that_proves_another_key_is_not_reused(
    served: tuple[str, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = served
    layer, blob = _layer({"srv/site": b"site"})
    state.blob(blob)
    config = oci.canonical_json(stage_config(_record(layer, OTHER), "amd64"))
    state.publish("cache", stage_tag(KEY), config, oci.MT_CONFIG, [layer])
    source = _source(tmp_path, address)
    assert source.offer(KEY) is None
    assert f"do not prove stage {KEY}" in capsys.readouterr().err
    assert layer.blob.digest not in _fetched(state)


# -- the Salt toolchain -------------------------------------------------------------------


def _toolchain_files(**meta: object) -> dict[str, bytes]:
    """The files of a (fake) toolchain for this host's default Salt version."""
    doc = {
        "key": salt.toolchain_key(""),
        "version": salt.DEFAULT_SALT_VERSION,
        "suite": salt._identity("", "")["suite"],
        "architecture": salt._identity("", "")["architecture"],
        "python": "usr/bin/python3",
        "loader": "lib/ld.so",
        "library_path": ["lib"],
        **meta,
    }
    return {
        salt.META: json.dumps(doc).encode(),
        salt.PYTHON_WRAPPER: b"#!/bin/sh\n",
        "usr/bin/python3": b"python",
        "lib/ld.so": b"loader",
    }


@pytest.mark.parametrize(
    ("meta", "problem"),
    [
        ({"key": "0" * 64}, "names key"),
        ({"python": "/usr/bin/python3"}, "is not a path inside it"),
        ({"loader": "../../lib/ld.so"}, "is not a path inside it"),
        ({"library_path": ["/lib"]}, "is not a path inside it"),
        ({"library_path": []}, "names no library_path"),
        ({"python": "usr/bin/python9"}, "is missing from it"),
    ],
)
def test_a_fetched_toolchain_must_be_the_one_this_host_computes(
    tmp_path: Path, meta: dict[str, object], problem: str
) -> None:
    store = Store(tmp_path / "s").ensure()
    layer = put_layer(store, files_tar(_toolchain_files(**meta)))
    with pytest.raises(BuildError, match=problem):
        salt.adopt_layer(store, layer, "r:1/cache@sha256:x")
    assert salt.installed(store) is None
    assert list((store.root / "toolchains").iterdir()) == [
        store.root
        / "toolchains"
        / f".salt-{salt.DEFAULT_SALT_VERSION}-{salt.toolchain_key('')[:12]}.lock"
    ]


def test_a_toolchain_whose_metadata_links_out_is_refused(tmp_path: Path) -> None:
    files = _toolchain_files()
    del files[salt.META]
    plain = crafted_tar(
        *((n, tarfile.REGTYPE, {"data": d}) for n, d in sorted(files.items())),
        (salt.META, tarfile.SYMTYPE, {"linkname": "/etc/os-release"}),
    )
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(BuildError, match="no readable"):
        salt.adopt_layer(store, put_layer(store, plain), "r:1/cache@sha256:x")
    assert salt.installed(store) is None


@pytest.mark.parametrize(
    "entry",
    [
        ("../escape", tarfile.REGTYPE, {"data": b"x"}),
        ("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0}),
        ("dev/null", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 3}),  # no devices at all
    ],
)
def test_a_toolchain_layer_goes_through_the_layer_check(
    tmp_path: Path, entry: tuple[str, bytes, dict[str, object]]
) -> None:
    files = _toolchain_files()
    plain = crafted_tar(*((n, tarfile.REGTYPE, {"data": d}) for n, d in files.items()), entry)
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(LayerError, match="toolchain layer"):
        salt.adopt_layer(store, put_layer(store, plain), "r:1/cache@sha256:x")
    assert salt.installed(store) is None
    assert not (tmp_path / "escape").exists()


def test_a_toolchain_travels_as_an_artifact(served: tuple[str, Registry], tmp_path: Path) -> None:
    address, state = served
    layer, blob = _layer(_toolchain_files())
    state.blob(blob)
    config = {"key": salt.toolchain_key(""), "diff_id": layer.diff_id}
    tag = toolchain_tag(salt.toolchain_key(""))
    digest = state.publish("cache", tag, oci.canonical_json(config), MT_TOOLCHAIN, [layer])
    source = _source(tmp_path, address)
    found = source.toolchain("")
    assert found is not None
    toolchain, origin = found
    assert origin == Origin(address, "cache", digest)
    assert salt.installed(source.store) == toolchain
    assert salt.origin_of(source.store, toolchain) == str(origin)
    assert (toolchain.path / "usr/bin/python3").read_bytes() == b"python"
    assert not source.store.has_blob(layer.blob.digest)  # unpacked: not kept twice
    # Present now: asked again, it is neither fetched nor unpacked again.
    assert salt.adopt_layer(source.store, layer, "elsewhere") == toolchain
    assert salt.origin_of(source.store, toolchain) == str(origin)


def test_an_artifact_of_another_kind_is_not_a_toolchain(
    served: tuple[str, Registry], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = served
    layer, blob = _layer(_toolchain_files())
    state.blob(blob)
    config = oci.canonical_json({"key": salt.toolchain_key(""), "diff_id": layer.diff_id})
    state.publish("cache", toolchain_tag(salt.toolchain_key("")), config, oci.MT_CONFIG, [layer])
    source = _source(tmp_path, address)
    assert source.toolchain("") is None
    assert "not a sysbake toolchain artifact" in capsys.readouterr().err
    assert salt.installed(source.store) is None


# -- when a build pushes ------------------------------------------------------------------


def test_a_build_pushes_what_finished_unless_interrupted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sysbake.build.context import StageResult
    from sysbake.errors import Interrupted

    store = Store(tmp_path / "s").ensure()
    cache = BuildCache(store, (), Reference.parse("127.0.0.1:1/cache"), FAST)
    pushes: list[int] = []
    monkeypatch.setattr(cache, "push", lambda project: pushes.append(len(cache.stages)))
    heard: list[StageResult] = []
    report = cache.listen(heard.append)
    layer, _blob = _layer({"a": b"1"})
    report(StageResult("web", "system", KEY, False, "new", layer, 0.1))
    project = load_project(_project(tmp_path, ""))
    with cache.pushing(project):
        pass
    with pytest.raises(BuildError), cache.pushing(project):
        raise BuildError("web: site: salt failed")
    for stop in (Interrupted("interrupted"), KeyboardInterrupt()):
        with pytest.raises(type(stop)), cache.pushing(project):
            raise stop
    assert pushes == [1, 1]  # after the build, and after the failed one: not when stopped
    assert [r.stage for r in heard] == ["system"]
    # Without a cache repository, nothing is pushed (and nothing is asked of a registry).
    assert BuildCache(store, (), None, FAST).push(project) is None
