"""The project file, sysbake.toml: loaded, validated, and exposed as frozen values.

Every error is one line, `<file>: <dotted.key>: <what was expected>`. Array items are numbered
from 1 (`provision[1]` is the first step, whose default name is `salt-1`). Mappings are stored
as key-sorted tuples of pairs so that every value stays hashable.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import signal
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import date, datetime, time
from pathlib import Path
from typing import Any, ClassVar

from sysbake.errors import ConfigError

PROJECT_FILE = "sysbake.toml"
DEFAULT_CMD = ("/lib/systemd/systemd",)
DEFAULT_STOP_SIGNAL = "SIGRTMIN+3"
DISTROS = ("debian", "ubuntu")
VARIANTS = ("extract", "custom", "essential", "apt", "required", "minbase", "buildd",
            "important", "debootstrap", "standard")
STEP_TYPES = ("salt", "project", "script", "files")
MODES = ("boot", "chroot")
IMAGE_NAME = r"[a-z0-9][a-z0-9._-]*"

Pairs = tuple[tuple[str, str], ...]
Check = Callable[[str], str]
_MAP: dict[str, bool] = {"mapping": True}  # field metadata: a Pairs field rendered as a table


# ---------------------------------------------------------------- values


def _rel(root: Path, path: Path) -> str:
    """A path as cache keys see it: relative to the project when inside it, so moving the
    project keeps its caches."""
    if path == root or root in path.parents:
        return path.relative_to(root).as_posix()
    return path.as_posix()


@dataclass(frozen=True, kw_only=True)
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
        return {"distro": self.distro, "suite": self.suite, "mirror": self.mirror,
                "components": list(self.components), "variant": self.variant,
                "packages": sorted(set(self.packages)), "architecture": self.architecture,
                "snapshot": self.snapshot, "security": self.security,
                "keyring": _rel(self.root, self.keyring) if self.keyring else None,
                "hooks": [_rel(self.root, p) for p in self.hooks]}

    def input_paths(self) -> tuple[Path, ...]:
        """Files and trees whose contents the cache key must also cover."""
        return ((self.keyring,) if self.keyring else ()) + self.hooks


@dataclass(frozen=True, kw_only=True)
class OciConfigSpec:
    """The OCI image config of the result."""

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
        return {"cmd": list(self.cmd), "entrypoint": list(self.entrypoint),
                "env": dict(self.env), "labels": dict(self.labels), "ports": list(self.ports),
                "volumes": sorted(set(self.volumes)), "stop_signal": self.stop_signal,
                "workdir": self.workdir, "user": self.user, "container": self.container}


@dataclass(frozen=True, kw_only=True)
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
        return {f.name: sorted(set(v)) if isinstance(v := getattr(self, f.name), tuple) else v
                for f in fields(self)}


@dataclass(frozen=True, kw_only=True)
class TestSpec:
    """What `sysbake test` checks in a booted container."""

    __test__ = False  # not a pytest test class despite the name

    timeout: float = 120.0
    commands: tuple[str, ...] = ()
    units: tuple[str, ...] = ()
    ports: tuple[int, ...] = ()
    idempotence: bool = True

    def key_inputs(self) -> dict[str, object]:
        return {"timeout": self.timeout, "commands": list(self.commands),
                "units": sorted(set(self.units)), "ports": sorted(set(self.ports)),
                "idempotence": self.idempotence}


@dataclass(frozen=True, kw_only=True)
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
        return {"type": self.type, "mode": self.mode, "network": self.network,
                "env": dict(self.env)}

    def input_paths(self) -> tuple[Path, ...]:
        """Files and trees whose contents the cache key must also cover."""
        return ()


@dataclass(frozen=True, kw_only=True)
class _SaltBase(_StepBase):
    grains_json: str = "{}"  # canonical JSON of the grains table (kept as text: hashable)
    salt_version: str = ""  # "" = sysbake's default
    keep_salt: bool = False

    @property
    def grains(self) -> dict[str, Any]:
        return dict(json.loads(self.grains_json))

    def _salt_key(self) -> dict[str, object]:
        return self._common_key() | {"grains": self.grains, "salt_version": self.salt_version,
                                     "keep_salt": self.keep_salt}


@dataclass(frozen=True, kw_only=True)
class SaltStep(_SaltBase):
    """Masterless salt-call with file_roots, pillar_roots, and a top file or an SLS list."""

    type: ClassVar[str] = "salt"
    state_tree: tuple[Path, ...]
    pillar: tuple[Path, ...] = ()
    sls: tuple[str, ...] = ()  # empty = highstate from top.sls

    def key_inputs(self) -> dict[str, object]:
        return self._salt_key() | {
            "state_tree": [_rel(self.root, p) for p in self.state_tree],
            "pillar": [_rel(self.root, p) for p in self.pillar], "sls": list(self.sls)}

    def input_paths(self) -> tuple[Path, ...]:
        return self.state_tree + self.pillar


@dataclass(frozen=True, kw_only=True)
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
        return self._salt_key() | {"path": _rel(self.root, self.path), "project": self.project,
                                   "pillar": [_rel(self.root, p) for p in self.pillar]}

    def input_paths(self) -> tuple[Path, ...]:
        return (self.path, *self.pillar)


@dataclass(frozen=True, kw_only=True)
class ScriptStep(_StepBase):
    """A shell script (a file or inline `run` text) executed inside the image."""

    type: ClassVar[str] = "script"
    script: Path | None = None
    run: str = ""

    def key_inputs(self) -> dict[str, object]:
        return self._common_key() | {"run": self.run,
                                     "script": _rel(self.root, self.script) if self.script else None}

    def input_paths(self) -> tuple[Path, ...]:
        return (self.script,) if self.script else ()


@dataclass(frozen=True, kw_only=True)
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
        mode = None if self.file_mode is None else f"{self.file_mode:04o}"
        return {"type": self.type, "source": _rel(self.root, self.source), "dest": self.dest,
                "owner": self.owner, "group": self.group, "mode": mode}

    def input_paths(self) -> tuple[Path, ...]:
        return (self.source,)


Step = SaltStep | ProjectStep | ScriptStep | FilesStep


@dataclass(frozen=True, kw_only=True)
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

    def key_inputs(self) -> dict[str, object]:
        """Everything that shapes the image (not its tag, name or tests); a local parent is
        named here and stands for its digest in the cache's own key."""
        return {"parent": self.parent, "parent_is_local": self.parent_is_local,
                "bootstrap": self.bootstrap.key_inputs() if self.bootstrap else None,
                "provision": [s.key_inputs() for s in self.provision],
                "finalize": self.finalize.key_inputs(), "config": self.config.key_inputs(),
                "description": self.description}


