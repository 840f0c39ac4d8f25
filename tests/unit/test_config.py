"""The project file: every default, every type, every error kind, build order, cache inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from sysbake.errors import ConfigError
from sysbake.project.load import (
    DEFAULT_CMD,
    BootstrapSpec,
    FilesStep,
    FinalizeSpec,
    ImageSpec,
    OciConfigSpec,
    Project,
    ProjectStep,
    SaltStep,
    ScriptStep,
    TestSpec,
    find_project_file,
    load_project,
)
from sysbake.records import FrozenInstanceError

BASE = '[images.base.bootstrap]\nsuite = "bookworm"\n'


@pytest.fixture
def proj(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project directory (the current directory) with the trees the examples refer to."""
    root = tmp_path / "myproj"
    for tree in (
        "salt",
        "salt2",
        "pillar",
        "files",
        "keys",
        "projects/app/salt",
        "projects/app/pillar",
        "projects/bare",
    ):
        (root / tree).mkdir(parents=True)
    (root / "salt/top.sls").write_text("base: {'*': [site]}\n")
    for name in ("build.sh", "hook.sh", "files/motd", "keys/debian.gpg"):
        (root / name).write_text("x\n")
    monkeypatch.chdir(root)
    return root


def write(root: Path, text: str) -> Path:
    path = root / "sysbake.toml"
    path.write_text(text)
    return path


def load(root: Path, text: str) -> Project:
    return load_project(write(root, text))


