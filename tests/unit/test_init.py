"""`sysbake init` and `sysbake validate`: the starter project loads, and its examples are valid."""

from __future__ import annotations

import json
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from sysbake import cli, commands
from sysbake.commands.project import init_project, starter_name
from sysbake.errors import ConfigError
from sysbake.project.load import ProjectStep, SaltStep, ScriptStep, load_project

STARTER_FILES = [
    "pillar/site.sls",
    "pillar/top.sls",
    "salt/site/index.html.jinja",
    "salt/site/init.sls",
    "salt/top.sls",
    "sysbake.toml",
]


Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def sysbake(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Run:
    """Run the real command line with only this module's commands registered."""
    monkeypatch.setattr(commands, "COMMANDS", {"project": commands.COMMANDS["project"]})

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_starter_project_loads(tmp_path: Path) -> None:
    root = tmp_path / "shop"
    written = init_project(root)
    assert sorted(str(p.relative_to(root)) for p in written) == STARTER_FILES
    for path in written:
        text = path.read_text()
        assert "@NAME@" not in text and "@KEY@" not in text
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert sorted(p.name for p in root.rglob(".*")) == []  # no temporary files left

    project = load_project(root)
    assert project.name == "shop"
    base, app = project.images
    assert (base.name, app.name, app.parent, app.parent_is_local) == ("base", "shop", "base", True)
    assert base.bootstrap is not None
    assert (base.bootstrap.distro, base.bootstrap.suite, base.bootstrap.mirror) == (
        "debian",
        "bookworm",
        "",
    )
    (step,) = app.provision
    assert isinstance(step, SaltStep)
    assert (step.state_tree, step.pillar, step.sls) == ((root / "salt",), (root / "pillar",), ())
    assert app.test.units == ("nginx.service",) and app.test.ports == (80,)
    assert app.test.commands == ("grep -q 'Hello from shop' /var/www/html/index.html",)
    assert app.config.ports == ("80/tcp",)
    assert [s.name for s in project.build_order(["shop"])] == ["base", "shop"]


def test_starter_states_and_pillar_fit_together(tmp_path: Path) -> None:
    init_project(tmp_path, name="site")
    top = (tmp_path / "salt/top.sls").read_text()
    assert "- site" in top and (tmp_path / "salt/site/init.sls").is_file()
    assert "salt://site/index.html.jinja" in (tmp_path / "salt/site/init.sls").read_text()
    used = set(
        re.findall(
            r"pillar\['site'\]\['(\w+)'\]", (tmp_path / "salt/site/index.html.jinja").read_text()
        )
    )
    pillar = (tmp_path / "pillar/site.sls").read_text()
    assert used == {"title", "message"}
    assert all(re.search(rf"^  {key}: ", pillar, re.M) for key in used)
    assert 'title: "Hello from site"' in pillar
    assert "- site" in (tmp_path / "pillar/top.sls").read_text()


@pytest.mark.parametrize(
    ("directory", "expected"),
    [
        ("web", "web"),
        ("My App", "my-app"),
        ("Shop_2.0", "shop_2.0"),
        ("--x--", "x"),
        ("base", "web"),
        ("...", "web"),
        ("été", "t"),
    ],
)
def test_starter_name_from_directory(directory: str, expected: str) -> None:
    assert starter_name(Path("/srv") / directory) == expected


def test_name_with_a_dot_is_quoted_as_a_toml_key(tmp_path: Path) -> None:
    init_project(tmp_path / "Shop.Front")
    assert '[images."shop.front".config]' in (tmp_path / "Shop.Front/sysbake.toml").read_text()
    assert [i.name for i in load_project(tmp_path / "Shop.Front").images] == ["base", "shop.front"]


def test_explicit_name(tmp_path: Path) -> None:
    init_project(tmp_path, name="api")
    assert load_project(tmp_path).image("api:latest").name == "api"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("Api", "--name: expected an image name matching [a-z0-9][a-z0-9._-]*, got 'Api'"),
        ("", "--name: expected an image name"),
        ("base", "--name: 'base' is the starter's parent image: choose another name"),
    ],
)
def test_bad_names(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        init_project(tmp_path, name=name)
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_overwrite_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "pillar").mkdir()
    (tmp_path / "pillar/top.sls").write_text("mine\n")
    (tmp_path / "sysbake.toml").write_text("mine\n")
    with pytest.raises(ConfigError) as info:
        init_project(tmp_path)
    assert (
        str(info.value) == f"{tmp_path}: would overwrite pillar/top.sls, sysbake.toml (use --force)"
    )
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "pillar",
        "pillar/top.sls",
        "sysbake.toml",
    ]
    assert (tmp_path / "sysbake.toml").read_text() == "mine\n"

    init_project(tmp_path, force=True)
    assert (tmp_path / "pillar/top.sls").read_text() != "mine\n"
    load_project(tmp_path)


