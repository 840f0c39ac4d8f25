"""Signing: NaCl secretbox (checked against libsodium), encrypted sigstore keys, the
simple-signing payload containers/image checks, DSSE envelopes, the provenance statement
(hashes of inputs, never their contents), and the attachments push writes to a registry
with and without the referrers API (an in-process registry; podman and docker-registry
verify them in tests/integration/test_supply_chain.py)."""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import hashlib
import json
import os
import stat
import threading
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sysbake.build.cache import StageCache, StageRecord
from sysbake.oci import model as oci
from sysbake.oci.store import Store
from sysbake.registry import attach
from sysbake.registry.transfer import ConnectOptions, Reference, push
from sysbake.supply import SupplyError, provenance, signing
from tests.unit.conftest import files_tar, put_image
from tests.unit.test_registry_flow import Handler, State

PASSPHRASE = b"correct horse"


# -- secretbox and encrypted keys -----------------------------------------------------------


def _libsodium() -> Any:
    name = ctypes.util.find_library("sodium")
    if name is None:
        pytest.fail("libsodium missing: install the Debian package libsodium23 (deps/apt.txt)")
    lib = ctypes.CDLL(name)
    assert lib.sodium_init() >= 0
    return lib


@pytest.mark.parametrize("size", [0, 1, 15, 16, 17, 31, 32, 33, 63, 64, 65, 138, 1000])
def test_secretbox_seals_as_libsodium_does(size: int) -> None:
    lib = _libsodium()
    key, nonce, message = os.urandom(32), os.urandom(24), os.urandom(size)
    out = ctypes.create_string_buffer(16 + size)
    assert lib.crypto_secretbox_easy(out, message, ctypes.c_ulonglong(size), nonce, key) == 0
    assert signing.secretbox_seal(message, nonce, key) == out.raw
    assert signing.secretbox_open(out.raw, nonce, key) == message
    tampered = bytearray(out.raw)
    tampered[-1 if size else 0] ^= 1
    assert signing.secretbox_open(bytes(tampered), nonce, key) is None


def test_an_encrypted_key_opens_with_its_passphrase_only() -> None:
    document = signing.encrypt_key(b"pkcs8 bytes", PASSPHRASE)
    doc = json.loads(document)
    assert (doc["kdf"]["name"], doc["kdf"]["params"], doc["cipher"]["name"]) == (
        "scrypt",
        {"N": 32768, "r": 8, "p": 1},
        "nacl/secretbox",
    )
    assert signing.decrypt_key(document, PASSPHRASE, "k") == b"pkcs8 bytes"
    with pytest.raises(SupplyError, match=r"^k: wrong passphrase"):
        signing.decrypt_key(document, b"wrong", "k")
    doc["kdf"]["params"]["N"] = 1 << 30  # a tampered work factor: refused, not computed
    with pytest.raises(SupplyError, match="expected scrypt"):
        signing.decrypt_key(json.dumps(doc).encode(), PASSPHRASE, "k")
    with pytest.raises(SupplyError, match="not an encrypted sigstore private key"):
        signing.decrypt_key(b"{}", PASSPHRASE, "k")


def test_generated_keys_are_written_once_with_private_modes(tmp_path: Path) -> None:
    prefix = str(tmp_path / "cosign")
    private, public = signing.write_key_pair(prefix, PASSPHRASE)
    assert stat.S_IMODE(os.stat(private).st_mode) == 0o600
    text = Path(private).read_bytes()
    assert text.startswith(b"-----BEGIN ENCRYPTED COSIGN PRIVATE KEY-----\n")
    assert Path(public).read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----\n")
    key = signing.load_private_key(text, PASSPHRASE, private)
    assert signing.public_pem(key) == Path(public).read_bytes()
    signature = signing.sign(key, b"payload")
    assert signing.verify(Path(public).read_bytes(), b"payload", signature)
    assert not signing.verify(Path(public).read_bytes(), b"payload!", signature)
    with pytest.raises(SupplyError, match="exists: not overwritten"):
        signing.write_key_pair(prefix, PASSPHRASE)
    with pytest.raises(SupplyError, match="wrong passphrase"):
        signing.load_private_key(text, b"nope", private)
    with pytest.raises(SupplyError, match="expected a PEM 'ENCRYPTED COSIGN PRIVATE KEY' block"):
        signing.load_private_key(Path(public).read_bytes(), PASSPHRASE, public)


