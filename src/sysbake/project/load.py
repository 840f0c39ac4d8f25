"""The project file, sysbake.toml: loaded, validated, and exposed as frozen values.

Every error is one line, `<file>: <dotted.key>: <what was expected>`. Array items are numbered
from 1 (`provision[1]` is the first step, whose default name is `salt-1`).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from sysbake.errors import ConfigError
from sysbake.oci.reference import InvalidReference, Reference
from sysbake.project import reader as check
from sysbake.project.reader import Reader, Source, display_path, got, join_key, rel_path
from sysbake.project.specs import (
    DEFAULT_CMD,
    DEFAULT_STOP_SIGNAL,
    SQUASH_STAGE,
    BootstrapSpec,
    BuildSettings,
    FilesStep,
    FinalizeSpec,
    ImageSpec,
    OciConfigSpec,
    Project,
    ProjectStep,
    SaltStep,
    ScriptStep,
    Step,
    TestSpec,
    cache_repository,
)

__all__ = [
    "DEFAULT_CMD",
    "DEFAULT_STOP_SIGNAL",
    "PROJECT_FILE",
    "BootstrapSpec",
    "FilesStep",
    "FinalizeSpec",
    "ImageSpec",
    "OciConfigSpec",
    "Project",
    "ProjectStep",
    "SaltStep",
    "ScriptStep",
    "Step",
    "TestSpec",
    "find_project_file",
    "load_project",
]

PROJECT_FILE = "sysbake.toml"
IMAGE_NAME = r"[a-z0-9][a-z0-9._-]*"
DISTROS = ("debian", "ubuntu")
VARIANTS = (
    "extract",
    "custom",
    "essential",
    "apt",
    "required",
    "minbase",
    "buildd",
    "important",
    "debootstrap",
    "standard",
)
STEP_TYPES = ("salt", "project", "script", "files")
ROOTFS_PREFIX = "rootfs:"  # `from = "rootfs:FILE"`: a root filesystem tarball as the base
MODES = ("boot", "chroot")

_IMAGE_KEYS = (
    "tag",
    "from",
    "description",
    "bootstrap",
    "config",
    "finalize",
    "provision",
    "test",
    "squash",
)
_BOOTSTRAP_KEYS = (
    "distro",
    "suite",
    "mirror",
    "components",
    "variant",
    "packages",
    "architecture",
    "snapshot",
    "keyring",
    "hooks",
    "security",
)
_CONFIG_KEYS = (
    "cmd",
    "entrypoint",
    "env",
    "labels",
    "ports",
    "volumes",
    "stop_signal",
    "workdir",
    "user",
    "container",
)
_FINALIZE_KEYS = (
    "apt_lists",
    "apt_cache",
    "logs",
    "ssh_host_keys",
    "machine_id",
    "tmp",
    "salt",
    "mask",
    "unmask",
    "remove",
)
_TEST_KEYS = ("timeout", "commands", "units", "ports", "idempotence")
_BUILD_KEYS = ("cache_from", "cache_to")
_STEP = ("type", "name", "mode", "network", "env")
_SALTY = ("grains", "salt_version", "keep_salt")
_STEP_KEYS = {
    "salt": (*_STEP, *_SALTY, "state_tree", "pillar", "sls"),
    "project": (*_STEP, *_SALTY, "path", "project", "pillar"),
    "script": (*_STEP, "script", "run"),
    # Copying runs nothing: no boot mode, network or env; `mode` is the file mode.
    "files": ("type", "name", "source", "dest", "owner", "group", "mode"),
}

_image_name = check.pattern(IMAGE_NAME, f"an image name matching {IMAGE_NAME}")
_word = check.pattern(r"[A-Za-z0-9][A-Za-z0-9_.-]*", "a name of letters, digits, '.', '_', '-'")
_env_name = check.pattern(r"[A-Za-z_][A-Za-z0-9_]*", "an environment variable name")
_nonempty = check.pattern(r"(?s).*\S.*", "a non-empty string")


def find_project_file(start: Path) -> Path:
    """The absolute path of the project file: `start` itself, or `start`/sysbake.toml when
    `start` is a directory. Parent directories are not searched."""
    path = Path(os.path.abspath(start))
    if path.is_dir():
        if not (path / PROJECT_FILE).is_file():
            raise ConfigError(f"no {PROJECT_FILE} in {path} (run 'sysbake init')")
        return path / PROJECT_FILE
    if not path.exists():
        raise ConfigError(f"{display_path(path)}: no such file or directory")
    return path


def load_project(path: Path | None = None) -> Project:
    """Load and validate a project file (or the sysbake.toml of a directory; default: the
    current directory's). Raises ConfigError naming the file, the key and what was expected."""
    file = find_project_file(Path.cwd() if path is None else path)
    display = display_path(file)
    try:
        text = file.read_bytes().decode()
        _check_nesting(display, text)
        data = tomllib.loads(text)
    except OSError as exc:
        raise ConfigError(f"{display}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{display}: not UTF-8 text (byte {exc.start})") from None
    except RecursionError:
        # Only if the scan missed a nesting: the parser recurses once per level.
        raise ConfigError(
            f"{display}: nested too deeply (expected at most {MAX_NESTING} "
            "levels of arrays, tables or dotted keys)"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        match = re.fullmatch(r"(?s)(.*) \(at (line \d+, column \d+|end of document)\)", str(exc))
        where, what = (
            (match[2].replace("end of document", "end of file"), match[1])
            if match
            else ("syntax", str(exc))
        )
        raise ConfigError(f"{display}: {where}: {what}") from None
    return _project(Source(display, file.parent), file, data)


# Python's TOML parser recurses once per level of arrays and inline tables (it crashes near
# 350 levels) and keeps every prefix of a dotted key (100,000 parts exhaust the memory), so
# deeper nesting is refused before parsing; no project needs a tenth of it.
MAX_NESTING = 100
# Strings match up to their end or, unterminated, to the end of the text or line: a scan
# never backtracks over the rest of the text (quadratic on a line of escaped quotes).
_TOML_TOKEN = re.compile(
    r'''
    """(?:[^\\]|\\.)*?(?:"""(?:""?)?|\Z)  # multi-line basic string
  | \'\'\'.*?(?:\'\'\'(?:\'\'?)?|\Z)     # multi-line literal string
  | "(?:[^"\\\n]|\\.)*"?               # basic string
  | '[^'\n]*'?                         # literal string
  | (?P<comment>\#[^\n]*)
  | (?P<space>[ \t]+)
  | (?P<bare>[A-Za-z0-9_+:-]+)         # a bare key or value
  | (?P<open>[\[{]) | (?P<close>[\]}]) | (?P<dot>\.) | .
''',
    re.S | re.X,
)


def _check_nesting(display: str, text: str) -> None:
    """Refuse a TOML text whose arrays and tables, or dotted keys, nest beyond MAX_NESTING:
    a scan that skips strings and comments, run only on texts with that many '[{' or dots."""
    if text.count("[") + text.count("{") <= MAX_NESTING and text.count(".") <= MAX_NESTING:
        return
    depth = dots = 0
    last = ""  # "part" (a bare or quoted key), "dot", or "" (anything else)
    for token in _TOML_TOKEN.finditer(text):
        kind = token.lastgroup
        if kind in ("space", "comment"):
            continue
        part = kind == "bare" or (kind is None and token[0][0] in "\"'")
        if kind == "dot":
            dots = dots + 1 if last == "part" else 0
        elif not (part and last == "dot"):
            dots = 0  # anything but the next part of a dotted key ends it
        last = "part" if part else "dot" if kind == "dot" else ""
        depth = max(depth + {"open": 1, "close": -1}.get(kind or "", 0), 0)
        if depth > MAX_NESTING or dots > MAX_NESTING:
            line = text.count("\n", 0, token.start()) + 1
            raise ConfigError(
                f"{display}: line {line}: nested more than {MAX_NESTING} levels "
                "deep (arrays, tables or dotted keys)"
            )


def _project(src: Source, file: Path, data: dict[str, Any]) -> Project:
    top = Reader(src, "", data, ("project", "images", "build"))
    name = top.table("project", ("name",)).string("name", src.root.name, _nonempty)
    images = top.get("images", (dict,), "at least one [images.<name>] table", {})
    if not images:
        raise src.error("images", "missing: expected at least one [images.<name>] table")
    names = list(images)
    for image in names:
        top.checked(join_key("images", image), image, _image_name)
    table = top.table("images", names)
    specs = tuple(_image(table.table(n, _IMAGE_KEYS), n, names) for n in names)
    _check_graph(src, specs)
    build = _build(top.table("build", _BUILD_KEYS))
    return Project(path=file, root=src.root, name=name, images=specs, build=build)


def _build(r: Reader) -> BuildSettings:
    return BuildSettings(
        cache_from=r.items("cache_from", _cache_source, what="a registry reference"),
        cache_to=r.string("cache_to", "", _cache_to),
    )


def _cache_source(value: str) -> str:
    """An image or cache repository in a registry, kept as written."""
    try:
        Reference.parse(value, need_registry=True)
    except InvalidReference as exc:
        raise check.Invalid(f"{exc.problem}, got {got(value)}") from None
    return value


def _cache_to(value: str) -> str:
    try:
        cache_repository(value)
    except InvalidReference as exc:
        raise check.Invalid(f"{exc.problem}, got {got(value)}") from None
    return value


def _image(r: Reader, name: str, names: list[str]) -> ImageSpec:
    if r.has("from") == r.has("bootstrap"):
        raise r.src.error(r.key, "needs exactly one of 'from' and 'bootstrap'")
    parent = r.string("from", None, _nonempty) if r.has("from") else None
    rootfs = None
    if parent is not None and parent.startswith(ROOTFS_PREFIX):
        # A tarball of the project (or named outside it explicitly), as other inputs.
        named = parent.removeprefix(ROOTFS_PREFIX)
        rootfs = r.checked(r.at("from"), named, check.existing(r.src.root, "file"))
        parent = None
    local = parent is not None and not any(c in parent for c in ":@/")
    if parent is not None and local and parent not in names:
        hint = (
            check.did_you_mean(parent, names)
            or f" (an image of the store needs a tag: '{parent}:latest')"
        )
        raise r.fail("from", f"no image {parent!r} in this file{hint}")
    if parent is not None and not local:
        r.checked(r.at("from"), parent, check.parent_ref)
    tag = r.string("tag", None, check.tag) if r.has("tag") else f"{name}:latest"
    if not r.has("tag") and not check.is_tag(tag):
        raise r.fail("tag", f"missing: {tag!r} is not a valid image reference")
    return ImageSpec(
        name=name,
        tag=tag,
        parent=parent,
        parent_is_local=local,
        bootstrap=_bootstrap(r.table("bootstrap", _BOOTSTRAP_KEYS)) if r.has("bootstrap") else None,
        config=_config(r.table("config", _CONFIG_KEYS)),
        finalize=_finalize(r.table("finalize", _FINALIZE_KEYS)),
        provision=(steps := _steps(r)),
        test=_test(r.table("test", _TEST_KEYS)),
        description=r.string("description"),
        squash=_squash(r, steps),
        rootfs=rootfs,
    )


def _squash(r: Reader, steps: tuple[Step, ...]) -> bool:
    """`squash = true`: the image is one layer; its last stage is then called "squash"."""
    squash = r.boolean("squash", False)
    for step in steps if squash else ():
        if step.name == SQUASH_STAGE:
            raise r.src.error(
                f"{r.at('provision')}[{step.index}].name",
                f"{SQUASH_STAGE!r} names the last stage of an image with squash = true: "
                "expected another name",
            )
    return squash


def _bootstrap(r: Reader) -> BootstrapSpec:
    snapshot = r.string(
        "snapshot", "", check.pattern(r"(\d{8}T\d{6}Z)?", 'a snapshot id like "20240101T000000Z"')
    )
    mirror = r.string(
        "mirror",
        "",
        check.pattern(r"((https?|file)://\S+)?", "an http://, https:// or file:// URL"),
    )
    if snapshot and "{snapshot}" not in mirror:
        raise r.fail(
            "mirror",
            f'expected a URL containing "{{snapshot}}" since snapshot is set, got {got(mirror)}',
        )
    if "{snapshot}" in mirror and not snapshot:
        raise r.fail("snapshot", 'missing: the mirror contains "{snapshot}"')
    components = r.items("components", _word) if r.has("components") else ("main",)
    if not components:
        raise r.fail("components", 'expected at least one component, like "main"')
    return BootstrapSpec(
        distro=r.string("distro", "debian", check.choice(*DISTROS)),
        suite=r.string(
            "suite",
            None,
            check.pattern(r"[A-Za-z0-9][A-Za-z0-9._/-]*", 'a suite name like "bookworm"'),
        ),
        mirror=mirror.replace("{snapshot}", snapshot),
        components=components,
        variant=r.string("variant", "minbase", check.choice(*VARIANTS)),
        packages=r.items("packages", check.pattern(r"[^\s,]+", "a package name")),
        architecture=r.string(
            "architecture",
            "",
            check.pattern(r"([a-z0-9][a-z0-9-]*)?", 'a dpkg architecture like "amd64"'),
        ),
        snapshot=snapshot,
        keyring=r.path("keyring", "any"),
        hooks=r.paths("hooks", "file"),
        security=r.boolean("security", True),
        root=r.src.root,
    )


def _config(r: Reader) -> OciConfigSpec:
    env = r.mapping("env", _env_name)
    if "container" in dict(env):
        raise r.src.error(
            join_key(r.at("env"), "container"),
            f"set it with {r.at('container')} (the systemd container interface)",
        )
    cmd = r.items("cmd") if r.has("cmd") else DEFAULT_CMD
    entrypoint = r.items("entrypoint")
    if not cmd and not entrypoint:
        raise r.fail("cmd", "expected a command to run (cmd or entrypoint), got an empty array")
    ports = set(r.items("ports", check.port, (int, str), "a port"))
    return OciConfigSpec(
        cmd=cmd,
        entrypoint=entrypoint,
        env=env,
        labels=r.mapping("labels", _nonempty),
        ports=tuple(sorted(ports, key=check.port_sort_key)),
        volumes=r.items("volumes", check.absolute),
        stop_signal=r.scalar(
            "stop_signal",
            (str, int),
            "a signal name or number",
            DEFAULT_STOP_SIGNAL,
            check.stop_signal,
        ),
        workdir=r.string("workdir", "/", check.absolute),
        user=r.string(
            "user", "", check.pattern(r"[^\s:]*(:[^\s:]+)?", 'a user like "www-data" or "33:33"')
        ),
        container=r.string("container", "oci", _word),
    )


def _finalize(r: Reader) -> FinalizeSpec:
    return FinalizeSpec(
        apt_lists=r.boolean("apt_lists", True),
        apt_cache=r.boolean("apt_cache", True),
        logs=r.boolean("logs", True),
        ssh_host_keys=r.boolean("ssh_host_keys", True),
        machine_id=r.boolean("machine_id", True),
        tmp=r.boolean("tmp", True),
        salt=r.boolean("salt", True),
        mask=r.items("mask", check.maskable, what="a unit name"),
        unmask=r.items("unmask", check.maskable, what="a unit name"),
        remove=r.items("remove", check.removable, what="a path"),
    )


def _test(r: Reader) -> TestSpec:
    return TestSpec(
        timeout=r.scalar("timeout", (int, float), "a number of seconds", 120.0, check.positive),
        commands=r.items("commands", _nonempty, what="a shell command"),
        units=r.items("units", check.unit, what="a unit name"),
        ports=r.items("ports", check.tcp_port, (int,), "a port number"),
        idempotence=r.boolean("idempotence", True),
    )


def _steps(image: Reader) -> tuple[Step, ...]:
    value = image.get("provision", (list,), f"an array of tables ([[{image.at('provision')}]])", [])
    steps: list[Step] = []
    for index, data in enumerate(value, 1):
        step = _step(image.src, f"{image.at('provision')}[{index}]", index, data)
        for other in steps:
            if other.name == step.name:
                raise image.src.error(
                    f"{image.at('provision')}[{index}].name",
                    f"{step.name!r} is already the name of provision[{other.index}]",
                )
        steps.append(step)
    return tuple(steps)


def _step(src: Source, key: str, index: int, data: object) -> Step:
    # The type decides which keys are allowed, so it is checked first.
    if isinstance(data, dict) and data.get("type") not in STEP_TYPES:
        types = ", ".join(map(json.dumps, STEP_TYPES))
        raise src.error(
            f"{key}.type",
            f"missing: expected one of {types}"
            if "type" not in data
            else f"expected one of {types}, got {got(data['type'])}",
        )
    kind = str(data.get("type")) if isinstance(data, dict) else ""
    r = Reader(src, key, data, _STEP_KEYS.get(kind, ()))
    common: dict[str, Any] = {
        "index": index,
        "root": src.root,
        "name": r.string("name", f"{kind}-{index}", _word),
    }
    if kind == "files":
        mode = r.get("mode", (str,), 'an octal file mode like "0644"', "")
        return FilesStep(
            **common,
            source=r.required_path("source", "any"),
            dest=r.string("dest", "/", check.absolute),
            owner=r.scalar("owner", (str, int), "a user name or number", "root", check.owner),
            group=r.scalar("group", (str, int), "a group name or number", "root", check.owner),
            file_mode=r.checked(r.at("mode"), mode, check.file_mode) if mode else None,
        )
    common |= {
        "mode": r.string("mode", "boot", check.choice(*MODES)),
        "network": r.boolean("network", True),
        "env": r.mapping("env", _env_name),
    }
    if kind == "script":
        script, run = r.path("script", "file"), r.string("run", "", _nonempty)
        if (script is None) == (not run):
            raise src.error(key, "needs exactly one of 'script' and 'run'")
        return ScriptStep(**common, script=script, run=run)
    grains = r.get("grains", (dict,), "a table", {})
    common |= {
        "grains_json": json.dumps(check.json_value(grains), sort_keys=True),
        "salt_version": r.string(
            "salt_version",
            "",
            check.pattern(r"(\d+(\.\d+)*(rc\d+)?)?", 'a Salt version like "3007.1"'),
        ),
        "keep_salt": r.boolean("keep_salt", False),
        "pillar": r.paths("pillar", "dir"),
    }
    if kind == "project":
        path = r.required_path("path", "dir")
        for sub in ("salt", "pillar"):  # mounted into the step: they must stay inside too
            if escape := check.escaping_link(src.root, path / sub):
                named = json.dumps(rel_path(src.root, path / sub))
                raise r.fail(
                    "path",
                    f"{named} resolves outside the project ({escape}): name "
                    "the outside path explicitly if you mean it",
                )
        if not (path / "salt").is_dir():
            raise r.fail(
                "path",
                f"directory not found: {path / 'salt'} (a project keeps its states in salt/)",
            )
        project = r.checked(r.at("project"), r.string("project", path.name), _word)
        return ProjectStep(**common, path=path, project=project)
    state_tree = r.paths("state_tree", "dir", required=True)
    sls = r.items(
        "sls",
        check.pattern(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", 'an SLS name like "web.nginx"'),
        what="an SLS name",
    )
    if not state_tree:
        raise r.fail("state_tree", "expected at least one directory, got an empty array")
    if not sls and not any((tree / "top.sls").is_file() for tree in state_tree):
        raise r.fail(
            "state_tree",
            f"no top.sls in {', '.join(map(str, state_tree))} "
            "(add one, or list the states to apply in 'sls')",
        )
    return SaltStep(**common, state_tree=state_tree, sls=sls)


def _check_graph(src: Source, specs: tuple[ImageSpec, ...]) -> None:
    tags: dict[str, str] = {}
    for spec in specs:
        if spec.tag in tags:
            raise src.error(
                join_key(join_key("images", spec.name), "tag"),
                f"{spec.tag!r} is also the tag of image {tags[spec.tag]!r}",
            )
        tags[spec.tag] = spec.name
    by_name = {spec.name: spec for spec in specs}
    for spec in specs:
        chain = [spec.name]
        while (parent := by_name[chain[-1]]).parent_is_local and parent.parent is not None:
            if parent.parent in chain:
                cycle = [*chain[chain.index(parent.parent) :], parent.parent]
                raise src.error("images", "cycle: " + " -> ".join(cycle))
            chain.append(parent.parent)
