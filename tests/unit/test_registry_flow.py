"""Push and pull against a small in-process registry on loopback (root-free): the Bearer
token flow, Docker schema2 and index manifests, and registries that lie or hang up. The
real registry (docker-registry) is exercised by tests/integration/test_registry.py."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from sysbake.oci import model as oci
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from sysbake.registry.auth import Credentials, RegistryError
from sysbake.registry.transfer import ConnectOptions, Reference, pull, push
from tests.unit.conftest import files_tar, put_image

TOKEN = "token-" + uuid.uuid4().hex


@dataclass
class State:
    """What the fake registry holds and how it misbehaves."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    manifests: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    bearer: bool = False
    user: tuple[str, str] = ("ann", "secret")
    scopes: list[list[str]] = field(default_factory=list)
    lie_about: str | None = None  # a blob digest served with other bytes
    drop_after: int | None = None  # blob bytes sent before hanging up
    uploads: int = 0


class Handler(BaseHTTPRequestHandler):
    state: State
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _authorized(self) -> bool:
        if not self.state.bearer or self.headers.get("Authorization") == f"Bearer {TOKEN}":
            return True
        realm = f"http://{self.headers['Host']}/token"
        self._send(
            401,
            b'{"errors":[{"code":"UNAUTHORIZED","message":"authenticate"}]}',
            {"WWW-Authenticate": f'Bearer realm="{realm}",service="fake"'},
        )
        return False

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        if url.path == "/token":
            user, password = self.state.user
            good = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
            if self.headers.get("Authorization") != good:
                return self._send(401)
            self.state.scopes.append(query.get("scope", []))
            return self._send(200, json.dumps({"token": TOKEN}).encode())
        if not self._authorized():
            return None
        if url.path == "/v2/":
            return self._send(200, b"{}")
        repo, _, rest = url.path.removeprefix("/v2/").partition("/blobs/")
        if rest:
            return self._blob(repo, rest, query, body)
        repo, _, ref = url.path.removeprefix("/v2/").partition("/manifests/")
        if self.command == "PUT":
            self.state.manifests[(repo, ref)] = (body, self.headers["Content-Type"])
            digest = oci.sha256_digest(body)
            self.state.manifests[(repo, digest)] = (body, self.headers["Content-Type"])
            return self._send(201, headers={"Docker-Content-Digest": digest})
        if (repo, ref) not in self.state.manifests:
            return self._send(404, b'{"errors":[{"code":"MANIFEST_UNKNOWN","message":"nope"}]}')
        data, media_type = self.state.manifests[(repo, ref)]
        return self._send(
            200,
            data,
            {"Content-Type": media_type, "Docker-Content-Digest": oci.sha256_digest(data)},
        )

    def _blob(self, repo: str, rest: str, query: dict[str, list[str]], body: bytes) -> None:
        if rest.startswith("uploads/"):
            if self.command == "POST":
                return self._send(202, headers={"Location": f"/v2/{repo}/blobs/{rest}u1"})
            digest = query["digest"][0]
            if oci.sha256_digest(body) != digest:
                return self._send(400, b'{"errors":[{"code":"DIGEST_INVALID"}]}')
            self.state.blobs[digest] = body
            self.state.uploads += 1
            return self._send(201)
        if rest not in self.state.blobs:
            return self._send(404)
        data = self.state.blobs[rest]
        if rest == self.state.lie_about:
            data = data[:-1] + bytes([data[-1] ^ 1])
        if self.state.drop_after is not None and self.command == "GET":
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: self.state.drop_after])
            self.wfile.flush()
            self.close_connection = True
            return None
        return self._send(200, data)

    do_GET = do_HEAD = do_POST = do_PUT = _route


@pytest.fixture
def registry() -> Iterator[tuple[str, State]]:
    state = State()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _image(store: Store, ref: str = "web:latest") -> Image:
    """A two-layer image with sysbake stage labels, tagged `ref`."""
    tars, history, labels = [], [], {"io.sysbake.image": "web"}
    for i, stage in enumerate(("bootstrap", "site")):
        tars.append(files_tar({f"etc/layer{i}": hashlib.sha256(str(i).encode()).digest() * 5000}))
        key = hashlib.sha256(stage.encode()).hexdigest()
        labels[f"io.sysbake.stage.{stage}"] = key
        history.append(
            {
                "created": "2026-01-01T00:00:00Z",
                "created_by": stage,
                "comment": f"sysbake {stage} {key[:16]}",
            }
        )
    return put_image(store, *tars, ref=ref, config={"Labels": labels}, history=history)


