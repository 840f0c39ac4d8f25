"""Project inputs stay in the project (issue 17, part 2): a path named inside the project that
resolves outside it through a symlink is refused by the project file's reader, and files that
sysbake reads on the host (scripts, a project pillar's top file) are never read through a
link to a host file. Paths named outside on purpose (absolute, or with '..') keep working.
Property tests: generated links never lead a checked path out of the project, and generated
documents never crash the reader with anything but ConfigError."""

from __future__ import annotations

import json
import math
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sysbake.errors import ConfigError
from sysbake.project import load as config
from sysbake.project.load import ProjectStep, SaltStep, ScriptStep, load_project
from sysbake.project.reader import Invalid, existing, within
from sysbake.project.specs import read_input

BASE = '[images.base.bootstrap]\nsuite = "bookworm"\n'
SECRET = b"host secret: never in a layer\n"


@pytest.fixture
def host(tmp_path: Path) -> Path:
    """A host directory outside the project with a secret file and a Salt-like tree."""
    outside = tmp_path / "host"
    (outside / "etc").mkdir(parents=True)
    (outside / "etc/secret").write_bytes(SECRET)
    (outside / "etc/top.sls").write_text("base: {'*': [site]}\n")
    return outside


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project (the current directory) with one of each kind of input."""
    root = tmp_path / "proj"
    for tree in ("salt", "pillar", "files", "projects/app/salt", "projects/app/pillar"):
        (root / tree).mkdir(parents=True)
    (root / "salt/top.sls").write_text("base: {'*': [site]}\n")
    (root / "files/motd").write_text("hi\n")
    (root / "build.sh").write_text("echo hi\n")
    monkeypatch.chdir(root)
    return root


def image(step: str) -> str:
    return f'{BASE}[images.web]\nfrom = "base"\n[[images.web.provision]]\n{step}'


def error(root: Path, text: str) -> str:
    (root / "sysbake.toml").write_text(text)
    with pytest.raises(ConfigError) as info:
        load_project(root)
    message = str(info.value)
    assert "\n" not in message
    return message


def loaded_step(root: Path, step: str) -> object:
    (root / "sysbake.toml").write_text(image(step))
    return load_project(root).image("web").provision[0]


def relink(path: Path, target: Path | str) -> None:
    """Make `path` (a dir or file of the fixture) a symlink to `target`."""
    if path.is_dir() and not path.is_symlink():
        for child in sorted(path.rglob("*"), reverse=True):
            child.rmdir() if child.is_dir() else child.unlink()
        path.rmdir()
    elif path.exists() or path.is_symlink():
        path.unlink()
    path.symlink_to(target)


# ---------------------------------------------------------------- the project file's reader


def test_files_source_linked_to_a_host_file_is_refused(proj: Path, host: Path) -> None:
    (proj / "conf").symlink_to(host / "etc")
    assert error(proj, image('type = "files"\nsource = "conf"\ndest = "/etc/x"\n')) == (
        f'sysbake.toml: images.web.provision[1].source: "conf" resolves outside the project '
        f"(a symlink to {host / 'etc'}): name the outside path explicitly if you mean it"
    )
    relink(proj / "files/motd", host / "etc/secret")
    message = error(proj, image('type = "files"\nsource = "files/motd"\n'))
    assert message.endswith(
        f'"files/motd" resolves outside the project (a symlink to '
        f"{host / 'etc/secret'}): name the outside path explicitly if you "
        "mean it"
    )


def test_a_link_in_the_middle_of_a_path_is_seen(proj: Path, host: Path) -> None:
    relink(proj / "files", host / "etc")
    message = error(proj, image('type = "files"\nsource = "files/secret"\n'))
    assert message == (
        f'sysbake.toml: images.web.provision[1].source: "files/secret" resolves '
        f"outside the project (files is a symlink to {host / 'etc'}): name the "
        "outside path explicitly if you mean it"
    )


def test_a_relative_link_climbing_out_is_seen(proj: Path, host: Path) -> None:
    (proj / "files/up").symlink_to(Path("..") / ".." / "host" / "etc" / "secret")
    message = error(proj, image('type = "files"\nsource = "files/up"\n'))
    assert "resolves outside the project (a symlink to " in message


@pytest.mark.parametrize(
    ("step", "link", "key"),
    [
        ('type = "salt"\nstate_tree = "salt"\n', "salt", "state_tree"),
        ('type = "salt"\nstate_tree = ["salt"]\n', "salt", "state_tree[1]"),
        ('type = "salt"\nstate_tree = "salt"\npillar = "pillar"\n', "pillar", "pillar"),
        ('type = "project"\npath = "projects/app"\n', "projects/app", "path"),
        ('type = "script"\nscript = "build.sh"\n', "build.sh", "script"),
    ],
)
def test_every_step_input_is_checked(
    proj: Path, host: Path, step: str, link: str, key: str
) -> None:
    relink(proj / link, host / "etc" / ("secret" if link.endswith(".sh") else ""))
    message = error(proj, image(step))
    assert message.startswith(f"sysbake.toml: images.web.provision[1].{key}: ")
    assert "resolves outside the project (a symlink to " in message


@pytest.mark.parametrize("sub", ["salt", "pillar"])
def test_a_project_dirs_salt_and_pillar_are_checked(proj: Path, host: Path, sub: str) -> None:
    relink(proj / "projects/app" / sub, host / "etc")
    message = error(proj, image('type = "project"\npath = "projects/app"\n'))
    assert message == (
        f'sysbake.toml: images.web.provision[1].path: "projects/app/{sub}" '
        f"resolves outside the project (a symlink to {host / 'etc'}): name the "
        "outside path explicitly if you mean it"
    )


@pytest.mark.parametrize(("key", "value"), [("keyring", "keys.gpg"), ("hooks", ["hook.sh"])])
def test_bootstrap_inputs_are_checked(proj: Path, host: Path, key: str, value: object) -> None:
    (proj / "keys.gpg").symlink_to(host / "etc/secret")
    (proj / "hook.sh").symlink_to(host / "etc/secret")
    message = error(proj, f"{BASE}{key} = {json.dumps(value)}\n")
    assert message.startswith(f"sysbake.toml: images.base.bootstrap.{key}")
    assert "resolves outside the project" in message


def test_links_that_stay_inside_the_project_are_fine(proj: Path) -> None:
    (proj / "states").symlink_to("salt")
    (proj / "files/alias").symlink_to("motd")
    (proj / "run.sh").symlink_to(proj / "build.sh")  # absolute, but inside
    assert isinstance(loaded_step(proj, 'type = "salt"\nstate_tree = "states"\n'), SaltStep)
    step = loaded_step(proj, 'type = "files"\nsource = "files/alias"\n')
    assert step.source == proj / "files/alias"  # type: ignore[attr-defined]
    script = loaded_step(proj, 'type = "script"\nscript = "run.sh"\n')
    assert isinstance(script, ScriptStep) and script.body() == b"echo hi\n"


def test_paths_named_outside_on_purpose_keep_working(proj: Path, host: Path) -> None:
    (host / "link").symlink_to(host / "etc/secret")
    step = loaded_step(proj, f'type = "files"\nsource = "{host / "etc/secret"}"\n')
    assert step.source == host / "etc/secret"  # type: ignore[attr-defined]
    step = loaded_step(proj, 'type = "files"\nsource = "../host/link"\n')
    assert step.source == host / "link"  # type: ignore[attr-defined]
    step = loaded_step(proj, 'type = "salt"\nstate_tree = "../host/etc"\n')
    assert isinstance(step, SaltStep) and step.state_tree == (host / "etc",)
    script = loaded_step(proj, f'type = "script"\nscript = "{host / "link"}"\n')
    assert isinstance(script, ScriptStep) and script.body() == SECRET


def test_sources_must_be_files_or_directories(proj: Path) -> None:
    os.mkfifo(proj / "pipe")
    message = error(proj, image('type = "files"\nsource = "pipe"\n'))
    assert message == (
        f"sysbake.toml: images.web.provision[1].source: not a file or directory: {proj / 'pipe'}"
    )
    message = error(proj, image('type = "files"\nsource = "a\\u0000b"\n'))
    assert "NUL character" in message
    message = error(proj, image(f'type = "files"\nsource = "{"x" * 300}"\n'))
    assert message.endswith("File name too long")


def test_validate_reports_it_in_one_line_with_exit_2(proj: Path, host: Path) -> None:
    (proj / "conf").symlink_to(host / "etc/secret")
    (proj / "sysbake.toml").write_text(image('type = "files"\nsource = "conf"\n'))
    result = subprocess.run(
        [sys.executable, "-m", "sysbake.cli", "validate"],
        cwd=proj,
        capture_output=True,
        text=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr.splitlines() == [
        f'sysbake: error: sysbake.toml: images.web.provision[1].source: "conf" resolves '
        f"outside the project (a symlink to {host / 'etc/secret'}): name the outside path "
        "explicitly if you mean it"
    ]


# ---------------------------------------------------------------- files read on the host


def test_a_script_relinked_after_loading_is_not_read(proj: Path, host: Path) -> None:
    script = loaded_step(proj, 'type = "script"\nscript = "build.sh"\n')
    assert isinstance(script, ScriptStep)
    relink(proj / "build.sh", host / "etc/secret")
    with pytest.raises(ConfigError) as info:
        script.body()
    assert str(info.value) == (
        f"build.sh: resolves outside {proj} (a symlink to "
        f"{host / 'etc/secret'}): sysbake does not read host files "
        "through a link"
    )


def test_read_input_opens_no_fifo_and_no_link(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(ConfigError, match="not a regular file"):
        read_input(tmp_path / "pipe", tmp_path)  # and does not hang
    os.mknod(tmp_path / "null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    with pytest.raises(ConfigError, match="not a regular file"):
        read_input(tmp_path / "null", tmp_path)
    (tmp_path / "f").write_bytes(b"x")
    (tmp_path / "l").symlink_to("f")
    assert read_input(tmp_path / "l", tmp_path) == b"x"


def _toolchain(tmp_path: Path) -> object:
    from sysbake.build.salt.toolchain import Toolchain

    return Toolchain(
        path=tmp_path / "tc",
        version="3007.1",
        suite="bookworm",
        architecture="amd64",
        python="bin/python3",
        loader="lib/ld.so",
        library_path=("lib",),
        key="k",
    )


def test_salt_mounts_are_real_dirs_and_a_pillar_top_link_is_refused(
    proj: Path, host: Path, tmp_path: Path
) -> None:
    from sysbake.build.salt import run as salt

    (proj / "states").symlink_to("salt")
    (proj / "projects/app/pillar/top.sls").symlink_to(host / "etc/top.sls")
    step = loaded_step(proj, 'type = "project"\npath = "projects/app"\npillar = "pillar"\n')
    assert isinstance(step, ProjectStep)
    run = salt.SaltRun(
        _toolchain(tmp_path),  # type: ignore[arg-type]
        state_trees=(proj / "states",),
        pillar=step.pillar,
        project_pillar=step.project_pillar,
    )
    hosts = [str(h) for h, _dest, _ro in run.mounts()[1:]]
    assert hosts == [str(proj / "salt"), str(proj / "pillar"), str(proj / "projects/app/pillar")]
    with pytest.raises(ConfigError, match="sysbake does not read host files through a link"):
        run.config_files()
    relink(proj / "projects/app/pillar/top.sls", "real-top.sls")
    (proj / "projects/app/pillar/real-top.sls").write_text("base: {'*': [app]}\n")
    files = run.config_files()
    assert (
        files[f"{salt.CONF_DIR}/pillar-top/project/sysbake-user-top.sls"] == b"base: {'*': [app]}\n"
    )


# ---------------------------------------------------------------- properties: links


NAMES = ("a", "b", "c")
# What each name of a generated project may be: a dir, a file, or a link to somewhere.
TARGETS = st.sampled_from(
    [
        "a",
        "b",
        "c",
        "a/b",
        "b/c",
        ".",
        "..",
        "../proj",
        "../out",
        "../out/f",
        "a/../..",
        "ABS_OUT",
        "ABS_OUT/f",
        "ABS_IN",
        "ABS_IN/a",
        "/",
        "c/../../out",
    ]
)
KINDS = st.one_of(st.just("dir"), st.just("file"), TARGETS.map(lambda t: f"link:{t}"))


@pytest.fixture(scope="module")
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory() as path:
        yield Path(path)


def _build(top: Path, layout: dict[str, str], nested: dict[str, str]) -> Path:
    root, out = top / "proj", top / "out"
    root.mkdir()
    out.mkdir()
    (out / "f").write_bytes(SECRET)
    for where, spec in [
        *((root / n, k) for n, k in layout.items()),
        *((root / "a" / n, k) for n, k in nested.items()),
    ]:
        if not where.parent.is_dir() or where.parent.is_symlink():
            continue
        if spec == "dir":
            where.mkdir()
        elif spec == "file":
            where.write_text("in\n")
        else:
            target = (
                spec.removeprefix("link:").replace("ABS_OUT", str(out)).replace("ABS_IN", str(root))
            )
            where.symlink_to(target)
    return root


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    layout=st.fixed_dictionaries({n: KINDS for n in NAMES}),
    nested=st.dictionaries(st.sampled_from(NAMES), KINDS, max_size=3),
    value=st.lists(st.sampled_from([*NAMES, ".", ".."]), min_size=1, max_size=4),
    kind=st.sampled_from(["dir", "file", "any"]),
)
def test_a_checked_path_named_inside_never_leads_outside(
    scratch: Path, layout: dict[str, str], nested: dict[str, str], value: list[str], kind: str
) -> None:
    with tempfile.TemporaryDirectory(dir=scratch) as top:
        root = _build(Path(top), layout, nested)
        text = "/".join(value)
        try:
            path = existing(root, kind)(text)
        except Invalid as exc:
            assert "\n" not in str(exc)
            return
        if within(root, path):  # named inside: must really be inside
            assert within(os.path.realpath(root), os.path.realpath(path)), (text, layout)
        else:
            assert ".." in value  # only a path written with '..' may leave the project


# ---------------------------------------------------------------- properties: the reader


def toml_string(text: str) -> str:
    out = "".join(
        f"\\u{ord(c):04x}"
        if ord(c) < 0x20 or ord(c) == 0x7F
        else "\\\\"
        if c == "\\"
        else '\\"'
        if c == '"'
        else c
        for c in text
    )
    return f'"{out}"'


def toml_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return (
            "nan"
            if math.isnan(value)
            else ("inf" if value > 0 else "-inf")
            if math.isinf(value)
            else repr(value)
        )
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


KNOWN_KEYS = sorted(
    {
        *config._IMAGE_KEYS,
        *config._BOOTSTRAP_KEYS,
        *config._CONFIG_KEYS,
        *config._FINALIZE_KEYS,
        *config._TEST_KEYS,
        *(k for keys in config._STEP_KEYS.values() for k in keys),
    }
)
KEYS = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=8))
SCALARS = st.one_of(
    st.sampled_from(
        [
            "salt",
            "pillar",
            "files/motd",
            "base",
            "/etc/x",
            "bookworm",
            "boot",
            "chroot",
            "files",
            "script",
            "project",
            "0644",
            "root",
            "base:latest",
            "SIGTERM",
            "80/tcp",
            "..",
            "/",
            "",
        ]
    ),
    st.text(max_size=12),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.booleans(),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(KEYS, inner, max_size=5)),
    max_leaves=30,
)


def one(*options: object) -> st.SearchStrategy[object]:
    return st.sampled_from(options)


# Values close to right for each key (paths of `reader_project`, links out and in included),
# so that generated documents get past the first check as often as they fail it.
PLAUSIBLE: dict[str, st.SearchStrategy[object]] = {
    "from": one("base", "web", "debian:bookworm", "nope", "a/b@sha256:" + "0" * 64),
    "tag": one("x:1", "Bad Tag", "reg:5000/x"),
    "suite": one("bookworm", "-x"),
    "distro": one("debian", "ubuntu", "arch"),
    "mirror": one("", "http://m/{snapshot}", "ftp:"),
    "snapshot": one("", "20240101T000000Z", "2024"),
    "keyring": one("files/motd", "link-out"),
    "hooks": one(["files/motd"], ["salt"], "link-in/motd"),
    "components": one([], ["main"]),
    "name": one("a", "b-1", "a", ""),
    "mode": one("boot", "chroot", "0644", "9999"),
    "network": st.booleans(),
    "env": st.dictionaries(one("A", "B_1", "bad name", "container"), one("v", 1)),
    "salt_version": one("", "3007.1", "x"),
    "state_tree": one("salt", ["salt"], [], "pillar", "link-out", "link-in"),
    "pillar": one("pillar", ["pillar", "pillar"], "link-out"),
    "sls": one(["a.b"], ["b c"]),
    "path": one("projects/app", "salt", "link-out"),
    "project": one("app", "a b"),
    "script": one("build.sh", "files/motd", "", "link-out/f", "link-in/motd"),
    "run": one("echo hi", ""),
    "source": one(
        "files",
        "files/motd",
        "/etc/hostname",
        "../x",
        "link-out",
        "link-out/f",
        "link-in/motd",
        ".",
    ),
    "dest": one("/etc/x", "/", "rel", "/a/../b"),
    "owner": one("root", 0, "www-data", "Bad"),
    "group": one("root", 33),
    "cmd": one(["/bin/sh"], []),
    "ports": one([80, "53/udp"], [0]),
    "stop_signal": one("SIGTERM", 37, "RTMIN+3", "SIGFOO"),
    "units": one(["a"], ["b c"]),
    "timeout": one(1, 0.5, -1, float("inf")),
    "remove": one(["/var/x"], ["/"], ["rel"]),
    "mask": one(["a.service", "x-generator"]),
    "volumes": one(["/data"], ["data"]),
}


def table(
    keys: Sequence[str], required: Sequence[str] = (), **inner: st.SearchStrategy[object]
) -> st.SearchStrategy[dict[str, object]]:
    """A TOML table of `required` and some of `keys`, each with a value that is mostly
    plausible (seven times out of eight), else arbitrary."""

    def value(key: str) -> st.SearchStrategy[object]:
        good = inner[key] if key in inner else PLAUSIBLE.get(key, VALUES)
        return st.one_of(*[good] * 7, VALUES)

    return st.fixed_dictionaries(
        {k: value(k) for k in required}, optional={k: value(k) for k in keys if k not in required}
    )


STEPS = st.lists(
    st.one_of(
        *(
            table(keys).map(lambda d, t=t: {**d, "type": t})  # type: ignore
            for t, keys in config._STEP_KEYS.items()
        ),
        table(["type", "x"]),
    ),
    max_size=3,
)
PARENT = st.one_of(
    table(["from"], required=["from"]),
    table(
        ["bootstrap"],
        required=["bootstrap"],
        bootstrap=table(config._BOOTSTRAP_KEYS, required=["suite"]),
    ),
    table(["from", "bootstrap"]),
)
IMAGES = st.tuples(
    PARENT,
    table(
        [k for k in config._IMAGE_KEYS if k not in ("from", "bootstrap")],
        provision=STEPS,
        config=table(config._CONFIG_KEYS),
        finalize=table(config._FINALIZE_KEYS),
        test=table(config._TEST_KEYS),
    ),
).map(lambda parts: {**parts[0], **parts[1]})
DOCS = st.fixed_dictionaries(
    {
        "images": st.one_of(
            *[st.dictionaries(one("base", "web", "app"), IMAGES, min_size=1, max_size=3)] * 7,
            st.dictionaries(KEYS, IMAGES, max_size=2),
            VALUES,
        )
    },
    optional={"project": st.one_of(*[one({}, {"name": "p"})] * 7, table(["name", "x"]))},
)
STEP_DOCS = STEPS.map(
    lambda steps: {
        "images": {
            "base": {"bootstrap": {"suite": "bookworm"}},
            "web": {"from": "base", "provision": steps},
        }
    }
)


@pytest.fixture(scope="module")
def reader_project() -> Iterator[Path]:
    """A project with the trees the generated documents may name."""
    with tempfile.TemporaryDirectory() as path:
        root = Path(path)
        for tree in ("salt", "pillar", "files"):
            (root / tree).mkdir()
        (root / "salt/top.sls").write_text("base: {'*': [x]}\n")
        (root / "files/motd").write_text("hi\n")
        (root / "projects/app/salt").mkdir(parents=True)
        (root / "build.sh").write_text("echo hi\n")
        (root / "link-in").symlink_to("files")
        (root / "link-out").symlink_to(Path(path) / "..")
        yield root


def _load_or_config_error(root: Path, text: str | bytes) -> None:
    file = root / "sysbake.toml"
    file.write_bytes(text.encode() if isinstance(text, str) else text)
    try:
        project = load_project(file)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith(f"{file}: "), message
        return
    json.dumps(project.to_json())
    json.dumps([spec.key_inputs() for spec in project.images])


@settings(
    max_examples=500,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(doc=st.one_of(DOCS, STEP_DOCS))
def test_generated_documents_load_or_give_one_config_error(
    reader_project: Path, doc: dict[str, object]
) -> None:
    text = "\n".join(f"{toml_string(k)} = {toml_value(v)}" for k, v in doc.items())
    _load_or_config_error(reader_project, text)


NEST = st.lists(st.sampled_from(["[", "{a = ", "a.", '"q".', "[[x]]\n"]), max_size=50)
DEPTH = st.one_of(st.integers(0, 5), st.integers(95, 105), st.integers(0, 400))


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    opening=NEST, arrays=DEPTH, dots=DEPTH, header=DEPTH, at=st.sampled_from(["grains", "env", "x"])
)
def test_generated_nestings_load_or_give_one_config_error(
    reader_project: Path, opening: list[str], arrays: int, dots: int, header: int, at: str
) -> None:
    opening = [*opening, *["[", "a."] * arrays]
    closing = {"[": "]", "{a = ": "}"}
    body = (
        "".join(p for p in opening if p in closing)
        + "1"
        + "".join(closing[p] for p in reversed(opening) if p in closing)
    )
    key = "".join(p for p in opening if p in ("a.", '"q".')) + "b." * dots
    headers = "".join(p for p in opening if p.startswith("[["))
    text = (
        f'{BASE}[images.web]\nfrom = "base"\n[[images.web.provision]]\n'
        f'type = "salt"\nstate_tree = "salt"\n{at}.{key}k = {body}\n{headers}'
        f"[{'h.' * header}t]\n"
    )
    _load_or_config_error(reader_project, text)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    data=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        st.lists(
            st.sampled_from(
                ["[", "]", "{", "}", '"', "'", '"""', "=", "a", ".", "\n", "#", ",", "1", " "]
            ),
            max_size=300,
        ).map(lambda t: "".join(t).encode()),
    )
)
def test_any_bytes_load_or_give_one_config_error(reader_project: Path, data: bytes) -> None:
    _load_or_config_error(reader_project, data)


def test_salt_leaves_out_names_that_are_not_utf8_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import re

    from sysbake.build.salt import run as salt

    tree = tmp_path / "salt"
    (tree / "files").mkdir(parents=True)
    (tree / "top.sls").write_text("base: {'*': [x]}\n")
    with open(os.fsencode(tree / "files") + b"/caf\xe9", "wb") as f:
        f.write(b"odd")
    run = salt.SaltRun(_toolchain(tmp_path), state_trees=(tree,))  # type: ignore[arg-type]
    files = run.config_files()
    (pattern,) = json.loads(files[f"{salt.CONF_DIR}/minion"])["file_ignore_regex"]
    assert re.search(pattern, os.fsdecode(b"files/caf\xe9"))
    assert not re.search(pattern, "files/café, ünïcödé ✓")
    assert capsys.readouterr().err == (
        f"warning: {tree}/files/caf\\xe9: names that are not UTF-8, which Salt cannot serve: "
        "they are left out of the state tree or pillar\n"
    )
    os.unlink(os.fsencode(tree / "files") + b"/caf\xe9")
    run.config_files()
    assert capsys.readouterr().err == ""
