"""The sysbake CLI against docker-registry on real-network terms, on loopback: through an
HTTP proxy (absolute-URI requests to a plain-http registry, CONNECT tunnels to a TLS one),
around it ($NO_PROXY, loopback), with credentials from a credential helper and no login,
and behind a flaky front (dropped connections, 429 and 503 answers, cut uploads) that the
client retries, resumes or starts over. The proxy, the front and the helper script are
tests/unit/test_registry_network_units.py's; the registry names a test host name that
only the proxy resolves, so what reached the registry went through it."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import new_store, sysbake
from services import RegistryService, registry_server

from sysbake.oci.store import Store
from tests.unit.conftest import files_tar, noise, put_image, put_layer
from tests.unit.test_registry_network_units import (
    CountingProxy,
    FlakyFront,
    Rule,
    helper_script,
)

pytestmark = pytest.mark.integration

NAME = "registry.sysbake.test"  # resolved by the test's proxy only
IMAGE = "hnet-net:1"
# No SBOM or provenance attached: a push is the image's blobs and manifest alone.
BARE = ("--sbom", "none", "--no-provenance")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A store holding IMAGE: one uncompressed layer of 5 MiB of random bytes; the store,
    the image's manifest digest and its layer's size."""
    path = new_store(tmp_path_factory.mktemp("hnet-net"))
    store = Store(path).ensure()
    layer = put_layer(store, files_tar({"etc/random": noise(5 << 20, seed=14)}), compressed=False)
    found = put_image(
        store, layer, ref=IMAGE, history=[{"created": "2026-01-01T00:00:00Z", "created_by": "t"}]
    )
    return path, found.manifest.digest, layer.blob.size


@pytest.fixture
def clean_env(tmp_path: Path) -> dict[str, str]:
    """sysbake's environment: no proxy, no credentials but those a test adds (its own
    HOME, XDG dirs and auth files)."""
    env = {k: v for k, v in os.environ.items() if k not in PROXY_VARS}
    for key in ("REGISTRY_AUTH_FILE", "DOCKER_CONFIG"):
        env.pop(key, None)
    home = tmp_path / "home"
    home.mkdir()
    env.update(
        HOME=str(home),
        XDG_RUNTIME_DIR=str(home / "run"),
        XDG_CONFIG_HOME=str(home / "config"),
        SYSBAKE_REGISTRY_RETRIES="4",
    )
    return env


@pytest.fixture(scope="module")
def plain() -> Iterator[RegistryService]:
    with registry_server() as service:
        yield service


def _pushed_and_pulled(
    store: Path, dest: str, env: dict[str, str], tmp_path: Path, *options: str
) -> tuple[str, str]:
    """Push IMAGE to `dest`, pull it into a new store: both manifest digests."""
    pushed = sysbake("push", "--json", *BARE, *options, IMAGE, dest, store=store, env=env)
    other = new_store(tmp_path / "pulled")
    pulled = sysbake("pull", "--json", *options, dest, store=other, env=env)
    return json.loads(pushed.stdout)["digest"], json.loads(pulled.stdout)["manifest"]