def error(root: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(root, text)
    message = str(info.value)
    assert "\n" not in message
    return message


def image(text: str, name: str = "web") -> str:
    """A project with `base` (bootstrapped) and an image `name` from it, plus `text`."""
    return f'{BASE}[images.{name}]\nfrom = "base"\n{text}'


# ---------------------------------------------------------------- defaults and full values


def test_minimal_file_gets_every_default(proj: Path) -> None:
    project = load(proj, BASE)
    assert project.path == proj / "sysbake.toml" and project.root == proj
    assert project.name == "myproj"
    (base,) = project.images
    assert (base.name, base.tag, base.parent, base.parent_is_local) == (
        "base",
        "base:latest",
        None,
        False,
    )
    assert base.bootstrap == BootstrapSpec(
        distro="debian",
        suite="bookworm",
        mirror="",
        components=("main",),
        variant="minbase",
        packages=(),
        architecture="",
        snapshot="",
        keyring=None,
        hooks=(),
        security=True,
        root=proj,
    )
    assert base.config == OciConfigSpec()
    assert base.config.cmd == DEFAULT_CMD == ("/lib/systemd/systemd",)
    assert base.config.stop_signal == "SIGRTMIN+3" and base.config.container == "oci"
    assert base.config.workdir == "/" and base.config.env == ()
    assert base.finalize == FinalizeSpec()
    assert all(
        getattr(base.finalize, f)
        for f in ("apt_lists", "apt_cache", "logs", "ssh_host_keys", "machine_id", "tmp", "salt")
    )
    assert base.test == TestSpec(timeout=120.0, commands=(), units=(), ports=(), idempotence=True)
    assert base.provision == () and base.description == ""


def test_every_key_is_read_and_normalized(proj: Path) -> None:
    project = load(
        proj,
        """
[project]
name = "shop"

[images.base]
tag = "registry.local:5000/team/base"
description = "the base"

[images.base.bootstrap]
distro = "ubuntu"
suite = "noble"
mirror = "http://mirror.example/ubuntu/{snapshot}"
components = ["main", "universe"]
variant = "apt"
packages = ["nginx", "curl"]
architecture = "arm64"
snapshot = "20240101T000000Z"
keyring = "keys"
hooks = ["hook.sh"]
security = false

[images.web]
from = "base"

[images.web.config]
cmd = ["/sbin/init", "--log-level=info"]
entrypoint = ["/usr/bin/env"]
env = { LANG = "C.UTF-8", TZ = "UTC" }
labels = { "org.example.team" = "shop" }
ports = ["443", 80, "53/udp", "80/tcp"]
volumes = ["/srv/data", "/var/log"]
stop_signal = 37
workdir = "/srv"
user = "www-data"
container = "docker"

[images.web.finalize]
apt_lists = false
apt_cache = false
logs = false
ssh_host_keys = false
machine_id = false
tmp = false
salt = false
mask = ["getty@tty1", "foo.socket", "systemd-fstab-generator"]
unmask = ["systemd-logind.service"]
remove = ["/usr/share/doc/*"]

[[images.web.provision]]
type = "salt"
name = "system"
mode = "chroot"
network = false
state_tree = ["salt", "salt2"]
pillar = "pillar"
sls = ["site", "site.extra"]
grains = { role = "web", ports = [80, 443], built = 2024-01-01T10:00:00Z, nested = { a = 1 } }
salt_version = "3007.1"
keep_salt = true
env = { HTTP_PROXY = "http://127.0.0.1:3128" }

[[images.web.provision]]
type = "project"
path = "projects/app"
pillar = ["pillar"]

[[images.web.provision]]
type = "script"
script = "build.sh"

[[images.web.provision]]
type = "script"
run = "echo hi"

[[images.web.provision]]
type = "files"
source = "files/motd"
dest = "/etc/motd"
owner = 0
group = "adm"
mode = "644"

[images.web.test]
timeout = 30.5
commands = ["true"]
units = ["nginx"]
ports = [80, 443]
idempotence = false

[images.cli]
from = "debian@sha256:"""
        + "a" * 64
        + """"
""",
    )
    assert project.name == "shop"
    base, web, cli = project.images
    assert base.tag == "registry.local:5000/team/base:latest" and base.description == "the base"
    assert base.bootstrap == BootstrapSpec(
        distro="ubuntu",
        suite="noble",
        mirror="http://mirror.example/ubuntu/20240101T000000Z",
        components=("main", "universe"),
        variant="apt",
        packages=("nginx", "curl"),
        architecture="arm64",
        snapshot="20240101T000000Z",
        keyring=proj / "keys",
        hooks=(proj / "hook.sh",),
        security=False,
        root=proj,
    )
    assert (web.parent, web.parent_is_local, web.bootstrap) == ("base", True, None)
    assert (cli.parent, cli.parent_is_local) == ("debian@sha256:" + "a" * 64, False)
    assert web.config == OciConfigSpec(
        cmd=("/sbin/init", "--log-level=info"),
        entrypoint=("/usr/bin/env",),
        env=(("LANG", "C.UTF-8"), ("TZ", "UTC")),
        labels=(("org.example.team", "shop"),),
        ports=("53/udp", "80/tcp", "443/tcp"),
        volumes=("/srv/data", "/var/log"),
        stop_signal="SIGRTMIN+3",
        workdir="/srv",
        user="www-data",
        container="docker",
    )
    assert web.finalize == FinalizeSpec(
        apt_lists=False,
        apt_cache=False,
        logs=False,
        ssh_host_keys=False,
        machine_id=False,
        tmp=False,
        salt=False,
        mask=("getty@tty1.service", "foo.socket", "systemd-fstab-generator"),
        unmask=("systemd-logind.service",),
        remove=("/usr/share/doc/*",),
    )
    salt, proj_step, script, inline, files = web.provision
    assert isinstance(salt, SaltStep) and isinstance(inline, ScriptStep)
    assert salt == SaltStep(
        index=1,
        name="system",
        mode="chroot",
        network=False,
        env=(("HTTP_PROXY", "http://127.0.0.1:3128"),),
        root=proj,
        grains_json=salt.grains_json,
        salt_version="3007.1",
        keep_salt=True,
        state_tree=(proj / "salt", proj / "salt2"),
        pillar=(proj / "pillar",),
        sls=("site", "site.extra"),
    )
    assert salt.grains == {
        "role": "web",
        "ports": [80, 443],
        "built": "2024-01-01T10:00:00+00:00",
        "nested": {"a": 1},
    }
    assert isinstance(proj_step, ProjectStep)
    assert (proj_step.name, proj_step.path, proj_step.project, proj_step.pillar) == (
        "project-2",
        proj / "projects/app",
        "app",
        (proj / "pillar",),
    )
    assert proj_step.state_tree == proj / "projects/app/salt"
    assert proj_step.project_pillar == proj / "projects/app/pillar"
    assert (proj_step.mode, proj_step.network, proj_step.keep_salt) == ("boot", True, False)
    assert script == ScriptStep(index=3, name="script-3", root=proj, script=proj / "build.sh")
    assert (inline.script, inline.run, inline.name) == (None, "echo hi", "script-4")
    assert files == FilesStep(
        index=5,
        name="files-5",
        root=proj,
        source=proj / "files/motd",
        dest="/etc/motd",
        owner="0",
        group="adm",
        file_mode=0o644,
    )
    assert (files.mode, files.network, files.env) == ("chroot", False, ())
    assert web.test == TestSpec(
        timeout=30.5,
        commands=("true",),
        units=("nginx.service",),
        ports=(80, 443),
        idempotence=False,
    )


def test_values_are_frozen_and_hashable(proj: Path) -> None:
    project = load(
        proj,
        image(
            '[[images.web.provision]]\ntype = "salt"\nstate_tree = "salt"\n'
            "grains = { a = [1, { b = 2 }] }\n"
        ),
    )
    assert hash(project) == hash(load(proj, (proj / "sysbake.toml").read_text()))
    with pytest.raises(FrozenInstanceError):
        project.images[0].tag = "x"  # type: ignore[misc]
    step = project.images[1].provision[0]
    assert isinstance(step, SaltStep)
    step.grains["a"] = "changed"
    assert step.grains == {"a": [1, {"b": 2}]}


def test_project_step_without_pillar_dir_and_custom_name(proj: Path) -> None:
    (proj / "projects/bare/salt").mkdir()
    project = load(
        proj,
        image(
            '[[images.web.provision]]\ntype = "project"\n'
            'path = "projects/bare"\nproject = "shop-front"\n'
        ),
    )
    step = project.images[1].provision[0]
    assert isinstance(step, ProjectStep)
    assert (step.project, step.project_pillar, step.pillar) == ("shop-front", None, ())


def test_salt_step_with_sls_needs_no_top_file(proj: Path) -> None:
    project = load(
        proj,
        image('[[images.web.provision]]\ntype = "salt"\nstate_tree = "salt2"\nsls = ["site"]\n'),
    )
    assert project.images[1].provision[0].name == "salt-1"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('"SIGTERM"', "SIGTERM"),
        ('"term"', "SIGTERM"),
        ("15", "SIGTERM"),
        ('"15"', "SIGTERM"),
        ('"SIGRTMIN+3"', "SIGRTMIN+3"),
        ('"RTMIN+3"', "SIGRTMIN+3"),
        ("37", "SIGRTMIN+3"),
        ('"SIGRTMAX-27"', "SIGRTMIN+3"),
        ('"SIGRTMIN"', "SIGRTMIN"),
        ('"SIGRTMIN+0"', "SIGRTMIN"),
        ('"SIGRTMAX"', "SIGRTMIN+30"),
        ('"SIGIOT"', "SIGABRT"),
        ('"SIGPWR"', "SIGPWR"),
    ],
)
def test_stop_signal_forms(proj: Path, value: str, expected: str) -> None:
    project = load(proj, BASE + f"[images.base.config]\nstop_signal = {value}\n")
    assert project.images[0].config.stop_signal == expected


# ---------------------------------------------------------------- finding and parsing the file


def test_find_project_file(proj: Path) -> None:
    write(proj, BASE)
    assert find_project_file(proj) == proj / "sysbake.toml"
    assert find_project_file(Path("sysbake.toml")) == proj / "sysbake.toml"
    other = proj / "other.toml"
    other.write_text(BASE)
    assert load_project(Path("other.toml")).path == other
    assert load_project().path == proj / "sysbake.toml"
    assert load_project(Path(".")).path == proj / "sysbake.toml"


def test_missing_file_says_run_init(proj: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=rf"^no sysbake.toml in {proj}/files \(run 'sysbake "
        r"init'\)$",
    ):
        load_project(proj / "files")
    with pytest.raises(ConfigError, match=r"^no sysbake.toml in .*myproj \(run 'sysbake init'\)"):
        load_project()
    with pytest.raises(ConfigError, match=r"^nope.toml: no such file or directory$"):
        load_project(Path("nope.toml"))


