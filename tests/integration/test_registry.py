"""push/pull against a real registry (docker-registry on loopback), read back by skopeo and
podman; auth, TLS, login/logout; Docker schema2 images; stage cache shared through the
registry (`build --cache-from`); registries that refuse, drop, stall or lie. Hostile
registries and cache poisoning: test_registry_hostile.py."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from helpers import EXAMPLE, SYSBAKE, new_store, sysbake
from services import DockerService, PodmanService, RegistryService, registry_server, run

from sysbake.oci import model as oci
from sysbake.oci.store import Store
from tests.unit.conftest import files_tar, noise, put_image, put_layer

pytestmark = pytest.mark.integration
TINY = "tiny:latest"


@pytest.fixture(scope="module")
def pushed(registry: RegistryService, shared_store: Path, base_image: str) -> str:
    """The base image pushed as ADDR/base:latest; its manifest digest."""
    out = sysbake(
        "push", "--json", base_image, f"{registry.address}/base:latest", store=shared_store
    )
    return str(json.loads(out.stdout)["digest"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store holding TINY: one layer of 512 KiB of random bytes (incompressible, so a
    proxy can cut its transfer in the middle)."""
    path = new_store(tmp_path_factory.mktemp("tiny"))
    store = Store(path).ensure()
    # An uncompressed layer: the blob is the tar itself.
    layer = put_layer(store, files_tar({"etc/random": noise(512 << 10)}), compressed=False)
    put_image(
        store, layer, ref=TINY, history=[{"created": "2026-01-01T00:00:00Z", "created_by": "test"}]
    )
    return path


def _image_id(store: Path, ref: str) -> str:
    return str(json.loads(sysbake("inspect", ref, store=store).stdout)["Id"])


def _fails(*args: str, store: Path, env: dict[str, str], match: str) -> str:
    """Run a sysbake command that must fail with one error line containing `match`."""
    out = sysbake(*args, store=store, check=False, env=env)
    assert out.returncode != 0, out.stdout
    errors = [line for line in out.stderr.splitlines() if line.startswith("sysbake: error:")]
    assert len(errors) == 1, out.stderr
    assert match in errors[0], out.stderr
    assert "Traceback" not in out.stderr
    return errors[0]


def _assert_clean(store: Path) -> None:
    """A failed pull tagged nothing and left no temp file; every blob it committed is whole
    (it hashes to its name) and small: a manifest or config, never a partial layer."""
    s = Store(store)
    assert s.tags() == []
    assert [p.name for p in s.tmp_dir.iterdir()] == []
    for blob in s.blobs_dir.iterdir():
        assert oci.sha256_digest(blob.read_bytes()) == f"sha256:{blob.name}"
        assert blob.stat().st_size < 64 << 10


# -- the real registry, read back by other tools -------------------------------------------------


def test_push_is_read_by_skopeo(
    registry: RegistryService, pushed: str, shared_store: Path, base_image: str
) -> None:
    out = run(
        ["skopeo", "inspect", "--tls-verify=false", f"docker://{registry.address}/base:latest"]
    )
    doc = json.loads(out.stdout)
    assert doc["Digest"] == pushed
    image = Store(shared_store).resolve(base_image)
    assert doc["Layers"] == [layer.blob.digest for layer in image.layers]
    assert doc["Labels"]["io.sysbake.image"] == "base"


def test_second_push_skips_and_mounts(
    registry: RegistryService, pushed: str, shared_store: Path, base_image: str
) -> None:
    again = sysbake(
        "push", "--json", base_image, f"{registry.address}/base:latest", store=shared_store
    )
    result = json.loads(again.stdout)
    assert (result["digest"], result["uploaded"]) == (pushed, 0)
    other = sysbake("push", base_image, f"{registry.address}/mirror/base:v1", store=shared_store)
    assert "mounted from base" in other.stderr
    assert pushed in other.stdout