def _assert_untouched(store: Store, before: set[str]) -> None:
    """Nothing tagged, no new blob, no temp file left behind."""
    assert store.tags() == []
    assert {p.name for p in store.blobs_dir.iterdir()} == before
    assert [p.name for p in store.tmp_dir.iterdir()] == []


def test_bearer_push_then_pull_round_trip(registry: tuple[str, State], tmp_path: Path) -> None:
    address, state = registry
    state.bearer = True
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    image = _image(a)
    options = ConnectOptions(creds=Credentials("ann", "secret"))
    dest = Reference.parse(f"{address}/team/web:1")
    result = push(a, "web", dest, options)
    assert result.digest == image.manifest.digest
    assert (result.uploaded, result.present) == (3, 0)
    assert ["repository:team/web:pull,push"] in state.scopes
    again = push(a, "web", dest, options)
    assert (again.uploaded, again.present) == (0, 3)
    assert state.uploads == 3

    pulled = pull(b, dest, options)
    assert pulled.ref == f"{address}/team/web:1"
    assert pulled.image.id == image.id
    assert pulled.image.manifest.digest == pulled.digest == image.manifest.digest
    assert b.resolve(pulled.ref).layers == image.layers
    from sysbake.build.cache import StageCache

    # A pull never feeds the stage cache, whatever the image's labels say.
    assert not (b.cache_dir / "stages").exists()
    assert StageCache(b).lookup(hashlib.sha256(b"site").hexdigest()) is None
    second = pull(b, dest, options, tag="copy:1")
    assert (second.fetched, second.present) == (0, 3)


def test_bearer_wrong_or_missing_credentials(registry: tuple[str, State], tmp_path: Path) -> None:
    address, state = registry
    state.bearer = True
    store = Store(tmp_path / "s").ensure()
    _image(store)
    dest = Reference.parse(f"{address}/web:1")
    auth_file = tmp_path / "empty-auth.json"
    with pytest.raises(RegistryError, match="rejected the credentials of user 'ann'"):
        push(
            store,
            "web",
            dest,
            ConnectOptions(creds=Credentials("ann", "wrong"), auth_file=auth_file),
        )
    with pytest.raises(RegistryError, match=r"requires authentication.*sysbake login"):
        push(store, "web", dest, ConnectOptions(auth_file=auth_file))


def test_credentials_come_from_the_auth_file(registry: tuple[str, State], tmp_path: Path) -> None:
    address, state = registry
    state.bearer = True
    from sysbake.registry.auth import save_credentials

    auth_file = tmp_path / "auth.json"
    save_credentials(auth_file, address, Credentials("ann", "secret"))
    store = Store(tmp_path / "s").ensure()
    _image(store)
    push(store, "web", Reference.parse(f"{address}/web:1"), ConnectOptions(auth_file=auth_file))
    assert state.uploads == 3


def test_docker_schema2_and_index_pull(registry: tuple[str, State], tmp_path: Path) -> None:
    address, state = registry
    a, b = Store(tmp_path / "a").ensure(), Store(tmp_path / "b").ensure()
    image = _image(a)
    for layer in image.layers:
        with a.open_blob(layer.blob.digest) as f:
            state.blobs[layer.blob.digest] = f.read()
    with a.open_blob(image.id) as f:
        state.blobs[image.id] = f.read()
    docker = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_DOCKER_MANIFEST,
            "config": {
                "mediaType": oci.MT_DOCKER_CONFIG,
                "digest": image.id,
                "size": image.config_descriptor.size,
            },
            "layers": [
                {
                    "mediaType": oci.MT_DOCKER_LAYER_GZIP,
                    "digest": la.blob.digest,
                    "size": la.blob.size,
                }
                for la in image.layers
            ],
        },
        indent=3,
    ).encode()
    state.manifests[("web", oci.sha256_digest(docker))] = (docker, oci.MT_DOCKER_MANIFEST)
    index = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_DOCKER_LIST,
            "manifests": [
                {
                    "mediaType": oci.MT_DOCKER_MANIFEST,
                    "digest": "sha256:" + "9" * 64,
                    "size": 9,
                    "platform": {"os": "linux", "architecture": "s390x"},
                },
                {
                    "mediaType": oci.MT_DOCKER_MANIFEST,
                    "digest": oci.sha256_digest(docker),
                    "size": len(docker),
                    "platform": {"os": "linux", "architecture": "amd64"},
                },
            ],
        }
    ).encode()
    state.manifests[("web", "multi")] = (index, oci.MT_DOCKER_LIST)

    result = pull(
        b,
        Reference.parse(f"{address}/web:multi"),
        ConnectOptions(),
        wanted=("linux", "amd64", None),
    )
    assert result.image.id == image.id  # the config bytes are kept
    stored = b.read_json(result.image.manifest.digest)
    assert stored["mediaType"] == oci.MT_MANIFEST
    assert {la["mediaType"] for la in stored["layers"]} == {oci.MT_LAYER_GZIP}
    assert result.image.layers[0].compression == "gzip"
    with pytest.raises(RegistryError, match="no image for linux/arm64"):
        pull(
            b,
            Reference.parse(f"{address}/web:multi"),
            ConnectOptions(),
            wanted=("linux", "arm64", None),
        )