def _examples(text: str) -> tuple[list[int], list[list[int]]]:
    """Line numbers of commented-out single settings, and of commented-out example tables."""
    singles: list[int] = []
    blocks: list[list[int]] = []
    in_block = False
    for number, line in enumerate(text.splitlines()):
        if line.startswith("# ["):
            blocks.append([number])
            in_block = True
        elif in_block and line.startswith("# "):
            blocks[-1].append(number)
        else:
            in_block = False
            if re.match(r"# [a-z_]+ = ", line):
                singles.append(number)
    return singles, blocks


def _uncommented(text: str, numbers: list[int]) -> str:
    lines = text.splitlines()
    for number in numbers:
        lines[number] = lines[number][2:]
    return "\n".join(lines) + "\n"


def test_every_commented_example_in_the_starter_is_valid(tmp_path: Path) -> None:
    init_project(tmp_path, name="web")
    # What the examples refer to.
    (tmp_path / "files").mkdir()
    (tmp_path / "projects/app/salt").mkdir(parents=True)
    original = (tmp_path / "sysbake.toml").read_text()
    singles, blocks = _examples(original)
    assert len(singles) >= 10 and len(blocks) == 4
    for numbers in [[n] for n in singles] + blocks:
        example = _uncommented(original, numbers)
        (tmp_path / "sysbake.toml").write_text(example)
        if "snapshot = " in example.splitlines()[numbers[0]]:
            # A snapshot needs a mirror with "{snapshot}": the comment says so.
            with pytest.raises(ConfigError, match=r"bootstrap.mirror: expected a URL containing"):
                load_project(tmp_path)
            continue
        project = load_project(tmp_path)
        assert project.images[1].name == "web"
    kinds = [type(s) for s in load_project(tmp_path).images[1].provision]
    assert kinds == [SaltStep]  # the last example loaded was the finalize table
    (tmp_path / "sysbake.toml").write_text(_uncommented(original, blocks[2]))
    assert [type(s) for s in load_project(tmp_path).images[1].provision] == [SaltStep, ProjectStep]
    (tmp_path / "sysbake.toml").write_text(_uncommented(original, blocks[0]))
    assert [type(s) for s in load_project(tmp_path).images[1].provision] == [SaltStep, ScriptStep]


# ---------------------------------------------------------------- the command line


def test_cli_init_then_validate(
    sysbake: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = sysbake("init", "blog")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == f"created a starter project in {tmp_path}/blog:"
    assert "  salt/site/init.sls" in out.splitlines()
    assert out.splitlines()[-1] == "next: cd blog && sysbake build"

    assert sysbake("validate", "blog") == (0, "ok: 2 images (base, blog)\n", "")
    assert sysbake("validate", "blog/sysbake.toml") == (0, "ok: 2 images (base, blog)\n", "")
    monkeypatch.chdir(tmp_path / "blog")
    assert sysbake("validate") == (0, "ok: 2 images (base, blog)\n", "")

    code, out, err = sysbake("--json", "validate")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert [i["name"] for i in data["images"]] == ["base", "blog"]
    assert data["images"][1]["provision"][0]["state_tree"] == [str(tmp_path / "blog/salt")]


def test_cli_init_in_current_directory_with_json(
    sysbake: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, _ = sysbake("init", "--name", "api", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["directory"] == str(tmp_path)
    assert sorted(data["files"]) == [str(tmp_path / f) for f in STARTER_FILES]
    code, out, _ = sysbake("init")
    assert code == 2 and out == ""
    code, out, _ = sysbake("init", "--force", "--name", "api")
    assert (code, out.splitlines()[-1]) == (0, "next: sysbake build")


def test_cli_errors_are_one_line_with_exit_code_2(
    sysbake: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert sysbake("validate") == (
        2,
        "",
        f"sysbake: error: no sysbake.toml in {tmp_path} (run 'sysbake init')\n",
    )
    assert sysbake("validate", "nope.toml") == (
        2,
        "",
        "sysbake: error: nope.toml: no such file or directory\n",
    )
    (tmp_path / "sysbake.toml").write_text('[images.web.bootstrap]\nsutie = "bookworm"\n')
    code, out, err = sysbake("validate")
    assert (code, out) == (2, "")
    assert err.startswith(
        "sysbake: error: sysbake.toml: images.web.bootstrap.sutie: unknown key, "
        "did you mean 'suite'? (expected one of: architecture, "
    )
    assert err.count("\n") == 1
    sysbake("init", "--force")
    code, _, err = sysbake("init", "--name", "Bad")
    assert (code, err) == (
        2,
        "sysbake: error: --name: expected an image name matching [a-z0-9][a-z0-9._-]*, got 'Bad'\n",
    )