def test_podman_pulls_the_pushed_image(
    registry: RegistryService,
    pushed: str,
    podman: PodmanService,
    shared_store: Path,
    base_image: str,
) -> None:
    ref = f"{registry.address}/base:latest"
    podman.cli("pull", "--tls-verify=false", ref, timeout=300)
    info = json.loads(podman.cli("image", "inspect", ref).stdout)[0]
    assert "sha256:" + info["Id"] == _image_id(shared_store, base_image)
    # Not info["Digest"]: that stays the digest podman first knew the image by (an earlier
    # test may have loaded the same image from an archive).
    assert f"{registry.address}/base@{pushed}" in info["RepoDigests"]


def test_docker_pulls_the_pushed_image(
    registry: RegistryService,
    pushed: str,
    dockerd: DockerService,
    shared_store: Path,
    base_image: str,
) -> None:
    # dockerd treats loopback registries as insecure (plain http) without configuration.
    ref = f"{registry.address}/base:latest"
    dockerd.cli("pull", ref, timeout=300)
    info = json.loads(dockerd.cli("image", "inspect", ref).stdout)[0]
    assert info["Id"] == _image_id(shared_store, base_image)
    assert f"{registry.address}/base@{pushed}" in info["RepoDigests"]
    dockerd.cli("rmi", ref)


