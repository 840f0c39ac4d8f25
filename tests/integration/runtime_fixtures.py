"""Images for the runtime tests, in a store of their own.

The base is the run's example base image (the `base_image` fixture of conftest.py).
On top of it, small layers and configs make:
a failing unit, a socket-activated service on TCP 7777, no init at all, and a PID 1 that
ignores the stop signal.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sysbake.oci.layers.commit import commit_tree
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.rootfs import Root
from sysbake.runtime import containers as runtime

ECHO_PORT = 7777

_FAILING_UNIT = """\
[Unit]
Description=sysbake test: a unit that always fails
[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo about to fail; exit 1'
[Install]
WantedBy=multi-user.target
"""
_ECHO_SOCKET = f"""\
[Unit]
Description=sysbake test: echo on TCP {ECHO_PORT}
[Socket]
ListenStream={ECHO_PORT}
Accept=yes
[Install]
WantedBy=sockets.target
"""
_ECHO_SERVICE = """\
[Unit]
Description=sysbake test: echo
[Service]
ExecStart=/bin/cat
StandardInput=socket
"""


@dataclass(frozen=True)
class RuntimeImages:
    """A store and the refs of the test images in it."""

    store: Path
    systemd: str = "rt-systemd:latest"
    failing: str = "rt-failing:latest"
    echo: str = "rt-echo:latest"
    nosystemd: str = "rt-nosystemd:latest"
    trap: str = "rt-trap:latest"

    @property
    def containers(self) -> Path:
        return self.store / "containers"


def _unit_layer(store: Store, tree: Path, units: dict[str, str], wants: dict[str, str]) -> Layer:
    systemd = tree / "etc/systemd/system"
    systemd.mkdir(parents=True)
    for name, text in units.items():
        (systemd / name).write_text(text)
    for name, target in wants.items():
        (systemd / f"{target}.wants").mkdir(exist_ok=True)
        os.symlink(f"../{name}", systemd / f"{target}.wants" / name)
    for d in (tree / "etc", tree / "etc/systemd", systemd):
        d.chmod(0o755)
    return commit_tree(store, tree, compression="none")


def _no_init_layer(store: Store, tree: Path, base: Path) -> Layer:
    # Overlay whiteouts (0/0 character devices) over wherever the base keeps its inits.
    tree.mkdir()
    for candidate in ("/lib/systemd/systemd", "/sbin/init"):
        with Root(base) as root:
            if not root.exists(candidate):
                continue
            rel = Path(root.resolve(candidate))
        (tree / rel.parent).mkdir(parents=True, exist_ok=True)
        if not (tree / rel).exists():
            os.mknod(tree / rel, stat.S_IFCHR | 0o600, os.makedev(0, 0))
    return commit_tree(store, tree, compression="none", overlay_upper=True)


def _with(config: dict[str, Any], layers: tuple[Layer, ...], **changes: Any) -> dict[str, Any]:
    out = dict(config)
    out["config"] = dict(config.get("config") or {}) | changes
    out["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in layers]}
    return out


@pytest.fixture(scope="session")
def runtime_images(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RuntimeImages]:
    """The runtime test images (built once per run); containers left over are removed."""
    store = Store(request.getfixturevalue("shared_store")).ensure()
    base = store.resolve(request.getfixturevalue("base_image"))
    base_layers, base_config = base.layers, base.config
    work = tmp_path_factory.mktemp("rt-layers")
    failing = _unit_layer(
        store,
        work / "failing",
        {"sysbake-fail.service": _FAILING_UNIT},
        {"sysbake-fail.service": "multi-user.target"},
    )
    echo = _unit_layer(
        store,
        work / "echo",
        {"sysbake-echo.socket": _ECHO_SOCKET, "sysbake-echo@.service": _ECHO_SERVICE},
        {"sysbake-echo.socket": "sockets.target"},
    )
    no_init = _no_init_layer(store, work / "no-init", store.layer_tree(base_layers[-1]))
    images = RuntimeImages(store.root)
    for ref, layers, changes in (
        (images.systemd, base_layers, {}),
        (images.failing, (*base_layers, failing), {}),
        (images.echo, (*base_layers, echo), {}),
        (images.nosystemd, (*base_layers, no_init), {}),
        (
            images.trap,
            base_layers,
            {
                "Cmd": ["sh", "-c", "trap '' 37; echo trapping; sleep 1000"],
                "StopSignal": "SIGRTMIN+3",
            },
        ),
    ):
        store.tag(ref, store.put_image(_with(base_config, layers, **changes), layers))
    yield images
    for container in runtime.all_containers(images.containers):
        runtime.remove(container, force=True)