def test_through_an_http_proxy_to_a_plain_http_registry(
    plain: RegistryService,
    image: tuple[Path, str, int],
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    store, digest, _ = image
    port = plain.address.rpartition(":")[2]
    with CountingProxy({NAME: "127.0.0.1"}) as proxy:
        env = {**clean_env, "HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url}
        dest = f"{NAME}:{port}/hnet/plain:1"
        assert _pushed_and_pulled(store, dest, env, tmp_path, "--tls-verify=false") == (
            digest,
            digest,
        )
    forwarded = proxy.forwarded()
    assert forwarded and all(url.startswith(f"http://{dest.split('/')[0]}/") for url in forwarded)
    # The https probe went through a tunnel first (a plain-http registry refused TLS).
    assert set(proxy.connects()) == {f"{NAME}:{port}"}


def test_through_a_connect_tunnel_to_a_tls_registry(
    image: tuple[Path, str, int], clean_env: dict[str, str], tmp_path: Path
) -> None:
    store, digest, _ = image
    with (
        registry_server(tls=True, tls_names=(NAME,)) as tls,
        CountingProxy({NAME: "127.0.0.1"}) as proxy,
    ):
        assert tls.certs_dir is not None
        port = tls.address.rpartition(":")[2]
        env = {**clean_env, "HTTPS_PROXY": proxy.url}
        dest = f"{NAME}:{port}/hnet/tls:1"
        cert = f"--cert-dir={tls.certs_dir}"
        assert _pushed_and_pulled(store, dest, env, tmp_path, cert) == (digest, digest)
        status, body = tls.get("/v2/hnet/tls/tags/list")
    assert status == 200 and json.loads(body)["tags"] == ["1"]
    assert proxy.forwarded() == []
    # Kept alive: a tunnel per connection, far fewer than the requests of a push and pull.
    assert proxy.connects() and set(proxy.connects()) == {f"{NAME}:{port}"}
    assert len(proxy.connects()) <= 6


def test_no_proxy_and_loopback_go_direct(
    plain: RegistryService,
    image: tuple[Path, str, int],
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    store, digest, _ = image
    port = plain.address.rpartition(":")[2]
    with CountingProxy({NAME: "127.0.0.1"}) as proxy:
        env = {**clean_env, "HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url}
        # A loopback registry is never reached through a proxy (as docker and podman do).
        loopback = f"{plain.address}/hnet/direct:1"
        assert _pushed_and_pulled(store, loopback, env, tmp_path) == (digest, digest)
        # NO_PROXY names the registry: sysbake goes direct and cannot resolve the name.
        env["NO_PROXY"] = f"localhost,.sysbake.test:{port}"
        failed = sysbake(
            "push",
            *BARE,
            "--tls-verify=false",
            IMAGE,
            f"{NAME}:{port}/hnet/direct:1",
            store=store,
            env=env,
            check=False,
        )
    assert failed.returncode != 0
    assert f"cannot resolve {NAME}" in failed.stderr
    assert proxy.seen == []


def test_a_credential_helper_stands_in_for_login(
    image: tuple[Path, str, int], clean_env: dict[str, str], tmp_path: Path
) -> None:
    store, digest, _ = image
    bin_dir, log = tmp_path / "bin", tmp_path / "helper.log"
    with registry_server(auth=True) as secured:
        assert secured.username is not None and secured.password is not None
        answer = {"Username": secured.username, "Secret": secured.password}
        helper_script(bin_dir, "testhelper", {secured.address: answer}, log)
        env = {**clean_env, "PATH": f"{bin_dir}:{clean_env['PATH']}"}
        dest = f"{secured.address}/hnet/helped:1"
        denied = sysbake("push", *BARE, IMAGE, dest, store=store, env=env, check=False)
        assert "requires authentication" in denied.stderr
        # docker's config.json naming the helper for this registry: no login, no password.
        docker = Path(env["HOME"]) / ".docker"
        docker.mkdir()
        (docker / "config.json").write_text(
            json.dumps({"auths": {}, "credHelpers": {secured.address: "testhelper"}})
        )
        assert _pushed_and_pulled(store, dest, env, tmp_path) == (digest, digest)
        # podman's auth.json with the helper as its default store does as well.
        (docker / "config.json").unlink()
        auth_json = tmp_path / "auth.json"
        auth_json.write_text(json.dumps({"credsStore": "testhelper"}))
        env["REGISTRY_AUTH_FILE"] = str(auth_json)
        again = sysbake("push", "--json", *BARE, IMAGE, dest, store=store, env=env)
        assert json.loads(again.stdout)["digest"] == digest
    asked = log.read_text().splitlines()
    assert len(asked) >= 3 and set(asked) == {secured.address}
    assert not list(Path(env["HOME"]).rglob("auth.json"))  # nothing was written: no login


def test_a_flaky_front_is_retried(
    plain: RegistryService,
    image: tuple[Path, str, int],
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    store, digest, _ = image
    rules = [
        Rule("GET", r"^/v2/$", "drop", times=2),  # the first connections hang up at once
        Rule("HEAD", r"/blobs/", "status", status=429, retry_after="1"),
        Rule("PUT", r"/manifests/", "status", status=503, times=2),
        Rule("GET", r"/manifests/", "status", status=502),
        Rule("GET", r"/blobs/sha256:", "cut-answer"),  # a download cut in the middle
    ]
    with FlakyFront(plain.address, rules) as front:
        dest = f"{front.address}/hnet/flaky:1"
        pushed = sysbake(
            "push", "--json", "--debug", *BARE, IMAGE, dest, store=store, env=clean_env
        )
        other = new_store(tmp_path / "pulled")
        pulled = sysbake("pull", "--json", "--debug", dest, store=other, env=clean_env)
    assert json.loads(pushed.stdout)["digest"] == digest
    assert json.loads(pulled.stdout)["manifest"] == digest
    assert [rule.times for rule in rules] == [0] * len(rules)
    assert "trying again" in pushed.stderr and "resuming in" in pulled.stderr
    ranged = [s for s in front.seen if s.method == "GET" and "range" in s.headers]
    assert len(ranged) == 1 and ranged[0].headers["range"] != "bytes=0-"


def test_uploads_resume_in_chunks_or_start_over(
    plain: RegistryService,
    image: tuple[Path, str, int],
    clean_env: dict[str, str],
    tmp_path: Path,
) -> None:
    store, digest, size = image
    env = {**clean_env, "SYSBAKE_REGISTRY_CHUNK": str(1 << 20)}
    # A chunk dropped before it reached the registry, and one whose 503 answer came
    # instead of it: the upload's status says where to go on, nothing is sent twice.
    rules = [
        Rule("PATCH", "/uploads/", "drop"),
        Rule("PATCH", "/uploads/", "forward"),
        Rule("PATCH", "/uploads/", "status", status=503),
    ]
    with FlakyFront(plain.address, rules) as front:
        dest = f"{front.address}/hnet/resumed:1"
        pushed = sysbake("push", "--json", "--debug", *BARE, IMAGE, dest, env=env, store=store)
    assert json.loads(pushed.stdout)["digest"] == digest
    patches = [s for s in front.seen if s.method == "PATCH"]
    assert sum(s.body for s in patches) == size  # every byte once
    assert len([s for s in front.seen if s.method == "POST"]) == 2  # layer, config: once
    assert len([s for s in front.seen if s.method == "GET" and "/uploads/" in s.path]) == 2
    assert "resuming the upload at byte" in pushed.stderr

    # A chunk cut in the middle spoils docker-registry's upload: the blob starts over.
    with FlakyFront(plain.address, [Rule("PATCH", "/uploads/", "cut")]) as front:
        dest = f"{front.address}/hnet/restarted:1"
        pushed = sysbake("push", "--json", "--debug", *BARE, IMAGE, dest, env=env, store=store)
        other = new_store(tmp_path / "pulled")
        pulled = sysbake("pull", "--json", dest, store=other, env=env)
    assert json.loads(pulled.stdout)["manifest"] == digest
    assert len([s for s in front.seen if s.method == "POST"]) == 3  # the layer twice
    assert "uploading blob" in pushed.stderr and " again in " in pushed.stderr
