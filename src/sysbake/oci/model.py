"""OCI image-spec values: media types, descriptors, canonical JSON, chain IDs, this host's
platform."""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import re
from typing import Any, NamedTuple

MT_INDEX = "application/vnd.oci.image.index.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

LAYER_COMPRESSION = {
    MT_LAYER: "none",
    MT_LAYER_GZIP: "gzip",
    MT_LAYER_ZSTD: "zstd",
    MT_DOCKER_LAYER_GZIP: "gzip",
}
LAYER_MEDIA_TYPE = {"none": MT_LAYER, "gzip": MT_LAYER_GZIP, "zstd": MT_LAYER_ZSTD}

ANN_REF_NAME = "org.opencontainers.image.ref.name"
ANN_CREATED = "org.opencontainers.image.created"

_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no insignificant white space."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_digest(data: bytes) -> str:
    """The digest of `data`: by CPython's own SHA-256 when small, which spares the commands
    that hash a few KB of JSON the loading of OpenSSL (sysbake.commands: start-up)."""
    new = _builtin_sha256() if len(data) < 1 << 20 else None
    if new is None:
        import hashlib

        new = hashlib.sha256
    return "sha256:" + new(data).hexdigest()


@functools.cache
def _builtin_sha256() -> Any:
    for name in ("_sha256", "_sha2"):  # Python 3.11, 3.12+
        with contextlib.suppress(ImportError, AttributeError):
            return importlib.import_module(name).sha256
    return None


def is_digest(value: str) -> bool:
    return bool(_DIGEST_RE.match(value))


def hex_of(digest: str) -> str:
    """The hex part of 'sha256:<hex>' (validated: it is used in file names)."""
    if not is_digest(digest):
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return digest.split(":", 1)[1]


def chain_id(diff_ids: list[str] | tuple[str, ...]) -> str:
    """The OCI ChainID of a stack of layers (identifies the whole stack, bottom to top)."""
    chain = ""
    for diff_id in diff_ids:
        chain = diff_id if not chain else sha256_digest(f"{chain} {diff_id}".encode())
    return chain


# platform.machine() -> (architecture, variant) in OCI terms; other machines keep their name.
_MACHINE_ARCH = {
    "x86_64": ("amd64", None),
    "aarch64": ("arm64", None),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", None),
    "i386": ("386", None),
    "ppc64le": ("ppc64le", None),
    "s390x": ("s390x", None),
    "riscv64": ("riscv64", None),
}


def host_platform() -> tuple[str, str, str | None]:
    """(os, architecture, variant) of this machine in OCI terms."""
    import platform  # only where an index is read: every command loads this module

    machine = platform.machine()
    arch, variant = _MACHINE_ARCH.get(machine, (machine, None))
    return "linux", arch, variant


class Descriptor(NamedTuple):
    """An OCI content descriptor."""

    media_type: str
    digest: str
    size: int
    annotations: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Descriptor:
        return cls(
            media_type=str(data["mediaType"]),
            digest=str(data["digest"]),
            size=int(data["size"]),
            annotations=tuple(sorted((data.get("annotations") or {}).items())),
        )

    def annotation(self, key: str) -> str | None:
        return dict(self.annotations).get(key)

    def with_annotations(self, **items: str) -> Descriptor:
        merged = dict(self.annotations) | items
        return Descriptor(self.media_type, self.digest, self.size, tuple(sorted(merged.items())))


class Layer(NamedTuple):
    """A stored layer: its compressed blob and the digest of its uncompressed tar."""

    blob: Descriptor
    diff_id: str

    @property
    def compression(self) -> str:
        return LAYER_COMPRESSION.get(self.blob.media_type, "gzip")


class Image(NamedTuple):
    """An image as stored: manifest descriptor, its config document and its layers."""

    manifest: Descriptor
    config_descriptor: Descriptor
    config: dict[str, Any]
    layers: tuple[Layer, ...]

    @property
    def id(self) -> str:
        """Docker-style image ID: the config digest."""
        return self.config_descriptor.digest

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return tuple(layer.diff_id for layer in self.layers)

    @property
    def size(self) -> int:
        return sum(layer.blob.size for layer in self.layers) + self.config_descriptor.size