def test_parent_directories_are_not_searched(proj: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(proj, BASE)
    monkeypatch.chdir(proj / "salt")
    with pytest.raises(ConfigError, match=r"no sysbake\.toml in"):
        load_project()


def test_toml_syntax_errors_give_line_and_column(proj: Path) -> None:
    assert (
        error(proj, "[images.base]\nfrom = \n") == "sysbake.toml: line 2, column 8: Invalid value"
    )
    assert (
        error(proj, '[images.base]\nfrom = "a\n')
        == "sysbake.toml: line 2, column 10: Illegal character '\\n'"
    )
    assert (
        error(proj, "a = 1\na = 2\n") == "sysbake.toml: line 2, column 6: Cannot overwrite a value"
    )
    assert error(proj, 'a = "') == "sysbake.toml: end of file: Unterminated string"


def test_file_that_is_not_utf8(proj: Path) -> None:
    (proj / "sysbake.toml").write_bytes(b'[images.base.bootstrap]\nsuite = "\xff"\n')
    with pytest.raises(ConfigError, match=r"^sysbake.toml: not UTF-8 text \(byte 33\)$"):
        load_project()


DEEP = 100_000


@pytest.mark.parametrize(
    "text",
    [
        "a = " + "[" * DEEP + "]" * DEEP,
        "a = " + "{b = " * DEEP + "1" + "}" * DEEP,
        ".".join(["a"] * DEEP) + " = 1",
        ".".join(['"a"'] * DEEP) + " = 1",
        "[" + ".".join(["a"] * DEEP) + "]\nx = 1",
        "[[" + " . ".join(["a"] * DEEP) + "]]\nx = 1",
    ],
    ids=["arrays", "inline-tables", "dotted-key", "quoted-dotted-key", "table", "array-table"],
)
def test_toml_nested_100000_deep_is_one_error_naming_the_file(proj: Path, text: str) -> None:
    assert error(proj, f"{BASE}{text}\n") == (
        "sysbake.toml: line 3: nested more than 100 levels deep (arrays, tables or dotted keys)"
    )


def test_toml_nested_100_deep_still_loads(proj: Path) -> None:
    grains = "x = " + "[" * 100 + "]" * 100 + "\n" + ".".join(["k"] * 100) + " = 1\n"
    text = image(
        '[[images.web.provision]]\ntype = "salt"\nstate_tree = "salt"\n'
        f"[images.web.provision.grains]\n{grains}"
    )
    (step,) = load(proj, text).image("web").provision
    assert isinstance(step, SaltStep) and "k" in step.grains
    # Brackets and dots in strings and comments are not nesting.
    many = "[{." * 1000
    for quote in ('"', "'", '"""', "'''"):
        project = load(
            proj,
            f"[images.base]\ndescription = {quote}{many}{quote}\n# {many}\n"
            '[images.base.bootstrap]\nsuite = "bookworm"\n',
        )
        assert project.images[0].description == many


def test_dots_and_quotes_that_are_no_nesting(proj: Path) -> None:
    # Dots that follow no key are a syntax error, not a dotted key 101 parts deep.
    assert (
        error(proj, f"{BASE}a = 1 {'.' * 101}\n")
        == "sysbake.toml: line 3, column 7: Expected newline or end of document after a statement"
    )
    # A line of escaped quotes in an unterminated string: scanned once, not once per quote.
    quotes = '\\"' * 100_000
    assert error(proj, f'{BASE}description = "{quotes}\n# {"[" * 101}\n').startswith(
        "sysbake.toml: line 3, column "
    )


def test_a_recursion_error_of_the_parser_is_one_error(
    proj: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tomllib

    def deep(text: str) -> dict[str, object]:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(tomllib, "loads", deep)
    assert error(proj, BASE) == (
        "sysbake.toml: nested too deeply (expected at most 100 "
        "levels of arrays, tables or dotted keys)"
    )


def test_build_refuses_deep_and_non_utf8_files_in_one_line(proj: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    for content in [
        (f"{BASE}a = " + "[" * DEEP + "]" * DEEP + "\n").encode(),
        BASE.encode() + b'description = "\xff"\n',
    ]:
        write(proj, "").write_bytes(content)
        for command in ("validate", "build"):
            result = subprocess.run(
                [sys.executable, "-m", "sysbake.cli", "--store", str(tmp_path / "store"), command],
                cwd=proj,
                capture_output=True,
                text=True,
                check=False,
            )
            assert result.returncode == 2, result.stderr
            (line,) = result.stderr.splitlines()
            assert line.startswith("sysbake: error: sysbake.toml: ")
            assert "nested more than 100 levels" in line or "not UTF-8 text" in line


def test_errors_name_the_file_as_the_user_would(
    proj: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(proj, "[images.base]\n")
    with pytest.raises(ConfigError, match=r"^sysbake.toml: images.base: needs exactly one"):
        load_project()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"^myproj/sysbake.toml: images.base: "):
        load_project(Path("myproj"))
    monkeypatch.chdir(proj / "salt")
    with pytest.raises(ConfigError, match=rf"^{proj}/sysbake.toml: images.base: "):
        load_project(proj)


# ---------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("colour = 1\n" + BASE, "colour", "images, project"),
        ("[project]\nnam = 'x'\n" + BASE, "project.nam", "did you mean 'name'?"),
        (
            BASE + "[images.base]\nparent = 'x'\n",
            "images.base.parent",
            "description, finalize, from",
        ),
        (
            '[images.base.bootstrap]\nsutie = "bookworm"\n',
            "images.base.bootstrap.sutie",
            "did you mean 'suite'? (expected one of: architecture, components, distro, hooks, "
            "keyring, mirror, packages, security, snapshot, suite, variant)",
        ),
        (
            BASE + "[images.base.config]\ncommand = []\n",
            "images.base.config.command",
            "did you mean 'cmd'?",
        ),
        (
            BASE + "[images.base.finalize]\nlog = false\n",
            "images.base.finalize.log",
            "did you mean 'logs'?",
        ),
        (
            BASE + "[images.base.test]\nunit = []\n",
            "images.base.test.unit",
            "did you mean 'units'?",
        ),
        (
            image('[[images.web.provision]]\ntype = "salt"\nstate_tree = "salt"\npillars = "p"\n'),
            "images.web.provision[1].pillars",
            "did you mean 'pillar'?",
        ),
        (
            image('[[images.web.provision]]\ntype = "project"\npath = "projects/app"\nsls = []\n'),
            "images.web.provision[1].sls",
            "expected one of: env, grains, keep_salt, mode, name, "
            "network, path, pillar, project, salt_version, type",
        ),
        (
            image('[[images.web.provision]]\ntype = "script"\nrun = "x"\nstate_tree = "salt"\n'),
            "images.web.provision[1].state_tree",
            "expected one of: env, mode, name, network, run, script, type",
        ),
        (
            image('[[images.web.provision]]\ntype = "files"\nsource = "files"\nnetwork = false\n'),
            "images.web.provision[1].network",
            "expected one of: dest, group, mode, name, owner, source, type",
        ),
        (
            image("[images.web.config]\nenv = {}\n[images.web.config.extra]\n"),
            "images.web.config.extra",
            "expected one of",
        ),
        (
            '[images."my.app".bootstrap]\nsuite = "x"\ntypo = 1\n',
            'images."my.app".bootstrap.typo',
            "unknown key",
        ),
    ],
)
def test_unknown_keys_are_errors_at_every_level(
    proj: Path, text: str, key: str, expected: str
) -> None:
    message = error(proj, text)
    assert message.startswith(f"sysbake.toml: {key}: unknown key")
    assert expected in message


# ---------------------------------------------------------------- types


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("project", "name", "12", "expected a string, got integer 12"),
        ("images.base", "tag", "true", "expected a string, got boolean true"),
        ("images.base", "description", "[]", "expected a string, got an array"),
        ("images.base.bootstrap", "suite", "12", "expected a string, got integer 12"),
        ("images.base.bootstrap", "mirror", "1.5", "expected a string, got float 1.5"),
        (
            "images.base.bootstrap",
            "components",
            '"main"',
            'expected an array of strings, got string "main"',
        ),
        ("images.base.bootstrap", "components", "[1]", "[1]: expected a string, got integer 1"),
        ("images.base.bootstrap", "packages", "[[]]", "[1]: expected a string, got an array"),
        (
            "images.base.bootstrap",
            "security",
            '"yes"',
            'expected a boolean (true or false), got string "yes"',
        ),
        ("images.base.bootstrap", "keyring", "1", "expected a path (a string), got integer 1"),
        ("images.base.bootstrap", "hooks", "1", "expected an array of paths, got integer 1"),
        (
            "images.base.bootstrap",
            "snapshot",
            "2024-01-01",
            "expected a string, got date 2024-01-01",
        ),
        ("images.base.config", "cmd", '"/sbin/init"', "expected an array of strings"),
        ("images.base.config", "env", '"LANG=C"', "expected a table of strings"),
        ("images.base.config", "env", "{ A = 1 }", "env.A: expected a string, got integer 1"),
        (
            "images.base.config",
            "labels",
            "{ a = { b = 'c' } }",
            "labels.a: expected a string, got a table",
        ),
        ("images.base.config", "ports", "[true]", "[1]: expected a port, got boolean true"),
        ("images.base.config", "ports", "[1.5]", "[1]: expected a port, got float 1.5"),
        ("images.base.config", "stop_signal", "1.0", "expected a signal name or number, got float"),
        (
            "images.base.config",
            "stop_signal",
            "false",
            "expected a signal name or number, got boolean false",
        ),
        ("images.base.config", "workdir", "0", "expected a string, got integer 0"),
        ("images.base.finalize", "logs", "1", "expected a boolean (true or false), got integer 1"),
        ("images.base.finalize", "mask", '"udev"', "expected an array of unit names"),
        ("images.base.test", "timeout", '"60"', 'expected a number of seconds, got string "60"'),
        ("images.base.test", "timeout", "true", "expected a number of seconds, got boolean true"),
        ("images.base.test", "ports", '["80"]', '[1]: expected a port number, got string "80"'),
        ("images.base.test", "commands", "[1]", "[1]: expected a shell command, got integer 1"),
        ("images.base.test", "idempotence", '"no"', "expected a boolean"),
    ],
)
def test_wrong_types(proj: Path, section: str, key: str, value: str, expected: str) -> None:
    if section == "images.base.bootstrap":
        suite = "" if key == "suite" else 'suite = "x"'
        text = f"[{section}]\n{suite}\n{key} = {value}\n"
    else:
        text = BASE + f"[{section}]\n{key} = {value}\n"
    message = error(proj, text)
    assert message.startswith(f"sysbake.toml: {section}.{key}")
    assert expected in message, message