@dataclass(frozen=True, kw_only=True)
class Project:
    """A loaded sysbake.toml."""

    path: Path  # the file
    root: Path  # its directory; relative paths in the file are relative to it
    name: str
    images: tuple[ImageSpec, ...]

    def image(self, name: str) -> ImageSpec:
        """The image called `name` (or tagged `name`); ConfigError when there is none."""
        for spec in self.images:
            if name in (spec.name, spec.tag):
                return spec
        names = [i.name for i in self.images]
        raise ConfigError(f"{_display(self.path)}: no image {name!r} in this file"
                          f"{_did_you_mean(name, names)} (images: {', '.join(names)})")

    def build_order(self, targets: Sequence[str] | None = None) -> list[ImageSpec]:
        """The targets (default: all) and their in-file ancestors, each after its parent."""
        order: list[ImageSpec] = []
        for target in targets if targets is not None else [i.name for i in self.images]:
            chain = [self.image(target)]
            while chain[-1].parent_is_local and chain[-1].parent is not None:
                chain.append(self.image(chain[-1].parent))
            order.extend(spec for spec in reversed(chain) if spec not in order)
        return order

    def to_json(self) -> dict[str, Any]:
        """The project with defaults filled in and absolute paths (`validate --json`)."""
        return dict(_to_json(self))


def _to_json(value: object) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        out: dict[str, Any] = {"type": value.type} if isinstance(value, _StepBase) else {}
        for f in fields(value):
            item = getattr(value, f.name)
            if f.name == "root":
                continue
            if f.name == "grains_json":
                out["grains"] = json.loads(item)
            else:
                out[f.name] = dict(item) if f.metadata.get("mapping") else _to_json(item)
        return out
    if isinstance(value, tuple):
        return [_to_json(v) for v in value]
    return str(value) if isinstance(value, Path) else value


# ---------------------------------------------------------------- reading TOML tables


class _Invalid(Exception):
    """A value is wrong; the reader prefixes the file and the key."""


_MISSING: Any = object()
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(parent: str, name: str) -> str:
    part = name if _BARE_KEY.fullmatch(name) else json.dumps(name)
    return f"{parent}.{part}" if parent else part


def _got(value: object) -> str:
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{'integer' if isinstance(value, int) else 'float'} {value}"
    if isinstance(value, str):
        text = json.dumps(value)
        return f"string {text if len(text) <= 60 else text[:57] + '...'}"
    if isinstance(value, datetime | date | time):
        return f"{type(value).__name__} {value.isoformat()}"
    return "an array" if isinstance(value, list) else "a table"