# -- payloads ---------------------------------------------------------------------------------


def test_the_simple_signing_payload_has_exactly_what_containers_image_reads() -> None:
    digest = "sha256:" + "ab" * 32
    payload = signing.simple_signing_payload(digest, "127.0.0.1:5000/team/web:1")
    doc = json.loads(payload)
    assert set(doc) == {"critical", "optional"}
    assert doc["critical"] == {
        "identity": {"docker-reference": "127.0.0.1:5000/team/web:1"},
        "image": {"docker-manifest-digest": digest},
        "type": "cosign container image signature",
    }
    assert set(doc["optional"]) == {"creator"}  # no timestamp: the same image, the same bytes
    assert payload == signing.simple_signing_payload(digest, "127.0.0.1:5000/team/web:1")


def test_dsse_signs_the_pre_authentication_encoding(tmp_path: Path) -> None:
    assert signing.pae("http://example.com/HelloWorld", b"hello world") == (
        b"DSSEv1 29 http://example.com/HelloWorld 11 hello world"
    )
    private, public = signing.write_key_pair(str(tmp_path / "k"), b"")
    key = signing.load_private_key(Path(private).read_bytes(), b"", private)
    envelope = signing.dsse_envelope(key, "application/vnd.in-toto+json", b'{"a":1}')
    assert base64.b64decode(envelope["payload"]) == b'{"a":1}'
    sig = base64.b64decode(envelope["signatures"][0]["sig"])
    signed = signing.pae("application/vnd.in-toto+json", b'{"a":1}')
    assert signing.verify(Path(public).read_bytes(), signed, sig)


def test_docker_references_are_normalised_as_containers_image_does() -> None:
    assert attach.docker_reference(Reference.parse("docker.io/web:1")) == "docker.io/library/web:1"
    assert (
        attach.docker_reference(Reference.parse("127.0.0.1:5000/a/b"))
        == "127.0.0.1:5000/a/b:latest"
    )
    pinned = Reference.parse("127.0.0.1:5000/a/b@sha256:" + "c" * 64)
    assert attach.docker_reference(pinned) == "127.0.0.1:5000/a/b@sha256:" + "c" * 64


# -- provenance ------------------------------------------------------------------------------


SECRET = "pillar-secret-9d81"


def _built_image(store: Store, tmp_path: Path) -> Any:
    """A two-stage image of this store with stage records like a build's (a pillar's hash,
    a step environment holding a secret)."""
    bootstrap = files_tar({"etc/a": b"a"})
    step = files_tar({"etc/b": b"b"})
    keys = {"bootstrap": "1" * 64, "system": "2" * 64}
    history = [
        {"created": "2024-01-01T00:00:00Z", "comment": f"sysbake {s} {k[:16]}"}
        for s, k in keys.items()
    ]
    labels = {f"io.sysbake.stage.{s}": k for s, k in keys.items()} | {
        "io.sysbake.image": "web",
        "io.sysbake.project": "sysbake.toml sha256:" + "e" * 64,
    }
    image = put_image(
        store, bootstrap, step, ref="web:1", config={"Labels": labels}, history=history
    )
    cache = StageCache(store)
    boot_inputs = {
        "stage": "bootstrap",
        "bootstrap": {
            "suite": "bookworm",
            "variant": "minbase",
            "architecture": "amd64",
            "snapshot": "20240101T000000Z",
            "sources": ["deb http://ann:hunter2@mirror.invalid/debian bookworm main"],
        },
    }
    step_inputs = {
        "stage": "provision",
        "step": {
            "type": "salt",
            "mode": "boot",
            "env": {"TOKEN": SECRET},
            "pillar": ["pillar"],
            "state_tree": ["salt"],
        },
        "trees": {"pillar": "sha256:" + "f" * 64, "salt": "sha256:" + "9" * 64},
        "plan": {"salt_version": "3007.16", "toolchain": "t" * 8, "schema": 1},
    }
    for (stage, key), inputs, layer in zip(
        keys.items(), (boot_inputs, step_inputs), image.layers, strict=True
    ):
        cache.save(StageRecord(key, "web", stage, inputs, layer, "2024-01-01T00:00:00Z", stage))
    return image


