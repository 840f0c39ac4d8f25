"""The stage cache poisoned through a registry, and a registry that drips, against the real
CLI and a real registry (docker-registry on loopback).

The attack: anyone can compute the key of the example's bootstrap stage, publish an image
whose config labels claim that key for a layer of their own, and get a user to pull it for
any reason. The user's next build must not reuse that layer; only a cache source the user
names with `--cache-from` may stand in for a stage, and `--explain` names it."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
from contextlib import suppress
from pathlib import Path

import pytest
from helpers import EXAMPLE, new_store, sysbake
from services import RegistryService

from sysbake.build.cache import StageCache
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from tests.unit.conftest import files_tar, noise, put_image, put_layer

pytestmark = pytest.mark.integration
PLANTED = "etc/reg-planted"


def _bootstrap_key(first_build: subprocess.CompletedProcess[str]) -> str:
    """The real key of the example base's bootstrap stage, as `build --json` reports it."""
    [image] = json.loads(first_build.stdout)["images"]
    [stage] = [s for s in image["stages"] if s["stage"] == "bootstrap"]
    return str(stage["key"])


def _poison(tmp_path: Path, key: str) -> tuple[Path, Layer]:
    """A store holding reg-poison:latest: one layer of the attacker's (a planted file),
    labelled and annotated in history as the bootstrap stage of `key`."""
    store_path = new_store(tmp_path / "attacker")
    store = Store(store_path).ensure()
    layer = put_layer(store, files_tar({PLANTED: b"planted by the attacker\n"}), compressed=False)
    put_image(
        store,
        layer,
        ref="reg-poison:latest",
        config={"Labels": {"io.sysbake.image": "base", "io.sysbake.stage.bootstrap": key}},
        history=[
            {
                "created": "2026-01-01T00:00:00Z",
                "created_by": "sysbake bootstrap bookworm minbase",
                "comment": f"sysbake bootstrap {key[:16]}",
            }
        ],
    )
    return store_path, layer


def _stages(out: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    [image] = json.loads(out.stdout)["images"]
    return {str(s["stage"]): s for s in image["stages"]}


def test_a_pulled_image_never_poisons_the_stage_cache(
    registry: RegistryService,
    shared_store: Path,
    base_image: str,
    first_build: subprocess.CompletedProcess[str],
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    key = _bootstrap_key(first_build)
    attacker, planted = _poison(tmp_path, key)
    poison_ref = f"{registry.address}/reg-poison:latest"
    sysbake("push", "reg-poison:latest", poison_ref, store=attacker, env=env)

    # The victim pulls the image for any reason, then builds their own project.
    victim = new_store(tmp_path / "victim")
    sysbake("pull", poison_ref, store=victim, env=env)
    built = sysbake(
        "build", "--json", "--explain", "--target", "base", EXAMPLE, store=victim, env=env
    )
    bootstrap = _stages(built)["bootstrap"]
    assert bootstrap["key"] == key
    assert bootstrap["reused"] is False, built.stdout
    assert bootstrap["diff_id"] != planted.diff_id
    assert bootstrap["origin"] == ""
    image = Store(victim).resolve("base:latest")
    assert planted.diff_id not in [la.diff_id for la in image.layers]
    assert not (Store(victim).tree_path(image.layers[0].diff_id) / PLANTED).exists()
    # No record of the store points at the attacker's layer.
    assert all(r.layer.diff_id != planted.diff_id for r in StageCache(Store(victim)).records())


def test_cache_from_a_named_source_is_reused_and_explained(
    registry: RegistryService,
    shared_store: Path,
    base_image: str,
    first_build: subprocess.CompletedProcess[str],
    tmp_path: Path,
    env: dict[str, str],
) -> None:
    source = f"{registry.address}/reg-cache:latest"
    pushed = json.loads(
        sysbake("push", "--json", base_image, source, store=shared_store, env=env).stdout
    )["digest"]
    store = new_store(tmp_path / "store")
    explained = sysbake(
        "build",
        "--explain",
        "--cache-from",
        source,
        "--target",
        "base",
        EXAMPLE,
        store=store,
        env=env,
    )
    assert (
        f"base: bootstrap: reused: from {registry.address}/reg-cache@{pushed}\n" in explained.stdout
    ), explained.stdout
    ours = Store(store).resolve("base:latest")
    assert ours.id == Store(shared_store).resolve(base_image).id
    [record] = [r for r in StageCache(Store(store)).records() if r.stage == "bootstrap"]
    assert record.key == _bootstrap_key(first_build)
    assert record.origin is not None
    assert (record.origin.registry, record.origin.repository, record.origin.manifest) == (
        registry.address,
        "reg-cache",
        pushed,
    )
    assert record.layer == ours.layers[0]


# -- a registry that drips ----------------------------------------------------------------------


class DripProxy:
    """A loopback TCP proxy to `target` that forwards the first `free` bytes of every
    answer at full speed, then one byte every 50 ms."""

    def __init__(self, target: tuple[str, int], free: int) -> None:
        self.target, self.free = target, free
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
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(
                target=self._pump, args=(upstream, client, self.free), daemon=True
            ).start()

    def _pump(self, src: socket.socket, dst: socket.socket, free: int | None) -> None:
        try:
            while (data := src.recv(65536)) and not self.closing.is_set():
                if free is None or len(data) <= free:
                    free = None if free is None else free - len(data)
                    dst.sendall(data)
                    continue
                dst.sendall(data[:free])
                for i in range(free, len(data)):
                    if self.closing.wait(0.05):
                        break
                    dst.sendall(data[i : i + 1])
                free = 0
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


def test_a_dripping_registry_is_dropped_with_one_clear_line(
    registry: RegistryService, tmp_path: Path, env: dict[str, str]
) -> None:
    source = new_store(tmp_path / "source")
    store = Store(source).ensure()
    layer = put_layer(store, noise(256 << 10), compressed=False)
    put_image(store, layer, ref="reg-drip:1")
    sysbake("push", "reg-drip:1", f"{registry.address}/reg-drip:1", store=source, env=env)
    host, port = registry.address.split(":")
    # Manifest and config pass (a few KiB); the layer then drips.
    proxy = DripProxy((host, int(port)), free=16 << 10)
    try:
        victim = new_store(tmp_path / "victim")
        ref = f"127.0.0.1:{proxy.port}/reg-drip:1"
        # Dripped whole, the layer would take hours: the timeouts only bound a broken test.
        out = sysbake(
            "pull", "--rate-window", "1", ref, store=victim, check=False, env=env, timeout=120
        )
        # The same through the environment.
        slow = sysbake(
            "pull",
            ref,
            store=victim,
            check=False,
            timeout=120,
            env={**env, "SYSBAKE_REGISTRY_WINDOW": "1", "SYSBAKE_REGISTRY_MIN_RATE": "2"},
        )
    finally:
        proxy.close()
    assert out.returncode == 1, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("sysbake: error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    assert re.fullmatch(
        rf"sysbake: error: pull {re.escape(ref)}: blob {layer.blob.digest}: the registry sent "
        r"\d+ bytes in 1 s \(less than the minimum of 1 KiB/s\): dropped",
        errors[0],
    ), errors
    assert "less than the minimum of 2 KiB/s): dropped" in slow.stderr, slow.stderr
    assert slow.returncode == 1
    s = Store(victim)
    assert s.tags() == [] and [p.name for p in s.tmp_dir.iterdir()] == []
    assert not s.has_blob(layer.blob.digest)