def test_unknown_tag_and_lying_registry(registry: tuple[str, State], tmp_path: Path) -> None:
    address, state = registry
    a = Store(tmp_path / "a").ensure()
    image = _image(a)
    push(a, "web", Reference.parse(f"{address}/web:1"), ConnectOptions())
    b = Store(tmp_path / "b").ensure()
    with pytest.raises(RegistryError, match=r"web:2 not found in the registry .*MANIFEST_UNKNOWN"):
        pull(b, Reference.parse(f"{address}/web:2"), ConnectOptions())
    _assert_untouched(b, set())
    state.lie_about = image.layers[1].blob.digest
    with pytest.raises(RegistryError, match="digest mismatch"):
        pull(b, Reference.parse(f"{address}/web:1"), ConnectOptions())
    assert not b.has_blob(image.layers[1].blob.digest)
    assert b.tags() == [] and list(b.tmp_dir.iterdir()) == []
    # A manifest pinned by digest that the registry does not serve is refused too.
    pinned = Reference.parse(f"{address}/web@sha256:{'0' * 64}")
    with pytest.raises(RegistryError, match="not found"):
        pull(b, pinned, ConnectOptions())


def test_connection_dropped_mid_blob(
    registry: tuple[str, State], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, state = registry
    # Not tried again (a download resumes: tests/unit/test_registry_network_units.py).
    monkeypatch.setenv("SYSBAKE_REGISTRY_RETRIES", "0")
    a = Store(tmp_path / "a").ensure()
    _image(a)
    push(a, "web", Reference.parse(f"{address}/web:1"), ConnectOptions())
    state.drop_after = 100
    b = Store(tmp_path / "b").ensure()
    with pytest.raises(RegistryError, match="dropped while pulling blob"):
        pull(b, Reference.parse(f"{address}/web:1"), ConnectOptions())
    _assert_untouched(b, set())


def test_connection_refused(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        store = Store(tmp_path / "s").ensure()
        with pytest.raises(
            RegistryError, match=f"cannot connect to 127.0.0.1:{port}: connection refused"
        ):
            pull(store, Reference.parse(f"127.0.0.1:{port}/web:1"), ConnectOptions())
    _assert_untouched(store, set())


def test_push_needs_a_registry_in_the_name(tmp_path: Path) -> None:
    store = Store(tmp_path / "s").ensure()
    _image(store)
    with pytest.raises(RegistryError, match="names no registry"):
        push(store, "web", None, ConnectOptions())


def test_config_lying_about_a_diff_id_is_refused(
    registry: tuple[str, State], tmp_path: Path
) -> None:
    address, _ = registry
    a = Store(tmp_path / "a").ensure()
    image = _image(a)
    wrong = (image.layers[0], Layer(image.layers[1].blob, image.layers[0].diff_id))
    config = {
        **image.config,
        "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in wrong]},
    }
    a.tag("liar:1", a.put_image(config, wrong))
    push(a, "liar:1", Reference.parse(f"{address}/liar:1"), ConnectOptions())
    b = Store(tmp_path / "b").ensure()
    with pytest.raises(
        RegistryError, match=f"layer {image.layers[1].blob.digest} does not unpack to the diff_id"
    ):
        pull(b, Reference.parse(f"{address}/liar:1"), ConnectOptions())
    assert b.tags() == []