def test_provenance_states_keys_and_hashes_never_secrets(store: Store, tmp_path: Path) -> None:
    image = _built_image(store, tmp_path)
    doc = provenance.statement(store, image, "127.0.0.1:5000/web")
    text = provenance.render(doc).decode()
    assert SECRET not in text and "hunter2" not in text
    assert doc["subject"] == [
        {"name": "127.0.0.1:5000/web", "digest": {"sha256": oci.hex_of(image.manifest.digest)}}
    ]
    definition = doc["predicate"]["buildDefinition"]
    assert definition["externalParameters"]["project"] == {"digest": {"sha256": "e" * 64}}
    stages = definition["internalParameters"]["stages"]
    assert [(s["name"], s["key"]) for s in stages] == [
        ("bootstrap", "1" * 64),
        ("system", "2" * 64),
    ]
    assert stages[1]["salt_version"] == "3007.16" and stages[0]["snapshot"] == "20240101T000000Z"
    deps = {d["name"]: d for d in definition["resolvedDependencies"]}
    assert deps["system: pillar"]["digest"] == {"sha256": "f" * 64}
    assert deps["system: pillar"]["annotations"]["role"] == "pillar"
    assert deps["system: salt"]["annotations"]["role"] == "state_tree"
    assert deps["bootstrap: apt source"]["uri"] == "http://mirror.invalid/debian"
    assert provenance.render(doc) == provenance.render(
        provenance.statement(store, image, "127.0.0.1:5000/web")
    )


def test_a_stage_without_a_record_is_stated_by_its_key(store: Store, tmp_path: Path) -> None:
    image = _built_image(store, tmp_path)
    StageCache(store).remove("2" * 64)
    stages = provenance.statement(store, image, "web")["predicate"]["buildDefinition"][
        "internalParameters"
    ]["stages"]
    assert stages[-1] == {"name": "system", "key": "2" * 64, "record": "not in this store"}


# -- attachments in a registry -----------------------------------------------------------------