def _did_you_mean(name: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _display(path: Path) -> str:
    """The file as the user would type it: relative to the current directory when inside it."""
    cwd = Path.cwd()
    return _rel(cwd, path) if cwd in path.parents else str(path)


@dataclass(frozen=True)
class _Source:
    display: str
    root: Path

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.display}: {key}: {message}")


class _Reader:
    """A TOML table being read: refuses unknown keys up front, then hands out typed values."""

    def __init__(self, src: _Source, key: str, data: object, allowed: Sequence[str]) -> None:
        if not isinstance(data, dict):
            raise src.error(key, f"expected a table, got {_got(data)}")
        for name in data:
            if name not in allowed:
                close = _did_you_mean(name, allowed).strip(" ()")
                hint = f", {close}" if close else ""
                raise src.error(_join(key, name), f"unknown key{hint} (expected one of: "
                                                  f"{', '.join(sorted(allowed))})")
        self.src, self.key, self.data = src, key, data

    def at(self, name: str) -> str:
        return _join(self.key, name)

    def fail(self, name: str, message: str) -> ConfigError:
        return self.src.error(self.at(name), message)

    def has(self, name: str) -> bool:
        return name in self.data

    def get(self, name: str, kinds: tuple[type, ...], what: str, default: Any = _MISSING) -> Any:
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise self.fail(name, f"missing: expected {what}")
            return default
        if not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds:
            raise self.fail(name, f"expected {what}, got {_got(value)}")
        return value

    def checked(self, key: str, value: Any, check: Callable[[Any], Any] | None) -> Any:
        try:
            return check(value) if check else value
        except _Invalid as exc:
            raise self.src.error(key, str(exc)) from None

    def string(self, name: str, default: str | None = "", check: Check | None = None) -> str:
        value = self.get(name, (str,), "a string", _MISSING if default is None else default)
        return str(self.checked(self.at(name), value, check)) if self.has(name) else value

    def boolean(self, name: str, default: bool) -> bool:
        return bool(self.get(name, (bool,), "a boolean (true or false)", default))

    def items(self, name: str, check: Callable[[Any], Any] | None = None,
              kinds: tuple[type, ...] = (str,), what: str = "a string") -> tuple[Any, ...]:
        """An array of scalars, each type-checked and passed through `check`."""
        out = []
        for i, item in enumerate(self.get(name, (list,), f"an array of {what}s", []), 1):
            key = f"{self.at(name)}[{i}]"
            if not isinstance(item, kinds) or isinstance(item, bool) and bool not in kinds:
                raise self.src.error(key, f"expected {what}, got {_got(item)}")
            out.append(self.checked(key, item, check))
        return tuple(out)

    def mapping(self, name: str, check_key: Check | None = None,
                default: Pairs = ()) -> Pairs:
        if not self.has(name):
            return default
        out = []
        for k, v in self.get(name, (dict,), "a table of strings").items():
            key = _join(self.at(name), k)
            if not isinstance(v, str):
                raise self.src.error(key, f"expected a string, got {_got(v)}")
            out.append((self.checked(key, k, check_key), v))
        return tuple(sorted(out))

    def table(self, name: str, allowed: Sequence[str]) -> _Reader:
        return _Reader(self.src, self.at(name), self.data.get(name, {}), allowed)

    def paths(self, name: str, kind: str, required: bool = False) -> tuple[Path, ...]:
        """A path or an array of paths, relative to the project, that must exist as `kind`."""
        value = self.data.get(name)
        if isinstance(value, str) or value is None and required:
            found: tuple[str, ...] = (self.string(name, default=None),)
            keys = [self.at(name)]
        else:
            found = self.items(name, what="a path")
            keys = [f"{self.at(name)}[{i}]" for i in range(1, len(found) + 1)]
        return tuple(self.checked(k, v, _existing(self.src.root, kind))
                     for k, v in zip(keys, found, strict=True))

    def path(self, name: str, kind: str, required: bool = False) -> Path | None:
        if not required and not self.has(name):
            return None
        value = self.get(name, (str,), "a path (a string)")
        return Path(self.checked(self.at(name), value, _existing(self.src.root, kind)))


# ---------------------------------------------------------------- value checks


def _pattern(regex: str, what: str) -> Check:
    compiled = re.compile(regex)

    def check(value: str) -> str:
        if not compiled.fullmatch(value):
            raise _Invalid(f"expected {what}, got {_got(value)}")
        return value
    return check


def _choice(*options: str) -> Check:
    def check(value: str) -> str:
        if value not in options:
            raise _Invalid(f"expected one of {', '.join(map(json.dumps, options))}, got "
                           f"{_got(value)}{_did_you_mean(value, options)}")
        return value
    return check