@pytest.mark.parametrize(
    ("step", "key", "expected"),
    [
        (
            'type = "salt"\nstate_tree = 1',
            "state_tree",
            "expected an array of paths, got integer 1",
        ),
        (
            'type = "salt"\nstate_tree = "salt"\npillar = [1]',
            "pillar[1]",
            "expected a path, got integer 1",
        ),
        (
            'type = "salt"\nstate_tree = "salt"\ngrains = []',
            "grains",
            "expected a table, got an array",
        ),
        (
            'type = "salt"\nstate_tree = "salt"\nsls = "site"',
            "sls",
            "expected an array of SLS names",
        ),
        ('type = "salt"\nstate_tree = "salt"\nkeep_salt = "no"', "keep_salt", "expected a boolean"),
        ('type = "salt"\nstate_tree = "salt"\nnetwork = 0', "network", "expected a boolean"),
        ('type = "salt"\nstate_tree = "salt"\nenv = { A = true }', "env.A", "expected a string"),
        ('type = "salt"\nstate_tree = "salt"\nname = 1', "name", "expected a string, got integer"),
        ('type = "script"\nrun = 1', "run", "expected a string, got integer 1"),
        ('type = "script"\nscript = true', "script", "expected a path (a string), got boolean"),
        (
            'type = "files"\nsource = ["files"]',
            "source",
            "expected a path (a string), got an array",
        ),
        (
            'type = "files"\nsource = "files"\nowner = 1.0',
            "owner",
            "expected a user name or number",
        ),
        (
            'type = "files"\nsource = "files"\nmode = 644',
            "mode",
            'expected an octal file mode like "0644", got integer 644',
        ),
        ('type = "project"\npath = "projects/app"\nproject = 3', "project", "expected a string"),
    ],
)
def test_wrong_types_in_steps(proj: Path, step: str, key: str, expected: str) -> None:
    message = error(proj, image(f"[[images.web.provision]]\n{step}\n"))
    assert message.startswith(f"sysbake.toml: images.web.provision[1].{key}: ")
    assert expected in message, message


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("project = 1\n" + BASE, "project", "expected a table, got integer 1"),
        ("images = 1\n", "images", "expected at least one [images.<name>] table, got integer 1"),
        ("[project]\n", "images", "missing: expected at least one [images.<name>] table"),
        ("images = {}\n", "images", "missing: expected at least one"),
        ("[images]\nbase = 1\n", "images.base", "expected a table, got integer 1"),
        ("[images.base]\nbootstrap = 'debian'\n", "images.base.bootstrap", "expected a table"),
        (
            BASE + "[images.base]\nconfig = []\n",
            "images.base.config",
            "expected a table, got an array",
        ),
        (
            image("[images.web.provision]\ntype = 'salt'\n"),
            "images.web.provision",
            "expected an array of tables ([[images.web.provision]]), got a table",
        ),
        (
            BASE + '[images.web]\nfrom = "base"\nprovision = ["x"]\n',
            "images.web.provision[1]",
            "expected a table, got string",
        ),
    ],
)
def test_wrong_types_of_tables(proj: Path, text: str, key: str, expected: str) -> None:
    message = error(proj, text)
    assert message.startswith(f"sysbake.toml: {key}: "), message
    assert expected in message, message


