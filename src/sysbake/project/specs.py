"""The values a loaded sysbake.toml is made of: frozen, hashable, with their cache inputs.

`key_inputs()` gives a JSON-able dict of everything a stage's cache key depends on except the
contents of files and trees (`input_paths()` lists those); paths appear relative to the project
so that moving a project keeps its caches. Mappings are key-sorted tuples of pairs.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from sysbake import signals
from sysbake.errors import ConfigError
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.project.reader import Pairs, did_you_mean, display_path, escaping_link, rel_path
from sysbake.records import field, fields, is_record, record

DEFAULT_CMD = ("/lib/systemd/systemd",)
DEFAULT_STOP_SIGNAL = signals.name(signals.SYSTEMD_STOP)  # "SIGRTMIN+3"
_MAP: dict[str, bool] = {"mapping": True}  # field metadata: a Pairs field shown as a table


def read_input(path: Path, within: Path) -> bytes:
    """The bytes of the input file `path` (a script, a pillar's top file) read on the host.
    Named inside `within`, it must resolve inside it: a symlink there to a host file is
    refused (ConfigError), never read; the file itself is opened without following links."""
    escape = escaping_link(within, path)
    if escape:
        raise ConfigError(
            f"{display_path(path)}: resolves outside {display_path(within)} "
            f"({escape}): sysbake does not read host files through a link"
        )
    real = os.path.realpath(path)
    try:
        # Checked before opening (a device may act on open) and after (it may be swapped).
        regular = stat.S_ISREG(os.lstat(real).st_mode)
        fd = (
            os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
            if regular
            else -1
        )
    except OSError as exc:
        raise ConfigError(f"{display_path(path)}: cannot read: {exc.strerror}") from None
    if fd < 0:
        raise ConfigError(f"{display_path(path)}: not a regular file")
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ConfigError(f"{display_path(path)}: not a regular file")
        return f.read()


@record(kw_only=True)
class BootstrapSpec:
    """How to make a root filesystem from scratch (mmdebstrap's inputs)."""

    distro: str
    suite: str
    mirror: str  # "" = the host's apt sources; "{snapshot}" already replaced
    components: tuple[str, ...]
    variant: str
    packages: tuple[str, ...]
    architecture: str  # "" = the host's
    snapshot: str
    keyring: Path | None
    hooks: tuple[Path, ...]
    security: bool
    root: Path = field(repr=False)

    def key_inputs(self) -> dict[str, object]:
        """The bootstrap stage's cache inputs (see the module docstring); `mirror` "" means
        the host's apt sources, which the stage itself must account for."""
        return {
            "distro": self.distro,
            "suite": self.suite,
            "mirror": self.mirror,
            "components": list(self.components),
            "variant": self.variant,
            "packages": sorted(set(self.packages)),
            "architecture": self.architecture,
            "snapshot": self.snapshot,
            "security": self.security,
            "keyring": rel_path(self.root, self.keyring) if self.keyring else None,
            "hooks": [rel_path(self.root, p) for p in self.hooks],
        }

    def input_paths(self) -> tuple[Path, ...]:
        """Files and trees whose contents the cache key must also cover."""
        return ((self.keyring,) if self.keyring else ()) + self.hooks


@record(kw_only=True)
class OciConfigSpec:
    """The OCI image config of the result, normalized by the reader (ports "N/tcp",
    the stop signal by its canonical name): what sysbake.build.finalize writes."""

    cmd: tuple[str, ...] = DEFAULT_CMD
    entrypoint: tuple[str, ...] = ()
    env: Pairs = field(default=(), metadata=_MAP)
    labels: Pairs = field(default=(), metadata=_MAP)
    ports: tuple[str, ...] = ()  # normalized "N/tcp" or "N/udp", sorted
    volumes: tuple[str, ...] = ()
    stop_signal: str = DEFAULT_STOP_SIGNAL
    workdir: str = "/"
    user: str = ""
    container: str = "oci"

    def key_inputs(self) -> dict[str, object]:
        """The config's cache inputs; set-like lists (volumes) are sorted."""
        return {
            "cmd": list(self.cmd),
            "entrypoint": list(self.entrypoint),
            "env": dict(self.env),
            "labels": dict(self.labels),
            "ports": list(self.ports),
            "volumes": sorted(set(self.volumes)),
            "stop_signal": self.stop_signal,
            "workdir": self.workdir,
            "user": self.user,
            "container": self.container,
        }


@record(kw_only=True)
class FinalizeSpec:
    """Clean-up applied to each layer before it is committed."""

    apt_lists: bool = True
    apt_cache: bool = True
    logs: bool = True
    ssh_host_keys: bool = True
    machine_id: bool = True
    tmp: bool = True
    salt: bool = True
    mask: tuple[str, ...] = ()
    unmask: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()

    def key_inputs(self) -> dict[str, object]:
        """The clean-up's cache inputs; unit and path lists are sets, hence sorted."""
        return {
            f.name: sorted(set(v)) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in fields(self)
        }


@record(kw_only=True)
class TestSpec:
    """What `sysbake test` checks in a booted container."""

    __test__ = False  # not a pytest test class despite the name

    timeout: float = 120.0
    commands: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    idempotence: bool = True

    def key_inputs(self) -> dict[str, object]:
        """What a cached test result would depend on (the image's digest aside)."""
        return {
            "timeout": self.timeout,
            "commands": list(self.commands),
            "units": sorted(set(self.units)),
            "ports": sorted(set(self.ports)),
            "idempotence": self.idempotence,
        }


@record(kw_only=True)
class _StepBase:
    type: ClassVar[str]
    index: int  # position in the image's provision list, from 1
    name: str
    mode: str = "boot"
    network: bool = True
    env: Pairs = field(default=(), metadata=_MAP)
    root: Path = field(repr=False)

    def _common_key(self) -> dict[str, object]:
        # The step's name is a label, not an input: renaming a step keeps its cache.
        return {
            "type": self.type,
            "mode": self.mode,
            "network": self.network,
            "env": dict(self.env),
        }

    def input_paths(self) -> tuple[Path, ...]:
        """Files and trees whose contents the cache key must also cover."""
        return ()


@record(kw_only=True)
class _SaltBase(_StepBase):
    grains_json: str = "{}"  # canonical JSON of the grains table (kept as text: hashable)
    salt_version: str = ""  # "" = sysbake's default
    keep_salt: bool = False

    @property
    def grains(self) -> dict[str, Any]:
        return dict(json.loads(self.grains_json))

    def _salt_key(self) -> dict[str, object]:
        return self._common_key() | {
            "grains": self.grains,
            "salt_version": self.salt_version,
            "keep_salt": self.keep_salt,
        }


@record(kw_only=True)
class SaltStep(_SaltBase):
    """Masterless salt-call with file_roots, pillar_roots, and a top file or an SLS list."""

    type: ClassVar[str] = "salt"
    state_tree: tuple[Path, ...]
    pillar: tuple[Path, ...] = ()
    sls: tuple[str, ...] = ()  # empty = highstate from top.sls

    def key_inputs(self) -> dict[str, object]:
        """The step's cache inputs; the trees' contents are left to the cache."""
        return self._salt_key() | {
            "state_tree": [rel_path(self.root, p) for p in self.state_tree],
            "pillar": [rel_path(self.root, p) for p in self.pillar],
            "sls": list(self.sls),
        }

    def input_paths(self) -> tuple[Path, ...]:
        return self.state_tree + self.pillar


@record(kw_only=True)
class ProjectStep(_SaltBase):
    """A project directory (its own salt/ and pillar/) deployed as /srv/projects/<project>."""

    type: ClassVar[str] = "project"
    path: Path
    project: str
    pillar: tuple[Path, ...] = ()  # global pillar roots the project's pillar is merged over

    @property
    def state_tree(self) -> Path:
        return self.path / "salt"

    @property
    def project_pillar(self) -> Path | None:
        return self.path / "pillar" if (self.path / "pillar").is_dir() else None

    def key_inputs(self) -> dict[str, object]:
        """The step's cache inputs; the project tree's contents are left to the cache."""
        return self._salt_key() | {
            "path": rel_path(self.root, self.path),
            "project": self.project,
            "pillar": [rel_path(self.root, p) for p in self.pillar],
        }

    def input_paths(self) -> tuple[Path, ...]:
        return (self.path, *self.pillar)


@record(kw_only=True)
class ScriptStep(_StepBase):
    """A shell script (a file or inline `run` text) executed inside the image."""

    type: ClassVar[str] = "script"
    script: Path | None = None
    run: str = ""

    def body(self) -> bytes:
        """What the step runs: the script file's bytes (see `read_input`) or the `run` text."""
        return read_input(self.script, self.root) if self.script else self.run.encode()

    def key_inputs(self) -> dict[str, object]:
        """The step's cache inputs; the script's contents are left to the cache."""
        script = rel_path(self.root, self.script) if self.script else None
        return self._common_key() | {"run": self.run, "script": script}

    def input_paths(self) -> tuple[Path, ...]:
        return (self.script,) if self.script else ()


@record(kw_only=True)
class FilesStep(_StepBase):
    """A file or tree copied into the image. It runs nothing, hence no boot and no network;
    its TOML `mode` key is the octal file mode (`file_mode` here)."""

    type: ClassVar[str] = "files"
    mode: str = "chroot"
    network: bool = False
    source: Path
    dest: str = "/"
    owner: str = "root"
    group: str = "root"
    file_mode: int | None = None  # applied to files; directories keep theirs

    def key_inputs(self) -> dict[str, object]:
        """The step's cache inputs; the source's contents are left to the cache."""
        mode = None if self.file_mode is None else f"{self.file_mode:04o}"
        return {
            "type": self.type,
            "source": rel_path(self.root, self.source),
            "dest": self.dest,
            "owner": self.owner,
            "group": self.group,
            "mode": mode,
        }

    def input_paths(self) -> tuple[Path, ...]:
        return (self.source,)


Step = SaltStep | ProjectStep | ScriptStep | FilesStep


SQUASH_STAGE = "squash"  # the stage of a `squash = true` image that merges its layers


@record(kw_only=True)
class ImageSpec:
    """One image of the project: its parent (or bootstrap), steps, clean-up and config."""

    name: str
    tag: str
    parent: str | None  # an image of this file, or a store ref; None with a bootstrap
    parent_is_local: bool
    bootstrap: BootstrapSpec | None
    config: OciConfigSpec
    finalize: FinalizeSpec
    provision: tuple[Step, ...]
    test: TestSpec
    description: str = ""
    squash: bool = False  # the image carries one layer: its stages' result, merged
    rootfs: Path | None = None  # `from = "rootfs:FILE"`: the tarball it starts from

    def key_inputs(self) -> dict[str, object]:
        """Everything that shapes the image (not its tag, name or tests); a local parent is
        named here and stands for its digest in the cache's own key."""
        inputs: dict[str, object] = {
            "parent": self.parent,
            "parent_is_local": self.parent_is_local,
            "bootstrap": self.bootstrap.key_inputs() if self.bootstrap else None,
            "provision": [s.key_inputs() for s in self.provision],
            "finalize": self.finalize.key_inputs(),
            "config": self.config.key_inputs(),
            "description": self.description,
            "squash": self.squash,
        }
        if self.rootfs is not None:  # named here; its content keys the import stage
            inputs["rootfs"] = self.rootfs.name
        return inputs


def cache_repository(text: str) -> Reference:
    """`text` as the repository a build's stages are pushed to (`--cache-to`,
    `[build] cache_to`): host[:port]/repository, without a tag or digest (each stage is
    tagged there by its key); InvalidReference saying what was expected otherwise."""
    ref = Reference.parse(text, need_registry=True)
    last = text.partition("@")[0].rsplit("/", 1)[-1]
    if ref.digest or ":" in last:
        raise InvalidReference(
            text,
            "expected host[:port]/repository without a tag or digest "
            "(stages are tagged there by their keys)",
        )
    return ref


@record(kw_only=True)
class BuildSettings:
    """The project's [build] table: the registry stage caches its builds read and write
    (the command line's --cache-from and --cache-to replace them)."""

    cache_from: tuple[str, ...] = ()  # images or cache repositories, as written
    cache_to: str = ""  # a cache repository (see cache_repository), "" for none


@record(kw_only=True)
class Project:
    """A loaded sysbake.toml."""

    path: Path  # the file
    root: Path  # its directory; relative paths in the file are relative to it
    name: str
    images: tuple[ImageSpec, ...]
    build: BuildSettings = field(default_factory=BuildSettings)

    def image(self, name: str) -> ImageSpec:
        """The image called `name` (or tagged `name`); ConfigError when there is none."""
        for spec in self.images:
            if name in (spec.name, spec.tag):
                return spec
        names = [i.name for i in self.images]
        raise ConfigError(
            f"{display_path(self.path)}: no image {name!r} in this file"
            f"{did_you_mean(name, names)} (images: {', '.join(names)})"
        )

    def build_order(self, targets: Sequence[str] | None = None) -> list[ImageSpec]:
        """The targets (default: all) and their in-file ancestors, each after its parent."""
        order: list[ImageSpec] = []
        for target in targets if targets is not None else [i.name for i in self.images]:
            chain = [self.image(target)]
            while chain[-1].parent_is_local and chain[-1].parent is not None:
                chain.append(self.image(chain[-1].parent))
            done = {spec.name for spec in order}
            order.extend(spec for spec in reversed(chain) if spec.name not in done)
        return order

    def to_json(self) -> dict[str, Any]:
        """The project with defaults filled in and absolute paths (`validate --json`)."""
        return dict(_jsonable(self))


def _jsonable(value: object) -> Any:
    if is_record(value) and not isinstance(value, type):
        out: dict[str, Any] = {"type": value.type} if isinstance(value, _StepBase) else {}
        for f in fields(value):
            item = getattr(value, f.name)
            if not f.repr:  # the project root repeated in every spec
                continue
            if f.name == "grains_json":
                out["grains"] = json.loads(item)
            else:
                out[f.name] = dict(item) if f.metadata.get("mapping") else _jsonable(item)
        return out
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return str(value) if isinstance(value, Path) else value