def _existing(root: Path, kind: str) -> Callable[[str], Path]:
    def check(value: str) -> Path:
        if not value:
            raise _Invalid("expected a path, got an empty string")
        path = Path(os.path.normpath(root / value))
        ok = {"dir": path.is_dir, "file": path.is_file, "any": path.exists}[kind]()
        if not ok:
            noun = {"dir": "directory", "file": "file", "any": "file or directory"}[kind]
            raise _Invalid(f"{noun} not found: {path}" if not path.exists()
                           else f"not a {noun}: {path}")
        return path
    return check


def _absolute(value: str) -> str:
    if not value.startswith("/") or ".." in value.split("/"):
        raise _Invalid(f"expected an absolute path without '..', got {_got(value)}")
    return value


def _removable(value: str) -> str:
    if _absolute(value).strip("/") == "":
        raise _Invalid("refusing to remove '/'")
    return value


_UNIT_SUFFIXES = ("service", "socket", "target", "timer", "mount", "automount", "path", "swap",
                  "slice", "scope", "device")


def _unit(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9:_.\\@-]+", value):
        raise _Invalid(f"expected a systemd unit name, got {_got(value)}")
    # As systemctl does: a name without a unit type means a service.
    return value if value.rsplit(".", 1)[-1] in _UNIT_SUFFIXES else f"{value}.service"


def _port(value: int | str) -> str:
    match = re.fullmatch(r"(\d+)(?:/(tcp|udp))?", str(value))
    if not match or not 1 <= int(match[1]) <= 65535:
        raise _Invalid(f'expected a port like 80, "80/tcp" or "53/udp", got {_got(value)}')
    return f"{int(match[1])}/{match[2] or 'tcp'}"


def _tcp_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise _Invalid(f"expected a port number in 1..65535, got {_got(value)}")
    return value


def _stop_signal(value: int | str) -> str:
    rt_span = signal.SIGRTMAX - signal.SIGRTMIN
    text = str(value).strip().upper()
    if text.isdigit() and 1 <= int(text) < signal.NSIG:
        return str(int(text))
    text = text if text.startswith("SIG") else f"SIG{text}"
    if text in signal.Signals.__members__:
        return text
    match = re.fullmatch(r"SIGRT(MIN\+|MAX-)(\d+)", text)
    if match and int(match[2]) <= rt_span:
        return f"SIGRT{match[1]}{int(match[2])}" if int(match[2]) else text[:-2]
    raise _Invalid(f'expected a signal name like "SIGTERM" or "SIGRTMIN+3", or a number in '
                   f"1..{signal.NSIG - 1}, got {_got(value)}")


def _owner(value: int | str) -> str:
    if isinstance(value, int) and value >= 0 or re.fullmatch(r"[a-z_][a-z0-9_.-]*\$?|\d+",
                                                               str(value)):
        return str(value)
    raise _Invalid(f"expected a user/group name or a number, got {_got(value)}")


def _file_mode(value: str) -> int:
    if not re.fullmatch(r"0?[0-7]{3,4}", value) or int(value, 8) > 0o7777:
        raise _Invalid(f'expected an octal string like "0644", got {_got(value)}')
    return int(value, 8)


def _frozen_json(value: object) -> object:
    """TOML values as JSON values (dates become ISO strings)."""
    if isinstance(value, dict):
        return {k: _frozen_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_frozen_json(v) for v in value]
    return value.isoformat() if isinstance(value, datetime | date | time) else value


_REF_NAME = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REF_HOST = r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)*(?::\d+)?/)?"
_REF_TAG = r"[\w][\w.-]{0,127}"
_REF = re.compile(rf"{_REF_HOST}{_REF_NAME}(?:/{_REF_NAME})*(?::{_REF_TAG})?")
_DIGEST = r"@sha256:[0-9a-f]{64}"
_NAME_CHECK = _pattern(IMAGE_NAME, f"a name matching {IMAGE_NAME}")
_PATTERN_ENV = _pattern(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")
_NOSPACE = _pattern(r"[^\s,]+", "a word without spaces or commas")


def _tag(value: str) -> str:
    if not _REF.fullmatch(value):
        raise _Invalid(f'expected an image reference like "web:latest", got {_got(value)}')
    return value if ":" in value.rsplit("/", 1)[-1] else f"{value}:latest"


def _parent_ref(value: str) -> str:
    if not re.fullmatch(rf"{_REF.pattern}(?:{_DIGEST})?", value):
        raise _Invalid(f'expected an image of this file or a reference like "debian:bookworm",'
                       f" got {_got(value)}")
    return value