def test_pull_into_a_fresh_store_keeps_the_image_id(
    registry: RegistryService, pushed: str, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    store = new_store(tmp_path / "store")
    out = sysbake("pull", "--json", f"{registry.address}/base:latest", "-t", "copy:1", store=store)
    result = json.loads(out.stdout)
    assert result["id"] == _image_id(shared_store, base_image)
    assert result["manifest"] == pushed
    assert _image_id(store, "copy:1") == result["id"]
    # Pinned by digest, without a tag: stored under a sha256-<hex> tag.
    pinned = sysbake("pull", "--json", f"{registry.address}/base@{pushed}", store=store)
    assert json.loads(pinned.stdout)["ref"] == f"{registry.address}/base:{pushed.replace(':', '-')}"
    assert json.loads(pinned.stdout)["fetched"] == 0


def test_docker_schema2_image_pulls_and_boots(
    registry: RegistryService, pushed: str, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    src, dest = f"{registry.address}/base:latest", f"{registry.address}/v2s2/base:latest"
    run(
        [
            "skopeo",
            "copy",
            "--src-tls-verify=false",
            "--dest-tls-verify=false",
            "--format",
            "v2s2",
            f"docker://{src}",
            f"docker://{dest}",
        ],
        timeout=600,
    )
    raw = run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{dest}"])
    assert json.loads(raw.stdout)["mediaType"] == oci.MT_DOCKER_MANIFEST
    store = new_store(tmp_path / "store")
    result = json.loads(sysbake("pull", "--json", dest, store=store).stdout)
    assert result["id"] == _image_id(shared_store, base_image)
    manifest = Store(store).read_json(result["manifest"])
    assert manifest["mediaType"] == oci.MT_MANIFEST
    sysbake("test", dest, store=store, timeout=600)


def test_cache_from_reuses_the_pushed_stages(
    registry: RegistryService, pushed: str, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    store = new_store(tmp_path / "store")
    source = f"{registry.address}/base:latest"
    explained = sysbake(
        "build", "--explain", "--cache-from", source, "--target", "base", EXAMPLE, store=store
    )
    assert f"base: bootstrap: reused: from {registry.address}/base@{pushed}" in explained.stdout, (
        explained.stdout
    )
    # Same stage, same labels, same timestamps: the very same image.
    assert _image_id(store, "base:latest") == _image_id(shared_store, base_image)
    # The cache source was fetched, not tagged: the store's only tag is the build's.
    assert [t.ref for t in Store(store).tags()] == ["base:latest"]
    # The stage is now this store's, with its origin: a build without --cache-from reuses it.
    again = sysbake("build", "--explain", "--target", "base", EXAMPLE, store=store)
    assert f"base: bootstrap: reused: from {registry.address}/base@{pushed}" in again.stdout


# -- auth and TLS --------------------------------------------------------------------------------


def test_auth_tls_login_logout(tiny: Path, env: dict[str, str], tmp_path: Path) -> None:
    with registry_server(auth=True, tls=True) as reg:
        assert reg.certs_dir is not None and reg.password is not None
        dest = f"{reg.address}/tiny:1"
        cert = ["--cert-dir", str(reg.certs_dir)]
        _fails("push", TINY, dest, store=tiny, env=env, match="TLS verification of")
        _fails("push", *cert, TINY, dest, store=tiny, env=env, match="requires authentication")
        _fails(
            "push",
            *cert,
            "--creds",
            "sysbake:wrong",
            TINY,
            dest,
            store=tiny,
            env=env,
            match="rejected the credentials of user 'sysbake'",
        )
        _fails(
            "login",
            *cert,
            "-u",
            "sysbake",
            "-p",
            "wrong",
            reg.address,
            store=tiny,
            env=env,
            match="rejected the credentials",
        )
        assert not Path(env["REGISTRY_AUTH_FILE"]).exists()

        login = sysbake(
            "login",
            *cert,
            "-u",
            "sysbake",
            "--password-stdin",
            reg.address,
            store=tiny,
            env=env,
            input=reg.password + "\n",
        )
        assert "Login Succeeded" in login.stdout
        auths = json.loads(Path(env["REGISTRY_AUTH_FILE"]).read_text())["auths"]
        assert base64.b64decode(auths[reg.address]["auth"]).decode() == f"sysbake:{reg.password}"
        digest = json.loads(
            sysbake("push", "--json", *cert, TINY, dest, store=tiny, env=env).stdout
        )["digest"]
        fresh = new_store(tmp_path / "fresh")
        # --tls-verify=false: no CA needed; the credentials still come from auth.json.
        pulled = json.loads(
            sysbake("pull", "--json", "--tls-verify=false", dest, store=fresh, env=env).stdout
        )
        assert pulled["manifest"] == digest
        # A CA file works as well as a cert dir; explicit --creds win over auth.json.
        again = sysbake(
            "pull",
            "--cert-dir",
            str(reg.ca_cert),
            "--creds",
            f"sysbake:{reg.password}",
            dest,
            "-t",
            "again:1",
            store=fresh,
            env=env,
        )
        assert again.returncode == 0

        out = sysbake("logout", reg.address, store=tiny, env=env)
        assert "Removed" in out.stdout
        _fails("logout", reg.address, store=tiny, env=env, match="not logged in")
        _fails("push", *cert, TINY, dest, store=tiny, env=env, match="requires authentication")


# -- registries that refuse, drop, stall or lie --------------------------------------------------


@dataclass
class Proxy:
    """A loopback TCP proxy to `target` that, on every connection, forwards at most `limit`
    bytes in direction `cut` ('down': registry -> client, 'up': client -> registry), then
    hangs up (or, with `stall`, stops forwarding and keeps the connection open)."""

    target: tuple[str, int]
    limit: int
    cut: str = "down"
    stall: bool = False
    port: int = 0

    def __post_init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.closing = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closing.is_set():
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for src, dst, direction in ((client, upstream, "up"), (upstream, client, "down")):
                threading.Thread(target=self._pump, args=(src, dst, direction), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, direction: str) -> None:
        budget = self.limit if direction == self.cut else None
        try:
            while data := src.recv(65536):
                if budget is not None:
                    data = data[:budget]
                    budget -= len(data)
                dst.sendall(data)
                if budget == 0:
                    if self.stall:
                        self.closing.wait()
                    break
        except OSError:
            pass
        for s in (src, dst):
            with suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.closing.set()
        self.server.close()
        for s in self.sockets:
            s.close()


@contextmanager
def proxy(registry: RegistryService, **kw: Any) -> Iterator[Proxy]:
    host, port = registry.address.split(":")
    p = Proxy((host, int(port)), **kw)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def tiny_pushed(registry: RegistryService, tiny: Path) -> str:
    sysbake("push", TINY, f"{registry.address}/tiny:1", store=tiny)
    return f"{registry.address}/tiny:1"


def test_connection_refused(tmp_path: Path, env: dict[str, str], tiny: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound but not listening: refused
        port = s.getsockname()[1]
        store = new_store(tmp_path / "store")
        _fails(
            "pull",
            f"127.0.0.1:{port}/base:latest",
            store=store,
            env=env,
            match=f"cannot connect to 127.0.0.1:{port}: connection refused",
        )
        _fails(
            "push",
            TINY,
            f"127.0.0.1:{port}/tiny:1",
            store=tiny,
            env=env,
            match="connection refused",
        )
    _assert_clean(store)


def test_unknown_repository_or_tag(
    registry: RegistryService, tiny_pushed: str, tmp_path: Path, env: dict[str, str]
) -> None:
    store = new_store(tmp_path / "store")
    _fails(
        "pull",
        f"{registry.address}/no/such:1",
        store=store,
        env=env,
        match="not found in the registry",
    )
    _fails(
        "pull",
        tiny_pushed.replace(":1", ":2"),
        store=store,
        env=env,
        match="tiny:2 not found in the registry (MANIFEST_UNKNOWN",
    )
    _assert_clean(store)


def test_connection_dropped_mid_blob(
    registry: RegistryService, tiny_pushed: str, tiny: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    store = new_store(tmp_path / "store")
    # Not tried again: a download would resume, an upload start over (test_registry_network).
    env = {**env, "SYSBAKE_REGISTRY_RETRIES": "0"}
    with proxy(registry, limit=100 << 10) as p:
        line = _fails(
            "pull",
            tiny_pushed.replace(registry.address, f"127.0.0.1:{p.port}"),
            store=store,
            env=env,
            match="dropped while pulling blob",
        )
    got, size = map(int, re.findall(r"\((\d+) of (\d+) bytes received\)", line)[0])
    assert 0 < got < size
    _assert_clean(store)
    # Pushing a new blob through a proxy that hangs up mid-upload fails just as clearly.
    with proxy(registry, limit=100 << 10, cut="up") as p:
        _fails(
            "push",
            TINY,
            f"127.0.0.1:{p.port}/cut/tiny:1",
            store=tiny,
            env=env,
            match="connection failed or dropped",
        )
    # The tag was never pushed.
    missing = sysbake("pull", f"{registry.address}/cut/tiny:1", store=store, check=False, env=env)
    assert "not found in the registry" in missing.stderr


def test_interrupt_mid_blob_leaves_no_partial_blob(
    registry: RegistryService, tiny_pushed: str, tmp_path: Path, env: dict[str, str]
) -> None:
    store = new_store(tmp_path / "store")
    with proxy(registry, limit=100 << 10, stall=True) as p:
        ref = tiny_pushed.replace(registry.address, f"127.0.0.1:{p.port}")
        child = subprocess.Popen(
            [*SYSBAKE, "--store", str(store), "pull", ref],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 30
            while not list((store / "tmp").glob("blob-*")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list((store / "tmp").glob("blob-*")), "the pull never started a blob"
            time.sleep(0.3)
            child.send_signal(signal.SIGINT)
            _, stderr = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
    assert child.returncode == 130, stderr
    assert "interrupted" in stderr
    _assert_clean(store)


class _Liar(BaseHTTPRequestHandler):
    """A registry whose only image has a config blob that does not match its digest."""

    config = b'{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}'
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_MANIFEST,
            "config": {
                "mediaType": oci.MT_CONFIG,
                "digest": oci.sha256_digest(config),
                "size": len(config),
            },
            "layers": [],
        }
    ).encode()

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = {
            "/v2/": b"{}",
            "/v2/liar/manifests/latest": self.manifest,
            f"/v2/liar/blobs/{oci.sha256_digest(self.config)}": self.config.replace(
                b"amd64", b"arm64"
            ),
        }.get(self.path)
        self.send_response(404 if body is None else 200)
        self.send_header("Content-Type", oci.MT_MANIFEST)
        self.send_header("Content-Length", str(len(body or b"")))
        self.end_headers()
        self.wfile.write(body or b"")


def test_lying_registry_digest_mismatch(tmp_path: Path, env: dict[str, str]) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        store = new_store(tmp_path / "store")
        _fails(
            "pull",
            f"127.0.0.1:{server.server_address[1]}/liar:latest",
            store=store,
            env=env,
            match="digest mismatch",
        )
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert not Store(store).has_blob(oci.sha256_digest(_Liar.config))
    _assert_clean(store)