# ---------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        # images and parents
        (
            '[images.Web.bootstrap]\nsuite = "x"\n',
            "images.Web",
            'expected an image name matching [a-z0-9][a-z0-9._-]*, got string "Web"',
        ),
        ('[images."-x".bootstrap]\nsuite = "x"\n', "images.-x", "expected an image name"),
        (
            '[images."a.b".bootstrap]\nsuite = "x"\nsuit = 1\n',
            'images."a.b".bootstrap.suit',
            "unknown key, did you mean 'suite'?",
        ),
        (
            '[images."a-".bootstrap]\nsuite = "x"\n',
            "images.a-.tag",
            "missing: 'a-:latest' is not a valid image reference",
        ),
        ("[images.base]\n", "images.base", "needs exactly one of 'from' and 'bootstrap'"),
        (
            image('[images.web.bootstrap]\nsuite = "x"\n'),
            "images.web",
            "needs exactly one of 'from' and 'bootstrap'",
        ),
        (
            BASE + '[images.web]\nfrom = "bse"\n',
            "images.web.from",
            "no image 'bse' in this file (did you mean 'base'?)",
        ),
        (
            BASE + '[images.web]\nfrom = "debian"\n',
            "images.web.from",
            "no image 'debian' in this file (an image of the store needs a tag: 'debian:latest')",
        ),
        (
            BASE + '[images.web]\nfrom = "Debian:12"\n',
            "images.web.from",
            "invalid path component 'Debian' (upper case is allowed only in the registry host): "
            "expected lowercase letters and digits, joined by '.', '_', '__' or '-', got string "
            '"Debian:12"',
        ),
        (
            BASE + '[images.web]\nfrom = "debian@sha256:abc"\n',
            "images.web.from",
            "invalid digest 'sha256:abc': expected sha256: and 64 lowercase hex digits, got string",
        ),
        (
            BASE + '[images.web]\nfrom = "base"\ntag = "Web:1"\n',
            "images.web.tag",
            "invalid path component 'Web' (upper case is allowed only in the registry host): "
            "expected lowercase letters and digits, joined by '.', '_', '__' or '-', got string "
            '"Web:1"',
        ),
        (
            BASE + '[images.web]\nfrom = "base"\ntag = "base"\n',
            "images.web.tag",
            "'base:latest' is also the tag of image 'base'",
        ),
        ("[project]\nname = ' '\n" + BASE, "project.name", "expected a non-empty string"),
        # bootstrap
        (
            '[images.base.bootstrap]\ndistro = "debian"\n',
            "images.base.bootstrap.suite",
            "missing: expected a string",
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\ndistro = "debain"\n',
            "images.base.bootstrap.distro",
            'expected one of "debian", "ubuntu", got string "debain" (did you mean \'debian\'?)',
        ),
        (
            '[images.base.bootstrap]\nsuite = "a b"\n',
            "images.base.bootstrap.suite",
            'expected a suite name like "bookworm"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\nvariant = "tiny"\n',
            "images.base.bootstrap.variant",
            'expected one of "extract", "custom", "essential", "apt", "required", "minbase", '
            '"buildd", "important", "debootstrap", "standard", got string "tiny"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\nmirror = "ftp://m/debian"\n',
            "images.base.bootstrap.mirror",
            "expected an http://, https:// or file:// URL",
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\nsnapshot = "20240101T000000Z"\n',
            "images.base.bootstrap.mirror",
            'expected a URL containing "{snapshot}" since snapshot is set, got string ""',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\nmirror = "http://m/{snapshot}"\n',
            "images.base.bootstrap.snapshot",
            'missing: the mirror contains "{snapshot}"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\nmirror = "http://m/{snapshot}"\n'
            'snapshot = "2024"\n',
            "images.base.bootstrap.snapshot",
            'expected a snapshot id like "20240101T000000Z"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\ncomponents = []\n',
            "images.base.bootstrap.components",
            'expected at least one component, like "main"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\npackages = ["a b"]\n',
            "images.base.bootstrap.packages[1]",
            'expected a package name, got string "a b"',
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\npackages = ["a,b"]\n',
            "images.base.bootstrap.packages[1]",
            "expected a package name",
        ),
        (
            '[images.base.bootstrap]\nsuite = "x"\narchitecture = "AMD64"\n',
            "images.base.bootstrap.architecture",
            "expected a dpkg architecture",
        ),
        # config
        (
            BASE + '[images.base.config]\nenv = { container = "docker" }\n',
            "images.base.config.env.container",
            "set it with images.base.config.container",
        ),
        (
            BASE + '[images.base.config]\nenv = { "A-B" = "1" }\n',
            "images.base.config.env.A-B",
            "expected an environment variable name",
        ),
        (
            BASE + "[images.base.config]\ncmd = []\n",
            "images.base.config.cmd",
            "expected a command to run (cmd or entrypoint), got an empty array",
        ),
        (
            BASE + "[images.base.config]\nports = [0]\n",
            "images.base.config.ports[1]",
            'expected a port like 80, "80/tcp" or "53/udp", got integer 0',
        ),
        (
            BASE + "[images.base.config]\nports = [80, 65536]\n",
            "images.base.config.ports[2]",
            "got integer 65536",
        ),
        (
            BASE + '[images.base.config]\nports = ["80/sctp"]\n',
            "images.base.config.ports[1]",
            'got string "80/sctp"',
        ),
        (
            BASE + '[images.base.config]\nvolumes = ["srv"]\n',
            "images.base.config.volumes[1]",
            "expected an absolute path without '..', got string \"srv\"",
        ),
        (
            BASE + '[images.base.config]\nvolumes = ["/srv/../etc"]\n',
            "images.base.config.volumes[1]",
            "expected an absolute path",
        ),
        (
            BASE + '[images.base.config]\nworkdir = "srv"\n',
            "images.base.config.workdir",
            "expected an absolute path",
        ),
        (
            BASE + '[images.base.config]\nuser = "a b"\n',
            "images.base.config.user",
            'expected a user like "www-data" or "33:33"',
        ),
        (
            BASE + '[images.base.config]\ncontainer = ""\n',
            "images.base.config.container",
            'got string ""',
        ),
        (
            BASE + '[images.base.config]\nlabels = { "" = "x" }\n',
            'images.base.config.labels.""',
            "expected a non-empty string",
        ),
        # finalize
        (
            BASE + '[images.base.finalize]\nmask = ["a b"]\n',
            "images.base.finalize.mask[1]",
            'expected a systemd unit or generator name, got string "a b"',
        ),
        (
            BASE + '[images.base.finalize]\nunmask = [""]\n',
            "images.base.finalize.unmask[1]",
            "expected a systemd unit or generator name",
        ),
        (
            BASE + '[images.base.finalize]\nremove = ["/"]\n',
            "images.base.finalize.remove[1]",
            "expected a path to delete, got '/'",
        ),
        (
            BASE + '[images.base.finalize]\nremove = ["var/log"]\n',
            "images.base.finalize.remove[1]",
            "expected an absolute path",
        ),
        # test
        (
            BASE + "[images.base.test]\ntimeout = 0\n",
            "images.base.test.timeout",
            "expected a positive number of seconds, got integer 0",
        ),
        (
            BASE + "[images.base.test]\ntimeout = -1.5\n",
            "images.base.test.timeout",
            "got float -1.5",
        ),
        (BASE + "[images.base.test]\ntimeout = inf\n", "images.base.test.timeout", "got float inf"),
        (
            BASE + "[images.base.test]\nports = [0]\n",
            "images.base.test.ports[1]",
            "expected a port number in 1..65535, got integer 0",
        ),
        (
            BASE + '[images.base.test]\ncommands = [" "]\n',
            "images.base.test.commands[1]",
            "expected a non-empty string",
        ),
    ],
)
def test_bad_values(proj: Path, text: str, key: str, expected: str) -> None:
    message = error(proj, text)
    assert message.startswith(f"sysbake.toml: {key}: ") and expected in message, message


