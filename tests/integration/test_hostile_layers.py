"""Hostile layers through the real commands: crafted layers (not a tar, not gzip, "..",
an absolute name, hardlinks to /etc/shadow and to a planted host file, a write through a
symlink, a disk's device node) pulled from a registry on loopback, or written into a store
with the store API and then exported in every format and run. Each is refused with one
error line naming the layer and the entry, a non-zero exit, no tag, no tree, no output
file; every host file the test planted is byte-identical afterwards. And the store is
closed: its top is 0700, and an unpacked setuid file is out of other users' reach."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import stat
import subprocess
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from helpers import new_store, sysbake
from services import RegistryService

from sysbake.oci import model as oci
from sysbake.oci.model import Image, Layer
from sysbake.oci.store import Store
from tests.unit.conftest import crafted_tar, files_tar, image_config, put_image

pytestmark = pytest.mark.integration

SHADOW = Path("/etc/shadow")
ABSOLUTE = "/etc/sysbake-lay-hostile"  # what an absolute entry would create on the host
PLANTED = {"victim": b"precious\n", "sub/v": b"v\n"}
EXPORTS = (
    ("oci", None),
    ("oci-archive", None),
    ("docker-archive", None),
    ("rootfs", "xz"),  # one gzip layer to xz: the piped fast path
    ("rootfs", "none"),
)


@dataclass(frozen=True)
class Case:
    """A hostile layer: its uncompressed bytes, its blob, and what the refusal says."""

    plain: bytes
    blob: bytes
    problem: str


def _cases(planted: Path) -> dict[str, Case]:
    """The crafted layers; `planted` holds the host files they aim at."""
    plain = {
        "dotdot": (files_tar({"../../../../planted/victim": b"pwned"}), "'..' is not allowed"),
        "absolute": (files_tar({ABSOLUTE: b"pwned"}), "absolute names are not allowed"),
        "shadow-hardlink": (
            crafted_tar(("shadow", tarfile.LNKTYPE, {"linkname": str(SHADOW)})),
            f"hardlink target '{SHADOW}': absolute names",
        ),
        "planted-hardlink": (
            crafted_tar(("v", tarfile.LNKTYPE, {"linkname": str(planted / "victim")})),
            "absolute names are not allowed",
        ),
        "through-symlink": (
            crafted_tar(
                ("etc", tarfile.SYMTYPE, {"linkname": str(planted)}),
                ("etc/victim", tarfile.REGTYPE, {"data": b"pwned"}),
            ),
            "etc is a symlink: refusing to write through it",
        ),
        "block-device": (
            crafted_tar(
                ("dev/sda", tarfile.BLKTYPE, {"devmajor": 8, "devminor": 0, "mode": 0o666})
            ),
            "block device 8:0 is not allowed",
        ),
        "mem-device": (
            crafted_tar(("mem", tarfile.CHRTYPE, {"devmajor": 1, "devminor": 1, "mode": 0o666})),
            "character device 1:1 is not allowed",
        ),
        "not-a-tar": (b"#!/bin/sh\necho this is no tar\n" * 64, "not a valid tar"),
    }
    cases = {
        name: Case(data, gzip.compress(data, mtime=0), problem)
        for name, (data, problem) in plain.items()
    }
    junk = b"\x1f\x8b\x08\x00" + b"not deflate at all " * 64
    cases["not-gzip"] = Case(junk, junk, "not a valid gzip stream")
    return cases


# The config fields of the one-layer images the tests make (image_config, put_image).
ONE_LAYER: dict[str, Any] = {
    "config": {"Cmd": ["/sbin/init"]},
    "history": [{"created": "2026-01-01T00:00:00Z"}],
}


def _put(store: Store, case: Case, ref: str) -> Image:
    """The hostile layer as a one-layer image, tagged `ref`, written with the store API."""
    layer = Layer(store.put_bytes(case.blob, oci.MT_LAYER_GZIP), oci.sha256_digest(case.plain))
    return put_image(store, layer, ref=ref, **ONE_LAYER)


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[Path]:
    """Host files the layers aim at; afterwards they, /etc/shadow and /etc are unchanged."""
    root = tmp_path / "planted"
    for rel, content in PLANTED.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
    shadow = hashlib.sha256(SHADOW.read_bytes()).hexdigest()
    links = SHADOW.stat().st_nlink
    yield root
    for rel, content in PLANTED.items():
        assert (root / rel).read_bytes() == content
        assert (root / rel).stat().st_nlink == 1
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == ["sub", "sub/v", "victim"]
    assert hashlib.sha256(SHADOW.read_bytes()).hexdigest() == shadow
    assert SHADOW.stat().st_nlink == links
    assert not os.path.lexists(ABSOLUTE)


def _refused(result: subprocess.CompletedProcess[str], digest: str | None, problem: str) -> None:
    """A non-zero exit and one error line naming the layer (unless `digest` is None) and
    the problem."""
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("sysbake: error:")]
    assert len(errors) == 1, result.stderr
    assert digest is None or f"layer {digest}: " in errors[0], result.stderr
    assert problem in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def _no_trace(store: Store, diff_id: str) -> None:
    """Nothing of the layer is left: no tree, no checked marker, no staging."""
    assert not store.tree_path(diff_id).exists()
    assert not (store.checked_dir / oci.hex_of(diff_id)).exists()
    assert [p.name for p in store.tmp_dir.iterdir()] == []


# -- pulled from a registry ------------------------------------------------------------------


def _upload(registry: RegistryService, repo: str, data: bytes) -> str:
    """Push a blob with the distribution API (monolithic upload): no sysbake involved, so
    nothing on our side may refuse to send it."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    digest = oci.sha256_digest(data)
    start = urllib.request.Request(f"{registry.url}/v2/{repo}/blobs/uploads/", method="POST")
    with opener.open(start, timeout=30) as response:
        location = response.headers["Location"]
    if location.startswith("/"):
        location = registry.url + location
    sep = "&" if "?" in location else "?"
    put = urllib.request.Request(
        f"{location}{sep}digest={digest}",
        data=data,
        method="PUT",
        headers={"Content-Type": "application/octet-stream"},
    )
    with opener.open(put, timeout=30) as response:
        assert response.status == 201
    return digest


