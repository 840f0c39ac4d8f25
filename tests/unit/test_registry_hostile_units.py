"""Registries that attack the client, served from loopback by the tests themselves (root-free):
a registry that drips bytes or says nothing, blobs and manifests declaring sizes no disk
holds, a token realm on another host over plain http that must not get the user's
password, image names that climb paths; and the stage cache, which trusts only the cache
sources a build names."""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sysbake.build.cache import Origin, StageCache, StageRecord, stage_key
from sysbake.build.context import BuildContext, BuildOptions, Stage, StageResult
from sysbake.build.pipeline import PartialImage, run_stage
from sysbake.commands.build import _cache_sources
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.reference import InvalidReference
from sysbake.oci.store import Store
from sysbake.project.specs import Project
from sysbake.registry.auth import Credentials, RegistryError
from sysbake.registry.client import Session
from sysbake.registry.transfer import ConnectOptions, Limits, Reference, cache_source, pull, push
from tests.unit.conftest import files_tar, layer_blob, noise, put_image, put_layer

# Fast limits: a window of half a second, at least 1 KiB/s (512 bytes a window).
FAST = Limits(min_rate=1.0, window=0.5)
DRIP_PAUSE = 0.05  # 20 bytes/s: far below the minimum


@dataclass
class Hostile:
    """What the hostile registry serves, how it misbehaves, and what it was asked."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)
    declared: dict[str, int] = field(default_factory=dict)  # Content-Length lies
    drip: set[str] = field(default_factory=set)  # paths whose answers drip, headers first
    drip_body: set[str] = field(default_factory=set)  # paths whose bodies drip
    silent: set[str] = field(default_factory=set)  # paths never answered
    slow_upload: bool = False  # take uploaded bodies at 2 KB/s
    realm: str | None = None  # a Bearer challenge pointing there
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)


class HostileHandler(BaseHTTPRequestHandler):
    hostile: Hostile
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.hostile.stop.is_set():
                return
            self.wfile.write(data[i : i + 1])
            self.wfile.flush()
            time.sleep(DRIP_PAUSE)

    def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        path = urllib.parse.urlsplit(self.path).path
        length = self.hostile.declared.get(path, len(body))
        head = f"HTTP/1.1 {status} X\r\nContent-Length: {length}\r\n"
        head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
        if path in self.hostile.drip:
            return self._drip(head.encode() + body)
        self.wfile.write(head.encode())
        if self.command == "HEAD":
            return None
        if path in self.hostile.drip_body:
            return self._drip(body)
        self.wfile.write(body)
        return None

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        self.hostile.requests.append((self.command, url.path, self.headers.get("Authorization")))
        if url.path in self.hostile.silent:
            self.hostile.stop.wait(30)
            self.close_connection = True
            return None
        if self.hostile.realm and not (self.headers.get("Authorization") or "").startswith(
            "Bearer "
        ):
            return self._answer(
                401, b"{}", {"WWW-Authenticate": f'Bearer realm="{self.hostile.realm}",service="h"'}
            )
        if url.path == "/v2/":
            return self._answer(200, b"{}", {})
        name, _, ref = url.path.removeprefix("/v2/").partition("/manifests/")
        if ref:
            data = self.hostile.manifests.get(ref)
            if data is None:
                return self._answer(404, b"{}", {})
            return self._answer(200, data, {"Content-Type": oci.MT_MANIFEST})
        name, _, rest = url.path.removeprefix("/v2/").partition("/blobs/")
        if rest.startswith("uploads/"):
            return self._upload(name, rest)
        if rest in self.hostile.blobs:
            return self._answer(200, self.hostile.blobs[rest], {})
        return self._answer(404, b"{}", {})

    def _upload(self, name: str, rest: str) -> None:
        if self.command == "POST":
            return self._answer(202, b"", {"Location": f"/v2/{name}/blobs/uploads/u1"})
        left = int(self.headers.get("Content-Length") or 0)
        while left > 0 and not self.hostile.stop.is_set():
            chunk = self.rfile.read(min(100, left))
            if not chunk:
                break
            left -= len(chunk)
            if self.hostile.slow_upload:
                time.sleep(DRIP_PAUSE)
        return self._answer(201, b"", {})

    do_GET = do_HEAD = do_POST = do_PUT = _route


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up on a dripping answer: expected, not worth a traceback


@contextmanager
def serve(handler: type[BaseHTTPRequestHandler], host: str = "127.0.0.1") -> Iterator[str]:
    """Run `handler` on host:<free port>; yields 'host:port'."""
    server = QuietServer((host, 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"{host}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def hostile() -> Iterator[tuple[str, Hostile]]:
    state = Hostile()
    handler = type("Bound", (HostileHandler,), {"hostile": state})
    with serve(handler) as address:
        try:
            yield address, state
        finally:
            state.stop.set()


def _layer(payload: bytes) -> tuple[bytes, str]:
    """A gzip layer holding one file; (blob bytes, diff_id)."""
    return layer_blob(files_tar({"etc/payload": payload}))


def _publish(
    state: Hostile,
    tag: str,
    layers: list[tuple[bytes, str]],
    *,
    sizes: list[int] | None = None,
    labels: dict[str, str] | None = None,
    history: list[dict[str, Any]] | None = None,
    config_size: int | None = None,
) -> dict[str, Any]:
    """Serve an image under `tag`; `sizes` and `config_size` override declared sizes."""
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Labels": labels or {}},
            "rootfs": {"type": "layers", "diff_ids": [d for _, d in layers]},
            "history": history or [{"created": "2026-01-01T00:00:00Z"} for _ in layers],
        }
    ).encode()
    state.blobs[oci.sha256_digest(config)] = config
    descs = []
    for i, (blob, _) in enumerate(layers):
        state.blobs[oci.sha256_digest(blob)] = blob
        descs.append(
            {
                "mediaType": oci.MT_LAYER_GZIP,
                "digest": oci.sha256_digest(blob),
                "size": sizes[i] if sizes else len(blob),
            }
        )
    manifest = {
        "schemaVersion": 2,
        "mediaType": oci.MT_MANIFEST,
        "config": {
            "mediaType": oci.MT_CONFIG,
            "digest": oci.sha256_digest(config),
            "size": config_size if config_size is not None else len(config),
        },
        "layers": descs,
    }
    data = json.dumps(manifest).encode()
    state.manifests[tag] = data
    state.manifests[oci.sha256_digest(data)] = data
    return manifest


def _assert_untouched(store: Store) -> None:
    """Nothing tagged, no layer blob, no temp file, no stage record."""
    assert store.tags() == []
    assert [p.name for p in store.tmp_dir.iterdir()] == []
    for blob in store.blobs_dir.iterdir():
        assert blob.stat().st_size < 64 << 10  # a manifest or config, never a layer
    assert not (store.cache_dir / "stages").exists()


def _blob_requests(state: Hostile) -> list[str]:
    return [
        path for method, path, _ in state.requests if "/blobs/sha256:" in path and method == "GET"
    ]


# -- transfers that never end -------------------------------------------------------------------


def test_a_dripping_blob_is_dropped(hostile: tuple[str, Hostile], tmp_path: Path) -> None:
    address, state = hostile
    blob, diff_id = _layer(os.urandom(300))  # dripped whole in ~20 s: a test that can fail
    _publish(state, "latest", [(blob, diff_id)])
    digest = oci.sha256_digest(blob)
    state.drip_body.add(f"/v2/x/blobs/{digest}")
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(RegistryError) as err:
        pull(store, Reference.parse(f"{address}/x"), ConnectOptions(limits=FAST))
    message = str(err.value)
    assert message.startswith(f"pull {address}/x:latest: blob {digest}: the registry sent ")
    assert message.endswith(" bytes in 0.5 s (less than the minimum of 1 KiB/s): dropped")
    sent = int(message.split("the registry sent ")[1].split(" ")[0])
    assert sent < 512
    _assert_untouched(store)


def test_dripping_headers_and_a_silent_registry_are_dropped(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    blob, diff_id = _layer(b"x")
    _publish(state, "latest", [(blob, diff_id)])
    _publish(state, "quiet", [(blob, diff_id)])
    state.drip.add("/v2/x/manifests/latest")
    state.silent.add("/v2/x/manifests/quiet")
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(
        RegistryError,
        match=r"GET http://127\.0\.0\.1:\d+/v2/x/manifests/latest: "
        r"the registry sent \d+ bytes in 0\.5 s \(less than the minimum of "
        r"1 KiB/s\): dropped",
    ):
        pull(store, Reference.parse(f"{address}/x"), ConnectOptions(limits=FAST))
    # Even with no minimum rate, a whole window without a byte ends the transfer.
    idle = Limits(min_rate=0.0, window=0.5)
    with pytest.raises(
        RegistryError,
        match=r"manifests/quiet: the registry sent 0 bytes in "
        r"0\.5 s",
    ):
        pull(store, Reference.parse(f"{address}/x:quiet"), ConnectOptions(limits=idle))
    _assert_untouched(store)


def test_a_registry_that_takes_an_upload_slowly_is_dropped(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    state.slow_upload = True
    store = Store(tmp_path / "s").ensure()
    # Incompressible and larger than what the loopback socket buffers absorb.
    put_image(store, put_layer(store, noise(24 << 20), compressed=False), ref="big:1")
    with pytest.raises(
        RegistryError,
        match=r"PUT http://.*: the registry accepted .*0\.5 s"
        r".*: dropped",
    ):
        push(store, "big:1", Reference.parse(f"{address}/big:1"), ConnectOptions(limits=FAST))
    assert not any(p.startswith("/v2/big/manifests") for _, p, _ in state.requests)


def test_limits_come_from_the_environment() -> None:
    assert Limits.from_env({}) == Limits(1.0, 30.0)
    assert Limits.from_env(
        {"SYSBAKE_REGISTRY_MIN_RATE": "0.5", "SYSBAKE_REGISTRY_WINDOW": "2"}
    ) == Limits(0.5, 2.0)
    with pytest.raises(
        RegistryError,
        match=r"\$SYSBAKE_REGISTRY_WINDOW='0': expected a "
        r"number of at least 0\.1",
    ):
        Limits.from_env({"SYSBAKE_REGISTRY_WINDOW": "0"})
    with pytest.raises(RegistryError, match="SYSBAKE_REGISTRY_MIN_RATE"):
        Limits.from_env({"SYSBAKE_REGISTRY_MIN_RATE": "fast"})


# -- sizes no disk can hold ---------------------------------------------------------------------


def test_a_huge_declared_blob_is_refused_before_download(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    small, small_id = _layer(b"small")
    huge, huge_id = _layer(b"huge")
    _publish(state, "latest", [(small, small_id), (huge, huge_id)], sizes=[len(small), 1 << 62])
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(
        RegistryError,
        match=rf"pull {address}/x:latest: blob "
        rf"{oci.sha256_digest(huge)} declares {1 << 62} bytes, more than the "
        rf"\d+ bytes free in {store.root}: refused",
    ):
        pull(store, Reference.parse(f"{address}/x"), ConnectOptions(limits=FAST))
    assert _blob_requests(state) == []  # not even the config was fetched
    _assert_untouched(store)


def test_blobs_too_big_together_are_refused_before_download(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    store = Store(tmp_path / "s").ensure()
    st = os.statvfs(store.tmp_dir)
    part = st.f_bavail * st.f_frsize * 6 // 10  # each fits, both do not
    a, a_id = _layer(b"a")
    b, b_id = _layer(b"b")
    _publish(state, "latest", [(a, a_id), (b, b_id)], sizes=[part, part])
    with pytest.raises(
        RegistryError,
        match=r"the image's blobs declare \d+ bytes, more than "
        r"the \d+ bytes free in .*: refused",
    ):
        pull(store, Reference.parse(f"{address}/x"), ConnectOptions(limits=FAST))
    assert _blob_requests(state) == []
    _assert_untouched(store)


def test_huge_configs_and_manifests_are_refused(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    blob, diff_id = _layer(b"x")
    _publish(state, "config", [(blob, diff_id)], config_size=1 << 30)
    store = Store(tmp_path / "s").ensure()
    with pytest.raises(
        RegistryError,
        match=r"config sha256:[0-9a-f]{64} declares 1073741824 "
        r"bytes \(at most 8388608 are accepted\): refused",
    ):
        pull(store, Reference.parse(f"{address}/x:config"), ConnectOptions(limits=FAST))
    assert _blob_requests(state) == []
    # A manifest whose Content-Length is absurd is not read at all.
    _publish(state, "big", [(blob, diff_id)])
    state.declared["/v2/x/manifests/big"] = 1 << 40
    with pytest.raises(
        RegistryError,
        match=r"declares a manifest of 1099511627776 bytes "
        r"\(at most 4194304 are accepted\): refused",
    ):
        pull(store, Reference.parse(f"{address}/x:big"), ConnectOptions(limits=FAST))
    # An index entry declaring a huge manifest is refused before that manifest is fetched.
    index = {
        "schemaVersion": 2,
        "mediaType": oci.MT_INDEX,
        "manifests": [
            {
                "mediaType": oci.MT_MANIFEST,
                "digest": "sha256:" + "7" * 64,
                "size": 1 << 40,
                "platform": {"os": "linux", "architecture": "amd64"},
            }
        ],
    }
    state.manifests["multi"] = json.dumps(index).encode()
    with pytest.raises(RegistryError, match=r"the index declares a manifest of 1099511627776"):
        pull(
            store,
            Reference.parse(f"{address}/x:multi"),
            ConnectOptions(limits=FAST),
            wanted=("linux", "amd64", None),
        )
    assert not any(("7" * 64) in path for _, path, _ in state.requests)
    _assert_untouched(store)


# -- credentials and token realms ---------------------------------------------------------------


@dataclass
class Realm:
    """A token service: records the Authorization header of every request."""

    seen: list[str | None] = field(default_factory=list)
    anonymous_ok: bool = True


def _realm_handler(realm: Realm) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            realm.seen.append(self.headers.get("Authorization"))
            if not realm.anonymous_ok and self.headers.get("Authorization") is None:
                body = b'{"errors":[{"code":"UNAUTHORIZED"}]}'
                self.send_response(401)
            else:
                body = json.dumps({"token": "t"}).encode()
                self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def test_basic_credentials_are_withheld_from_a_plain_http_realm_elsewhere(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    blob, diff_id = _layer(b"x")
    _publish(state, "latest", [(blob, diff_id)])
    realm = Realm()
    creds = ConnectOptions(creds=Credentials("ann", "secret"), limits=FAST)
    # 127.0.0.2 is loopback too, but another host than the registry's 127.0.0.1.
    with serve(_realm_handler(realm), host="127.0.0.2") as realm_address:
        state.realm = f"http://{realm_address}/token"
        store = Store(tmp_path / "s").ensure()
        pull(store, Reference.parse(f"{address}/x"), creds)
        assert realm.seen and all(header is None for header in realm.seen)
        # Refused anonymously: the error says the credentials were withheld, and why.
        realm.anonymous_ok, realm.seen = False, []
        with pytest.raises(
            RegistryError,
            match=rf"the token service http://{realm_address}"
            r"/token refused an anonymous request; the credentials for "
            rf"{address} were withheld because that realm is on another host "
            r"over plain http",
        ):
            pull(store, Reference.parse(f"{address}/x"), creds, tag="again:1")
        assert realm.seen == [None]
    # The same realm on the registry's own host (another port) gets them.
    realm = Realm()
    with serve(_realm_handler(realm)) as realm_address:
        state.realm = f"http://{realm_address}/token"
        pull(Store(tmp_path / "t").ensure(), Reference.parse(f"{address}/x"), creds)
    basic = "Basic " + base64.b64encode(b"ann:secret").decode()
    assert realm.seen and all(header == basic for header in realm.seen)
    # None of them ever went to the registry itself.
    assert all(auth is None or auth.startswith("Bearer ") for _, _, auth in state.requests)


def test_realms_that_may_see_credentials() -> None:
    session = Session("reg.example:5000")
    assert session._may_see_creds("https://auth.elsewhere/token")
    assert session._may_see_creds("http://reg.example:5001/token")
    assert session._may_see_creds("http://REG.example/token")
    assert not session._may_see_creds("http://auth.elsewhere/token")
    assert not session._may_see_creds("http://reg.example.evil/token")
    assert Session("[::1]:5000")._may_see_creds("http://[::1]:6000/t")


# -- names that climb -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "../x",
        "127.0.0.1:5000/../x",
        "127.0.0.1:5000/a/../b",
        "127.0.0.1:5000/a/..",
        "..:5000/x",
        "reg.example/./x",
        "reg..example/x",
        f"127.0.0.1:5000/../x@sha256:{'1' * 64}",
    ],
)
def test_names_with_dot_dot_are_refused(text: str) -> None:
    with pytest.raises(
        InvalidReference,
        match=r"the image name has a path component '[^']*': "
        r"'\.\.', '\.' and empty components are not "
        "allowed",
    ):
        Reference.parse(text)


def test_the_cli_refuses_a_climbing_name_in_one_line(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sysbake.cli",
            "--store",
            str(tmp_path / "s"),
            "pull",
            "127.0.0.1:9/a/../../etc",
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        "sysbake: error: '127.0.0.1:9/a/../../etc': the image name has a path component "
        "'..': '..', '.' and empty components are not allowed"
    ]


# -- the stage cache trusts only named sources ----------------------------------------------------


def _sysbake_image(state: Hostile, tag: str, key: str, payload: bytes) -> tuple[bytes, str]:
    """Publish an image whose one layer claims to be stage `bootstrap` of key `key`."""
    blob, diff_id = _layer(payload)
    _publish(
        state,
        tag,
        [(blob, diff_id)],
        labels={"io.sysbake.image": "base", "io.sysbake.stage.bootstrap": key},
        history=[
            {
                "created": "2026-01-01T00:00:00Z",
                "created_by": "sysbake bootstrap",
                "comment": f"sysbake bootstrap {key[:16]}",
            }
        ],
    )
    return blob, diff_id


INPUTS = {"stage": "bootstrap", "bootstrap": {"suite": "bookworm"}}


def _run_bootstrap(
    store: Store, options: BuildOptions, produce: Callable[[], Layer]
) -> StageResult:
    results: list[StageResult] = []
    project = Project(path=store.root / "sysbake.toml", root=store.root, name="t", images=())
    ctx = BuildContext(
        project=project,
        store=store,
        cache=StageCache(store),
        options=options,
        report=results.append,
    )
    image = run_stage(
        ctx, PartialImage("base", "amd64"), Stage("bootstrap", dict(INPUTS), "test", produce)
    )
    assert image.results == tuple(results)
    return results[0]


def test_a_pull_never_feeds_the_cache_a_named_source_does(
    hostile: tuple[str, Hostile], tmp_path: Path
) -> None:
    address, state = hostile
    key = stage_key(INPUTS)
    blob, diff_id = _sysbake_image(state, "latest", key, b"planted by someone else")
    store = Store(tmp_path / "s").ensure()
    pull(store, Reference.parse(f"{address}/poison"), ConnectOptions(limits=FAST))
    assert StageCache(store).lookup(key) is None
    built = put_layer(store, b"ours", compressed=False)
    result = _run_bootstrap(store, BuildOptions(), lambda: built)
    assert (result.reused, result.layer, result.origin) == (False, built, "")

    # Named as a cache source: fetched untagged, offered to one build, with its origin.
    fresh = Store(tmp_path / "fresh").ensure()
    source = Reference.parse(f"{address}/cache:latest")
    offered = cache_source(fresh, source, ConnectOptions(limits=FAST))
    assert fresh.tags() == []
    assert not (fresh.cache_dir / "stages").exists()
    digest = oci.sha256_digest(state.manifests["latest"])
    origin = Origin(address, "cache", digest)
    assert [(r.key, r.layer.diff_id, r.layer.blob.digest, r.origin) for r in offered] == [
        (key, diff_id, oci.sha256_digest(blob), origin)
    ]

    def never() -> Layer:
        raise AssertionError("the offered stage should have been reused")

    result = _run_bootstrap(fresh, BuildOptions(cache_from=tuple(offered)), never)
    assert (result.reused, result.origin) == (True, f"{address}/cache@{digest}")
    saved = StageCache(fresh).lookup(key)
    assert saved is not None and saved.origin == origin and saved.image == "base"
    # An offer whose blob is not in the store, or without an origin, is not reused.
    other = Store(tmp_path / "other").ensure()
    made = put_layer(other, b"mine", compressed=False)
    assert (
        _run_bootstrap(other, BuildOptions(cache_from=tuple(offered)), lambda: made).reused is False
    )
    unnamed = StageRecord(key, "base", "bootstrap", {}, made, "", "")
    assert StageCache(other).lookup("0" * 64, [unnamed]) is None
    assert StageCache(Store(tmp_path / "o2").ensure()).lookup(key, [unnamed]) is None


def test_records_an_older_pull_seeded_are_not_reused(tmp_path: Path) -> None:
    store = Store(tmp_path / "s").ensure()
    key = stage_key(INPUTS)
    planted = put_layer(store, b"planted", compressed=False)
    StageCache(store).add(
        StageRecord(
            key,
            "base",
            "bootstrap",
            {"pulled": "127.0.0.1:5000/poison:latest"},
            planted,
            "2026-01-01T00:00:00Z",
            "pulled",
        )
    )
    assert StageCache(store).lookup(key) is None
    built = put_layer(store, b"ours", compressed=False)
    result = _run_bootstrap(store, BuildOptions(), lambda: built)
    assert (result.reused, result.layer) == (False, built)
    hit = StageCache(store).lookup(key)
    assert hit is not None and hit.layer == built and hit.origin is None
    assert hashlib.sha256(b"ours").hexdigest() in hit.layer.diff_id


def test_cache_from_fetches_named_sources_and_skips_unreachable_ones(
    hostile: tuple[str, Hostile], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    address, state = hostile
    key = stage_key(INPUTS)
    _sysbake_image(state, "latest", key, b"published by a trusted builder")
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: refused
        dead = f"127.0.0.1:{closed.getsockname()[1]}/cache:1"
        args = argparse.Namespace(
            cache_from=[dead, f"{address}/cache"],
            no_cache=False,
            creds=None,
            tls_verify=True,
            cert_dir=None,
            authfile=tmp_path / "auth.json",
            min_rate=None,
            rate_window=0.5,
        )
        store = Store(tmp_path / "s")
        offered = _cache_sources(store, args)
    # Sources are opened (the image's manifest and config read); layers come on a hit.
    assert [(r.key, str(r.origin)) for s in offered for r in s.image_offers.values()] == [
        (key, f"{address}/cache@{oci.sha256_digest(state.manifests['latest'])}")
    ]
    assert f"warning: --cache-from {dead}: cannot connect to " in capsys.readouterr().err
    assert store.tags() == []
    # A reference that does not parse is the user's typo: an error, not a warning.
    with pytest.raises(InvalidReference, match="path component"):
        _cache_sources(
            store, argparse.Namespace(**{**vars(args), "cache_from": ["127.0.0.1:1/../x"]})
        )
    assert _cache_sources(store, argparse.Namespace(**{**vars(args), "no_cache": True})) == ()