class ReferrersHandler(Handler):
    """The fake registry with the referrers API: a manifest with a subject is answered with
    the OCI-Subject header."""

    def _route(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        if self.command != "PUT" or "/manifests/" not in url.path:
            return super()._route()
        repo, _, ref = url.path.removeprefix("/v2/").partition("/manifests/")
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        digest = oci.sha256_digest(body)
        for name in (ref, digest):
            self.state.manifests[(repo, name)] = (body, self.headers["Content-Type"])
        headers = {"Docker-Content-Digest": digest}
        subject = (json.loads(body).get("subject") or {}).get("digest")
        if subject:
            headers["OCI-Subject"] = subject
        return self._send(201, headers=headers)

    do_GET = do_HEAD = do_POST = do_PUT = _route


def _serve(handler: type[Handler]) -> Iterator[tuple[str, State]]:
    from http.server import ThreadingHTTPServer

    state = State()
    bound = type("Bound", (handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), bound)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def plain_registry() -> Iterator[tuple[str, State]]:
    yield from _serve(Handler)


@pytest.fixture
def referrers_registry() -> Iterator[tuple[str, State]]:
    yield from _serve(ReferrersHandler)


def _doc(state: State, repo: str, ref: str) -> dict[str, Any]:
    return dict(json.loads(state.manifests[(repo, ref)][0]))


def _artifacts() -> list[attach.Artifact]:
    return [
        attach.Artifact(
            "application/spdx+json", "application/spdx+json", b'{"spdxVersion":"SPDX-2.3"}'
        ),
        attach.Artifact("application/vnd.in-toto+json", "application/vnd.in-toto+json", b"{}"),
    ]


def test_without_the_referrers_api_a_tag_lists_the_artifacts_and_sig_tags_sign(
    plain_registry: tuple[str, State], store: Store, tmp_path: Path
) -> None:
    address, state = plain_registry
    image = put_image(store, files_tar({"etc/x": b"x"}), ref="web:1")
    dest = Reference.parse(f"{address}/team/web:1")
    push(store, "web:1", dest, ConnectOptions())
    private, public = signing.write_key_pair(str(tmp_path / "k"), PASSPHRASE)
    key = signing.load_private_key(Path(private).read_bytes(), PASSPHRASE, private)
    for _ in range(2):  # publishing again replaces, never piles up
        result = attach.publish(
            store, image, dest, ConnectOptions(), artifacts=_artifacts(), key=key
        )
    tag = "sha256-" + oci.hex_of(image.manifest.digest)
    assert result.referrers == tag
    index = _doc(state, "team/web", tag)
    assert index["mediaType"] == oci.MT_INDEX
    assert [m["artifactType"] for m in index["manifests"]] == [
        "application/spdx+json",
        "application/vnd.in-toto+json",
    ]
    artifact = _doc(state, "team/web", index["manifests"][0]["digest"])
    assert artifact["subject"]["digest"] == image.manifest.digest
    assert state.blobs[artifact["layers"][0]["digest"]] == b'{"spdxVersion":"SPDX-2.3"}'
    assert state.blobs[artifact["config"]["digest"]] == b"{}"
    sig = _doc(state, "team/web", f"{tag}.sig")
    assert len(sig["layers"]) == 1
    layer = sig["layers"][0]
    assert layer["mediaType"] == "application/vnd.dev.cosign.simplesigning.v1+json"
    payload = state.blobs[layer["digest"]]
    signature = base64.b64decode(layer["annotations"]["dev.cosignproject.cosign/signature"])
    assert signing.verify(Path(public).read_bytes(), payload, signature)
    claim = json.loads(payload)["critical"]
    assert claim["identity"]["docker-reference"] == f"{address}/team/web:1"
    assert claim["image"]["docker-manifest-digest"] == image.manifest.digest
    for entry in index["manifests"]:  # each artifact is signed by digest too
        art_sig = _doc(state, "team/web", entry["digest"].replace(":", "-") + ".sig")
        claim = json.loads(state.blobs[art_sig["layers"][0]["digest"]])["critical"]
        assert claim["identity"]["docker-reference"] == f"{address}/team/web@{entry['digest']}"
    assert len(result.signatures) == 3


def test_with_the_referrers_api_no_tag_is_written(
    referrers_registry: tuple[str, State], store: Store
) -> None:
    address, state = referrers_registry
    image = put_image(store, files_tar({"etc/x": b"x"}), ref="web:1")
    dest = Reference.parse(f"{address}/team/web:1")
    push(store, "web:1", dest, ConnectOptions())
    result = attach.publish(store, image, dest, ConnectOptions(), artifacts=_artifacts())
    assert result.referrers == "referrers API"
    assert result.signatures == ()
    tags = {ref for _repo, ref in state.manifests if not ref.startswith("sha256:")}
    assert tags == {"1"}
    assert hashlib.sha256(b"{}").hexdigest() in {d.removeprefix("sha256:") for d in state.blobs}


def test_a_push_of_an_image_without_an_sbom_stands(
    plain_registry: tuple[str, State], store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tarfile

    from tests.unit.conftest import Entry, crafted_tar

    address, state = plain_registry
    host = tmp_path / "host-status"
    host.write_bytes(b"Package: x\n")
    dirs: list[Entry] = [(d, tarfile.DIRTYPE, {}) for d in ("var", "var/lib", "var/lib/dpkg")]
    link = ("var/lib/dpkg/status", tarfile.SYMTYPE, {"linkname": str(host)})
    put_image(store, crafted_tar(*dirs, link), ref="bad:1")
    dest = Reference.parse(f"{address}/team/bad:1")
    push(store, "bad:1", dest, ConnectOptions())
    warnings: list[str] = []
    monkeypatch.setattr("sysbake.log.warn", warnings.append)
    result = attach.publish_supply(
        store, "bad:1", dest, ConnectOptions(), sbom_format="spdx-json", provenance=True, key=None
    )
    assert result.attachments == () and result.signatures == ()
    assert warnings == [
        f"no SBOM attached to {dest}: image path /var/lib/dpkg/status: expected a regular "
        "file, found a symlink"
    ]
    assert set(ref for _repo, ref in state.manifests if not ref.startswith("sha256:")) == {"1"}