@pytest.mark.parametrize(
    "value",
    [
        '"SIGFOO"',
        '"SIGRTMIN+31"',
        '"SIGRTMIN-1"',
        '"SIGRTMAX+1"',
        "0",
        "65",
        "32",
        '""',
        '"SIG_DFL"',
    ],
)
def test_bad_stop_signals(proj: Path, value: str) -> None:
    message = error(proj, BASE + f"[images.base.config]\nstop_signal = {value}\n")
    assert message.startswith(
        "sysbake.toml: images.base.config.stop_signal: expected a signal "
        'name like "SIGTERM" or "SIGRTMIN+3", or a number in 1..64, got '
    )


@pytest.mark.parametrize(
    ("step", "key", "expected"),
    [
        ("name = 'x'", "type", 'missing: expected one of "salt", "project", "script", "files"'),
        (
            "type = 'ansible'",
            "type",
            'expected one of "salt", "project", "script", "files", got string "ansible"',
        ),
        ("type = 1", "type", "got integer 1"),
        ("type = 'salt'\nstate_tree = 'salt'\nname = 'a b'", "name", "expected a name of letters"),
        (
            "type = 'salt'\nstate_tree = 'salt'\nmode = 'nspawn'",
            "mode",
            'expected one of "boot", "chroot", got string "nspawn"',
        ),
        ("type = 'salt'", "state_tree", "missing: expected a path or an array of paths"),
        (
            "type = 'salt'\nstate_tree = []",
            "state_tree",
            "expected at least one directory, got an empty array",
        ),
        ("type = 'salt'\nstate_tree = 'nope'", "state_tree", "directory not found: {root}/nope"),
        (
            "type = 'salt'\nstate_tree = ['salt', 'nope']",
            "state_tree[2]",
            "directory not found: {root}/nope",
        ),
        (
            "type = 'salt'\nstate_tree = 'build.sh'",
            "state_tree",
            "not a directory: {root}/build.sh",
        ),
        ("type = 'salt'\nstate_tree = ''", "state_tree", "expected a path, got an empty string"),
        (
            "type = 'salt'\nstate_tree = 'salt2'",
            "state_tree",
            "no top.sls in {root}/salt2 (add one, or list the states to apply in 'sls')",
        ),
        (
            "type = 'salt'\nstate_tree = 'salt'\npillar = 'pilar'",
            "pillar",
            "directory not found: {root}/pilar",
        ),
        (
            "type = 'salt'\nstate_tree = 'salt'\nsls = ['a b']",
            "sls[1]",
            "expected an SLS name like",
        ),
        (
            "type = 'salt'\nstate_tree = 'salt'\nsalt_version = 'latest'",
            "salt_version",
            'expected a Salt version like "3007.1", got string "latest"',
        ),
        (
            "type = 'salt'\nstate_tree = 'salt'\nenv = { '1A' = 'x' }",
            "env.1A",
            "expected an environment variable name",
        ),
        ("type = 'project'", "path", "missing: expected a path (a string)"),
        (
            "type = 'project'\npath = 'projects/nope'",
            "path",
            "directory not found: {root}/projects/nope",
        ),
        (
            "type = 'project'\npath = 'projects/bare'",
            "path",
            "directory not found: {root}/projects/bare/salt (a project keeps its states in salt/)",
        ),
        (
            "type = 'project'\npath = 'projects/app'\nproject = 'a/b'",
            "project",
            "expected a name of letters",
        ),
        (
            "type = 'project'\npath = 'projects/app'\npillar = 'nope'",
            "pillar",
            "directory not found: {root}/nope",
        ),
        ("type = 'script'", "", "needs exactly one of 'script' and 'run'"),
        (
            "type = 'script'\nrun = 'x'\nscript = 'build.sh'",
            "",
            "needs exactly one of 'script' and 'run'",
        ),
        ("type = 'script'\nrun = ''", "run", 'expected a non-empty string, got string ""'),
        ("type = 'script'\nscript = 'nope.sh'", "script", "file not found: {root}/nope.sh"),
        ("type = 'script'\nscript = 'salt'", "script", "not a file: {root}/salt"),
        ("type = 'files'", "source", "missing: expected a path (a string)"),
        ("type = 'files'\nsource = 'nope'", "source", "file or directory not found: {root}/nope"),
        ("type = 'files'\nsource = 'files'\ndest = 'etc'", "dest", "expected an absolute path"),
        (
            "type = 'files'\nsource = 'files'\nowner = 'Bad Name'",
            "owner",
            'expected a user/group name or a number, got string "Bad Name"',
        ),
        ("type = 'files'\nsource = 'files'\ngroup = -1", "group", "got integer -1"),
        (
            "type = 'files'\nsource = 'files'\nmode = '999'",
            "mode",
            'expected an octal string like "0644", got string "999"',
        ),
        ("type = 'files'\nsource = 'files'\nmode = '10644'", "mode", "expected an octal string"),
    ],
)
def test_bad_steps(proj: Path, step: str, key: str, expected: str) -> None:
    where = "images.web.provision[1]" + (f".{key}" if key else "")
    message = error(proj, image(f"[[images.web.provision]]\n{step}\n"))
    assert message.startswith(f"sysbake.toml: {where}: ")
    assert expected.format(root=proj) in message, message