def _push(registry: RegistryService, repo: str, case: Case) -> str:
    """The hostile layer as a one-layer image at ADDR/repo:1; the layer's blob digest."""
    layer = _upload(registry, repo, case.blob)
    config = oci.canonical_json(image_config([oci.sha256_digest(case.plain)], **ONE_LAYER))
    manifest = oci.canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": oci.MT_MANIFEST,
            "config": {
                "mediaType": oci.MT_CONFIG,
                "digest": _upload(registry, repo, config),
                "size": len(config),
            },
            "layers": [{"mediaType": oci.MT_LAYER_GZIP, "digest": layer, "size": len(case.blob)}],
        }
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    put = urllib.request.Request(
        f"{registry.url}/v2/{repo}/manifests/1",
        data=manifest,
        method="PUT",
        headers={"Content-Type": oci.MT_MANIFEST},
    )
    with opener.open(put, timeout=30) as response:
        assert response.status == 201
    return layer


@pytest.mark.parametrize("name", sorted(_cases(Path("/nonexistent"))))
def test_a_pulled_hostile_layer_is_refused_and_tags_nothing(
    name: str, registry: RegistryService, planted: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    case = _cases(planted)[name]
    digest = _push(registry, f"lay-hostile-{name}", case)
    path = new_store(tmp_path / "store")
    result = sysbake(
        "pull", f"{registry.address}/lay-hostile-{name}:1", store=path, check=False, env=env
    )
    if name == "not-gzip":
        # The pull's own diff_id verification decompresses the blob first; it does not
        # name the layer (registry.py's _verify_diff_ids).
        _refused(result, None, "decompression failed")
    else:
        _refused(result, digest, case.problem)
    store = Store(path)
    assert store.tags() == []
    _no_trace(store, oci.sha256_digest(case.plain))


def test_a_pulled_setuid_file_is_out_of_other_users_reach(
    registry: RegistryService, tmp_path: Path, env: dict[str, str]
) -> None:
    """Setuid files are allowed in layers; the closed store keeps them root's."""
    plain = crafted_tar(
        ("bin", tarfile.DIRTYPE, {}),
        (
            "bin/rootshell",
            tarfile.REGTYPE,
            {"mode": 0o4755, "uid": 0, "gid": 0, "data": b"#!/bin/sh\nid\n"},
        ),
    )
    case = Case(plain, gzip.compress(plain, mtime=0), "")
    _push(registry, "lay-setuid", case)
    path = new_store(tmp_path / "store")
    os.chmod(path, 0o755)  # as stores were made before: the first command closes it
    sysbake("pull", f"{registry.address}/lay-setuid:1", store=path, env=env)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    store = Store(path)
    image = store.resolve(f"{registry.address}/lay-setuid:1")
    tree = store.layer_tree(image.layers[0])  # what `run` mounts
    _out_of_reach(path, tree / "bin/rootshell")


def _out_of_reach(store: Path, suid: Path) -> None:
    st = suid.stat()
    assert st.st_mode & stat.S_ISUID and st.st_uid == 0
    assert subprocess.run(["test", "-x", suid]).returncode == 0  # root reaches it
    for path in (suid, suid.parent, store / "trees", store / "containers", store / "tmp"):
        as_nobody = subprocess.run(
            ["runuser", "-u", "nobody", "--", "test", "-e", path], capture_output=True
        )
        assert as_nobody.returncode == 1, (path, as_nobody.stderr)
    assert subprocess.run(["runuser", "-u", "nobody", "--", "test", "-x", suid]).returncode == 1


# -- written into the store, then exported and run ------------------------------------------


@pytest.mark.parametrize("name", sorted(_cases(Path("/nonexistent"))))
def test_a_stored_hostile_layer_is_never_exported_nor_run(
    name: str, planted: Path, tmp_path: Path
) -> None:
    case = _cases(planted)[name]
    path = new_store(tmp_path / "store")
    store = Store(path).ensure()
    ref = f"lay-{name}:latest"
    image = _put(store, case, ref)
    digest, diff_id = image.layers[0].blob.digest, image.layers[0].diff_id
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for fmt, compression in EXPORTS:
        out = out_dir / f"{fmt}-{compression}"
        args: list[str | Path] = ["export", ref, "--format", fmt, "-o", out]
        if compression:
            args += ["--compression", compression]
        _refused(sysbake(*args, store=path, check=False), digest, case.problem)
        assert list(out_dir.iterdir()) == [], fmt  # no file, no temp file, no layout
    to_stdout = sysbake("export", ref, "--format", "rootfs", "-o", "-", store=path, check=False)
    _refused(to_stdout, digest, case.problem)
    assert to_stdout.stdout == ""  # not a byte of the archive
    result = sysbake("run", "-d", "--name", f"lay-{name}", ref, store=path, check=False)
    _refused(result, digest, case.problem)
    assert not (store.containers_dir / f"lay-{name}").exists()
    assert (
        str(path)
        not in subprocess.run(
            ["findmnt", "-rn", "-o", "TARGET"], capture_output=True, text=True
        ).stdout
    )
    _no_trace(store, diff_id)
    assert [t.ref for t in store.tags()] == [ref]  # the image stays, refused each time


def test_a_stored_setuid_file_is_out_of_other_users_reach(tmp_path: Path) -> None:
    path = new_store(tmp_path / "store")  # made 0755, as stores were
    plain = crafted_tar(
        ("usr", tarfile.DIRTYPE, {}),
        ("usr/rootshell", tarfile.REGTYPE, {"mode": 0o6755, "uid": 0, "gid": 0, "data": b"elf"}),
    )
    store = Store(path)  # opening it closes it
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    image = _put(store.ensure(), Case(plain, gzip.compress(plain, mtime=0), ""), "lay-suid")
    tree = store.layer_tree(image.layers[0])
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    _out_of_reach(path, tree / "usr/rootshell")
    # Its export is allowed: setuid bits are the image's own business.
    result = sysbake(
        "export",
        "lay-suid",
        "--format",
        "rootfs",
        "--compression",
        "none",
        "-o",
        tmp_path / "r.tar",
        store=path,
    )
    assert result.returncode == 0
    with tarfile.open(tmp_path / "r.tar") as tf:
        assert tf.getmember("usr/rootshell").mode == 0o6755


def test_the_store_command_line_closes_an_open_store(tmp_path: Path) -> None:
    path = new_store(tmp_path / "store")
    os.chmod(path, 0o755)
    sysbake("images", store=path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert json.loads(sysbake("images", "--json", store=path).stdout) == []