def test_duplicate_step_names(proj: Path) -> None:
    steps = "".join(
        f"[[images.web.provision]]\ntype = 'script'\nrun = 'x'\nname = '{n}'\n"
        for n in ("one", "two", "one")
    )
    assert error(proj, image(steps)) == (
        "sysbake.toml: images.web.provision[3].name: 'one' is already the name of provision[1]"
    )
    default_clash = (
        "[[images.web.provision]]\ntype = 'script'\nrun = 'x'\n"
        "[[images.web.provision]]\ntype = 'script'\nrun = 'y'\nname = 'script-1'\n"
    )
    assert "provision[2].name: 'script-1' is already" in error(proj, image(default_clash))


def test_missing_keyring_and_hook(proj: Path) -> None:
    assert error(proj, BASE + 'keyring = "nope.gpg"\n') == (
        f"sysbake.toml: images.base.bootstrap.keyring: file or directory not found: {proj}/nope.gpg"
    )
    assert error(proj, BASE + 'hooks = ["hook.sh", "salt"]\n') == (
        f"sysbake.toml: images.base.bootstrap.hooks[2]: not a file: {proj}/salt"
    )
    file_keyring = load(proj, BASE + 'keyring = "keys/debian.gpg"\n').images[0].bootstrap
    no_keyring = load(proj, BASE + 'keyring = ""\n').images[0].bootstrap
    assert file_keyring is not None and file_keyring.keyring == proj / "keys/debian.gpg"
    assert no_keyring is not None and no_keyring.keyring is None


@pytest.mark.parametrize(
    ("images", "cycle"),
    [
        ({"a": "b", "b": "a"}, "a -> b -> a"),
        ({"a": "a"}, "a -> a"),
        ({"c": "a", "a": "b", "b": "a"}, "a -> b -> a"),
        ({"x": "y", "y": "z", "z": "x"}, "x -> y -> z -> x"),
    ],
)
def test_cycles(proj: Path, images: dict[str, str], cycle: str) -> None:
    text = "".join(f'[images.{name}]\nfrom = "{parent}"\n' for name, parent in images.items())
    assert error(proj, text) == f"sysbake.toml: images: cycle: {cycle}"


# ---------------------------------------------------------------- build order

ORDERED = """
[images.app]
from = "mid"
[images.mid]
from = "base"
[images.other]
from = "debian:bookworm"
[images.base.bootstrap]
suite = "bookworm"
[images.side]
from = "base"
"""


def names(specs: list[ImageSpec]) -> list[str]:
    return [s.name for s in specs]


def test_build_order(proj: Path) -> None:
    project = load(proj, ORDERED)
    assert names(project.build_order()) == ["base", "mid", "app", "other", "side"]
    assert names(project.build_order(None)) == names(project.build_order())
    assert names(project.build_order(["app"])) == ["base", "mid", "app"]
    assert names(project.build_order(["side", "app"])) == ["base", "side", "mid", "app"]
    assert names(project.build_order(["other"])) == ["other"]
    assert names(project.build_order(["mid", "mid:latest"])) == ["base", "mid"]
    assert project.build_order([]) == []
    assert project.image("side:latest").name == "side"


def test_build_order_unknown_target(proj: Path) -> None:
    project = load(proj, ORDERED)
    with pytest.raises(ConfigError) as info:
        project.build_order(["sid"])
    assert str(info.value) == (
        "sysbake.toml: no image 'sid' in this file (did you mean 'side'?) "
        "(images: app, mid, other, base, side)"
    )


# ---------------------------------------------------------------- cache inputs

FULL = """
[images.base.bootstrap]
suite = "bookworm"
packages = ["vim", "curl"]
hooks = ["hook.sh"]
keyring = "keys"

[images.base.config]
env = { B = "2", A = "1" }
labels = { y = "1", x = "2" }

[images.web]
from = "base"
description = "web"

[images.web.finalize]
mask = ["b.service", "a.service"]

[[images.web.provision]]
type = "salt"
state_tree = "salt"
pillar = "pillar"
grains = { b = 1, a = { d = 1, c = 2 } }

[[images.web.provision]]
type = "project"
path = "projects/app"

[[images.web.provision]]
type = "script"
script = "build.sh"
env = { Y = "1", X = "2" }

[[images.web.provision]]
type = "files"
source = "files"
mode = "0600"

[images.web.test]
units = ["b", "a"]
"""

REORDERED = """
[images.web]
description = "web"
from = "base"

[images.web.test]
units = ["a", "b"]

[[images.web.provision]]
grains = { a = { c = 2, d = 1 }, b = 1 }
pillar = "./pillar"
state_tree = "salt/"
type = "salt"

[[images.web.provision]]
path = "projects/app"
type = "project"

[[images.web.provision]]
env = { X = "2", Y = "1" }
script = "build.sh"
type = "script"

[[images.web.provision]]
mode = "600"
source = "files"
type = "files"

[images.web.finalize]
mask = ["a", "b.service"]

[images.base.config]
labels = { x = "2", y = "1" }
env = { A = "1", B = "2" }

[images.base.bootstrap]
keyring = "keys"
hooks = ["hook.sh"]
packages = ["curl", "vim"]
suite = "bookworm"
"""


def all_keys(project: Project) -> dict[str, object]:
    out: dict[str, object] = {}
    for spec in project.images:
        out[spec.name] = spec.key_inputs()
        out[f"{spec.name}.test"] = spec.test.key_inputs()
        for i, step in enumerate(spec.provision):
            out[f"{spec.name}.{i}"] = step.key_inputs()
    return out


def test_key_inputs_are_json_and_stable(proj: Path) -> None:
    first = all_keys(load(proj, FULL))
    assert first == all_keys(load(proj, FULL))
    assert json.loads(json.dumps(first, sort_keys=True)) == first
    web = first["web"]
    assert isinstance(web, dict)
    assert web["provision"][0]["state_tree"] == ["salt"]
    assert web["provision"][1]["path"] == "projects/app"
    assert web["provision"][2]["script"] == "build.sh"
    assert web["provision"][3] == {
        "type": "files",
        "source": "files",
        "dest": "/",
        "owner": "root",
        "group": "root",
        "mode": "0600",
    }
    assert first["base"]["bootstrap"]["keyring"] == "keys"  # type: ignore[index]
    assert first["base"]["bootstrap"]["hooks"] == ["hook.sh"]  # type: ignore[index]


def test_reordering_tables_and_keys_keeps_key_inputs(proj: Path) -> None:
    assert all_keys(load(proj, FULL)) == all_keys(load(proj, REORDERED))


def test_moving_the_project_keeps_key_inputs(proj: Path, tmp_path: Path) -> None:
    before = all_keys(load(proj, FULL))
    moved = shutil.copytree(proj, tmp_path / "elsewhere" / "renamed")
    after = load_project(moved)
    assert after.root == moved and after.images[1].provision[0].root == moved
    assert all_keys(after) == before


def test_outside_paths_stay_absolute_in_key_inputs(proj: Path, tmp_path: Path) -> None:
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared/top.sls").write_text("base: {}\n")
    project = load(
        proj,
        image(
            f'[[images.web.provision]]\ntype = "salt"\nstate_tree = ["../shared", "{proj}/salt"]\n'
        ),
    )
    assert project.images[1].provision[0].key_inputs()["state_tree"] == [
        f"{tmp_path}/shared",
        "salt",
    ]


@pytest.mark.parametrize(
    ("change", "which"),
    [
        (('packages = ["vim", "curl"]', 'packages = ["vim"]'), "base"),
        (('suite = "bookworm"', 'suite = "trixie"'), "base"),
        (('env = { B = "2", A = "1" }', 'env = { B = "2", A = "0" }'), "base"),
        (
            (
                "grains = { b = 1, a = { d = 1, c = 2 } }",
                "grains = { b = 2, a = { d = 1, c = 2 } }",
            ),
            "web.0",
        ),
        (('pillar = "pillar"', 'pillar = "salt2"'), "web.0"),
        (('env = { Y = "1", X = "2" }', 'env = { Y = "1" }'), "web.2"),
        (('mode = "0600"', 'mode = "0640"'), "web.3"),
        (('mask = ["b.service", "a.service"]', 'mask = ["a.service"]'), "web"),
        (('units = ["b", "a"]', 'units = ["a"]'), "web.test"),
    ],
)
def test_changing_an_input_changes_key_inputs(
    proj: Path, change: tuple[str, str], which: str
) -> None:
    old, new = change
    assert old in FULL
    before, after = all_keys(load(proj, FULL)), all_keys(load(proj, FULL.replace(old, new)))
    assert {k for k in before if before[k] != after[k]} >= {which}


def test_step_name_tag_and_tests_are_not_inputs(proj: Path) -> None:
    before = load(proj, FULL).images[1]
    after = load(
        proj,
        FULL.replace('type = "salt"\n', 'type = "salt"\nname = "global"\n')
        .replace('description = "web"', 'description = "web"\ntag = "shop:1"')
        .replace('units = ["b", "a"]', 'units = ["c"]'),
    ).images[1]
    assert after.provision[0].name == "global" and after.tag == "shop:1"
    assert before.key_inputs() == after.key_inputs()


def test_input_paths_name_every_hashed_file(proj: Path) -> None:
    project = load(proj, FULL)
    base, web = project.images
    assert base.bootstrap is not None
    assert base.bootstrap.input_paths() == (proj / "keys", proj / "hook.sh")
    assert [s.input_paths() for s in web.provision] == [
        (proj / "salt", proj / "pillar"),
        (proj / "projects/app",),
        (proj / "build.sh",),
        (proj / "files",),
    ]


def test_to_json_is_complete_and_serializable(proj: Path) -> None:
    project = load(proj, FULL)
    data = json.loads(json.dumps(project.to_json()))
    assert data["root"] == str(proj) and data["path"] == str(proj / "sysbake.toml")
    web = data["images"][1]
    assert web["provision"][0]["type"] == "salt"
    assert web["provision"][0]["grains"] == {"a": {"c": 2, "d": 1}, "b": 1}
    assert web["provision"][0]["state_tree"] == [str(proj / "salt")]
    assert web["provision"][3]["file_mode"] == 0o600
    assert data["images"][0]["config"]["env"] == {"A": "1", "B": "2"}
    assert "root" not in web["provision"][0]
