"""Salt inside images: toolchain helpers, the run's mounts/config/command, result parsing
(against recorded outputs of real runs, see tests/integration/test_salt.py), keep_salt."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from sysbake.build.salt import run as salt
from sysbake.build.salt import toolchain as salt_toolchain
from sysbake.build.salt.run import SaltRun, Toolchain
from sysbake.errors import BuildError
from sysbake.records import replace
from sysbake.rootfs import ImageTreeError, Root

DATA = Path(__file__).parent / "data" / "salt"


def _recorded(name: str) -> salt.SaltResult:
    doc = json.loads((DATA / f"{name}.json").read_text())
    return salt.parse_result(doc["stdout"].encode(), doc["returncode"], doc["stderr"].encode())


def _toolchain(path: Path = Path("/store/toolchains/salt-3007.16-abc")) -> Toolchain:
    return Toolchain(
        path=path,
        version="3007.16",
        suite="bookworm",
        architecture="amd64",
        python="usr/bin/python3.11",
        loader="usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        library_path=("usr/lib/x86_64-linux-gnu",),
        key="k" * 64,
    )


# -- toolchain helpers ----------------------------------------------------------------------


def test_loader_path_per_architecture() -> None:
    assert salt.loader_path("amd64") == "lib64/ld-linux-x86-64.so.2"
    assert salt.loader_path("arm64") == "lib/ld-linux-aarch64.so.1"
    with pytest.raises(BuildError, match="architecture 'mips' is not supported"):
        salt.loader_path("mips")


def _merged_usr(root: Path) -> Path:
    (root / "usr/lib/x86_64-linux-gnu").mkdir(parents=True)
    (root / "usr/lib64").mkdir(parents=True)
    (root / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2").write_text("loader")
    (root / "lib").symlink_to("usr/lib")
    (root / "lib64").symlink_to("usr/lib64")
    # As Debian ships it: absolute, so inside a container it would name the image's loader.
    (root / "usr/lib64/ld-linux-x86-64.so.2").symlink_to(
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    )
    return root


def test_toolchain_paths_resolve_inside_the_root(tmp_path: Path) -> None:
    root = Root(_merged_usr(tmp_path))
    real = "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert root.resolve("lib64/ld-linux-x86-64.so.2") == real
    assert root.resolve("/lib/../../../lib/x86_64-linux-gnu") == "usr/lib/x86_64-linux-gnu"
    (root.path / "loop").symlink_to("loop")
    with pytest.raises(ImageTreeError, match="too many levels of symbolic links"):
        root.resolve("loop/x")


def test_relativize_symlinks_keeps_targets_inside_the_tree(tmp_path: Path) -> None:
    root = _merged_usr(tmp_path)
    salt_toolchain._relativize_symlinks(root)
    link = root / "usr/lib64/ld-linux-x86-64.so.2"
    assert os.readlink(link) == "../../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
    assert link.read_text() == "loader"
    assert os.readlink(root / "lib") == "usr/lib"


def _sdist(path: Path, pyproject: str | None) -> Path:
    top = path.name.removesuffix(".tar.gz").removesuffix(".zip")
    files = {f"{top}/setup.py": "", f"{top}/sub/pyproject.toml": "[build-system]\nrequires=['x']"}
    if pyproject is not None:
        files[f"{top}/pyproject.toml"] = pyproject
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as z:
            for name, text in files.items():
                z.writestr(name, text)
        return path
    with tarfile.open(path, "w:gz") as t:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(text.encode())
            t.addfile(info, io.BytesIO(text.encode()))
    return path


def test_build_requirements_of_sdists(tmp_path: Path) -> None:
    modern = _sdist(
        tmp_path / "salt-3007.16.tar.gz",
        '[build-system]\nrequires = ["setuptools>=64.0", "wheel"]\n',
    )
    assert salt_toolchain.build_requirements(modern) == ["setuptools>=64.0", "wheel"]
    legacy = _sdist(tmp_path / "contextvars-2.4.tar.gz", None)
    assert salt_toolchain.build_requirements(legacy) == ["setuptools>=40.8.0", "wheel"]
    zipped = _sdist(tmp_path / "z-1.zip", '[build-system]\nrequires = ["flit_core"]\n')
    assert salt_toolchain.build_requirements(zipped) == ["flit_core"]
    no_table = _sdist(tmp_path / "n-1.tar.gz", "[project]\nname = 'n'\n")
    assert salt_toolchain.build_requirements(no_table) == ["setuptools>=40.8.0", "wheel"]


# pip's own words, as printed on this host (versions list shortened).
PIP_NO_VERSION = """\
ERROR: Could not find a version that satisfies the requirement salt==9999 (from versions: \
3007.15, 3007.16, 3007.17, 3008.5)
ERROR: No matching distribution found for salt==9999
"""
PIP_NO_DEPENDENCY = """\
INFO: pip is looking at multiple versions of salt to determine which version is compatible.
ERROR: Could not find a version that satisfies the requirement certifi>=2026.10.23 (from \
salt) (from versions: 2026.10.18, 2026.10.19.post1)
ERROR: No matching distribution found for certifi>=2026.10.23
"""


def test_pip_failures_become_one_line() -> None:
    assert (
        salt_toolchain.explain_pip_failure("9999", PIP_NO_VERSION)
        == "salt_version '9999': no such version on the package index"
    )
    assert (
        salt_toolchain.explain_pip_failure("3007.17", PIP_NO_DEPENDENCY)
        == "salt_version '3007.17': its dependency 'certifi>=2026.10.23' is not on the "
        "package index"
    )
    offline = "WARNING: Retrying...\nERROR: Could not install: connection refused\n"
    assert (
        salt_toolchain.explain_pip_failure("3007.16", offline)
        == "salt_version '3007.16': pip download failed: ERROR: Could not install: connection "
        "refused"
    )


def test_toolchain_key_is_known_before_building() -> None:
    key = salt.toolchain_key("3007.16", "amd64")
    assert len(key) == 64 and key == salt.toolchain_key("3007.16", "amd64")
    assert key != salt.toolchain_key("3007.15", "amd64")
    assert key != salt.toolchain_key("3007.16", "arm64")
    assert salt.toolchain_key("", "amd64") == salt.toolchain_key(salt.DEFAULT_SALT_VERSION, "amd64")
    with pytest.raises(BuildError, match="salt_version 'latest': expected a Salt version"):
        salt.toolchain_key("latest", "amd64")


def test_malformed_version_is_refused_before_any_work(tmp_path: Path) -> None:
    from sysbake.oci.store import Store

    with pytest.raises(BuildError, match=r"salt_version '3007; rm -rf /': expected a Salt "):
        salt.ensure_toolchain(Store(tmp_path), "3007; rm -rf /")
    assert not (tmp_path / "toolchains").exists()


def test_toolchain_argv_and_metadata_round_trip(tmp_path: Path) -> None:
    tc = _toolchain(tmp_path)
    assert tc.argv("/run/sysbake/salt") == [
        "/run/sysbake/salt/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "--library-path",
        "/run/sysbake/salt/usr/lib/x86_64-linux-gnu",
        "/run/sysbake/salt/usr/bin/python3.11",
    ]
    meta = {
        "version": tc.version,
        "suite": tc.suite,
        "architecture": tc.architecture,
        "python": tc.python,
        "loader": tc.loader,
        "library_path": list(tc.library_path),
        "key": tc.key,
    }
    salt_toolchain._write_wrapper(tmp_path, meta)
    assert Toolchain.load(tmp_path) == replace(tc, ordered_pillar=False)
    pillar = tmp_path / "opt/salt/lib/salt/pillar"
    pillar.mkdir(parents=True)
    (pillar / "__init__.py").write_text('env_order = self.opts.get("env_order") or []\n')
    assert Toolchain.load(tmp_path) == tc
    wrapper = (tmp_path / "sysbake/python").read_text()
    assert 'root="${0%/*/*}"' in wrapper
    assert '"$root/usr/bin/python3.11" "$@"' in wrapper
    assert os.access(tmp_path / "sysbake/python", os.X_OK)


def test_boot_code_starts_salt_call_from_the_toolchain(tmp_path: Path) -> None:
    # A stand-in salt package where the toolchain keeps the real one.
    lib = tmp_path / "opt/salt/lib/salt"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "scripts.py").write_text(
        "import json, sys, tempfile\n"
        "def salt_call():\n"
        "    print(json.dumps([sys.executable, tempfile.gettempdir(), sys.argv]))\n"
    )
    code = salt_toolchain.boot_code(str(tmp_path), str(tmp_path / "tmp"))
    done = subprocess.run(
        [sys.executable, "-I", "-c", code, "--local", "state.apply"],
        capture_output=True,
        check=True,
    )
    assert done.stderr == b""
    executable, tmpdir, argv = json.loads(done.stdout)
    assert executable == f"{tmp_path}/sysbake/python"
    assert tmpdir == str(tmp_path / "tmp") and (tmp_path / "tmp").is_dir()
    assert argv == ["salt-call", "--local", "state.apply"]


@pytest.mark.parametrize(
    ("body", "code", "err"),
    [
        ("    sys.exit(3)\n", 3, ""),
        ("    sys.exit('bad pillar')\n", 1, "bad pillar\n"),
        ("    return None\n", 0, ""),
    ],
)
def test_boot_code_exits_with_salts_code_after_its_atexit_work(
    tmp_path: Path, body: str, code: int, err: str
) -> None:
    """The program skips the interpreter's tear-down, not Salt's exit code, its buffered
    output or its atexit handlers."""
    lib = tmp_path / "opt/salt/lib/salt"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    flag = tmp_path / "atexit-ran"
    (lib / "scripts.py").write_text(
        "import atexit, sys\n"
        f"atexit.register(lambda: open({str(flag)!r}, 'w').close())\n"
        "def salt_call():\n"
        "    sys.stdout.write('{\"local\": {}}')  # buffered, no newline\n" + body
    )
    done = subprocess.run(
        [sys.executable, "-I", "-c", salt_toolchain.boot_code(str(tmp_path), None)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout, done.stderr) == (code, '{"local": {}}', err)
    assert flag.exists()


# -- a run: mounts, config, command ---------------------------------------------------------


def _run(tmp_path: Path, **kw: object) -> SaltRun:
    states = tmp_path / "salt"
    states.mkdir(exist_ok=True)
    return SaltRun(_toolchain(), (states,), **kw)  # type: ignore[arg-type]


def test_mounts_are_read_only_under_run(tmp_path: Path) -> None:
    glob, project = tmp_path / "g", tmp_path / "p"
    run = _run(tmp_path, pillar=(glob,), project_pillar=project)
    assert run.mounts() == [
        (_toolchain().path, "/run/sysbake/salt", True),
        (tmp_path / "salt", "/run/sysbake/srv/salt/0", True),
        (glob, "/run/sysbake/srv/pillar/0", True),
        (project, "/run/sysbake/srv/pillar/project", True),
    ]


def test_minion_config_keeps_every_write_under_run(tmp_path: Path) -> None:
    run = _run(tmp_path, pillar=(tmp_path / "a", tmp_path / "b"), grains_json='{"role": "web"}')
    files = run.config_files()
    assert list(files) == ["/run/sysbake/conf/minion"]
    config = json.loads(files["/run/sysbake/conf/minion"])
    for key in (
        "root_dir",
        "cachedir",
        "pki_dir",
        "sock_dir",
        "pidfile",
        "extension_modules",
    ):
        assert config[key].startswith("/run/sysbake/var"), key
    assert config["log_file"] == "/run/sysbake/conf/salt.log"  # followed from the host
    assert config["id"] == "sysbake" and config["file_client"] == "local"
    assert config["grains"] == {"role": "web"}
    assert config["file_roots"] == {"base": ["/run/sysbake/srv/salt/0"]}
    assert config["pillar_roots"] == {
        "base": ["/run/sysbake/srv/pillar/0", "/run/sysbake/srv/pillar/1"]
    }
    assert config["env_order"] == ["base"]


def test_without_pillar_the_images_srv_pillar_is_not_used(tmp_path: Path) -> None:
    config = json.loads(_run(tmp_path).config_files()["/run/sysbake/conf/minion"])
    assert config["pillar_roots"] == {"base": []}


def test_project_pillar_gets_its_own_env_after_base(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "top.sls").write_text("base:\n  '*':\n    - mine\n")
    files = _run(tmp_path, pillar=(tmp_path / "g",), project_pillar=project).config_files()
    config = json.loads(files["/run/sysbake/conf/minion"])
    assert config["pillar_roots"] == {
        "base": ["/run/sysbake/srv/pillar/0"],
        "project": ["/run/sysbake/conf/pillar-top/project", "/run/sysbake/srv/pillar/project"],
    }
    assert config["env_order"] == ["base", "project"]
    assert config["pillar_source_merging_strategy"] == "recurse"
    top = files["/run/sysbake/conf/pillar-top/project/top.sls"].decode()
    assert "{% include 'sysbake-user-top.sls' %}" in top
    assert "('project' if env == 'base' else env)" in top
    assert (
        files["/run/sysbake/conf/pillar-top/project/sysbake-user-top.sls"]
        == (project / "top.sls").read_bytes()
    )


def test_project_pillar_with_only_init_sls(tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    (project / "init.sls").write_text("key: value\n")
    files = _run(tmp_path, project_pillar=project).config_files()
    assert json.loads(files["/run/sysbake/conf/pillar-top/project/top.sls"]) == {
        "project": {"*": ["init"]}
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    files = _run(tmp_path, project_pillar=empty).config_files()
    config = json.loads(files["/run/sysbake/conf/minion"])
    assert list(files) == ["/run/sysbake/conf/minion"]
    assert config["pillar_roots"]["project"] == ["/run/sysbake/srv/pillar/project"]


def test_command_runs_salt_call_with_the_toolchains_loader(tmp_path: Path) -> None:
    cmd = _run(tmp_path).command()
    assert cmd[:4] == _toolchain().argv("/run/sysbake/salt")
    assert cmd[4] == "-I" and "-c" in cmd
    assert cmd[-6:] == [
        "--local",
        "--config-dir=/run/sysbake/conf",
        "--out=json",
        "--retcode-passthrough",
        "--log-level=warning",
        "state.apply",
    ]
    sls = _run(tmp_path, sls=("web", "db.server"), test=True).command()
    assert sls[-3:] == ["state.apply", "web,db.server", "test=True"]
    assert _run(tmp_path).env() == {"PATH": salt._PATH, "HOME": "/root", "LANG": "C.UTF-8"}


def test_bad_runs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(BuildError, match="sls 'web,db'"):
        _run(tmp_path, sls=("web,db",))
    with pytest.raises(BuildError, match="no state tree"):
        SaltRun(_toolchain(), ())
    with pytest.raises(BuildError, match="pillar: expected an absolute path"):
        _run(tmp_path, pillar=(Path("pillar"),))
    with pytest.raises(BuildError, match=r"grains '\[1\]': expected a JSON object"):
        _run(tmp_path, grains_json="[1]")
    old = replace(_toolchain(), version="3007.1", ordered_pillar=False)
    with pytest.raises(BuildError, match=r"^salt_version '3007.1' cannot merge a project "):
        SaltRun(old, (tmp_path,), project_pillar=tmp_path)


def test_key_inputs_hash_trees_and_never_hold_pillar_contents(tmp_path: Path) -> None:
    pillar = tmp_path / "pillar"
    pillar.mkdir()
    (pillar / "secrets.sls").write_text("password: hunter2\n")
    run = _run(tmp_path, pillar=(pillar,), sls=("web",), grains_json='{"a": 1}')
    first = salt.salt_key_inputs(run)
    assert "hunter2" not in json.dumps(first)
    assert first["salt_version"] == "3007.16" and first["toolchain"] == "k" * 64
    assert first["sls"] == ["web"] and first["grains"] == {"a": 1}
    assert salt.salt_key_inputs(run) == first
    (pillar / "secrets.sls").write_text("password: changed\n")
    assert salt.salt_key_inputs(run)["pillar"] != first["pillar"]
    assert salt.salt_key_inputs(run)["state_trees"] == first["state_trees"]


# -- results of real runs -------------------------------------------------------------------


def test_parse_success() -> None:
    result = _recorded("success")
    assert result.ok and result.returncode == 0 and result.errors == ()
    assert [(s.id, s.function, s.name) for s in result.states] == [
        ("demo-user", "user.present", "demo"),
        ("greeting-file", "file.managed", "/etc/greeting"),
        ("hello-package", "pkg.installed", "hello"),
        ("as-demo", "cmd.run", 'echo "$HOME" > /home/demo/home.txt'),
    ]
    assert result.changes == 4 and result.failed == ()
    assert result.summary == "4 states: 4 succeeded, 0 failed, 4 changed"


def test_parse_failure() -> None:
    result = _recorded("failure")
    assert not result.ok and result.returncode == 2
    assert [s.id for s in result.failed] == ["broken-command", "missing-source", "after-broken"]
    broken = result.failed[0]
    assert (broken.function, broken.name, broken.sls) == (
        "cmd.run",
        "echo about to fail; exit 3",
        "broken",
    )
    assert broken.comment
    assert result.summary == "4 states: 1 succeeded, 3 failed, 1 changed"
    assert result.error_line().startswith(
        "3 of 4 states failed, first: broken-command "
        "(cmd.run 'echo about to fail; exit 3', sls broken)"
    )
    report = result.report()
    assert "FAILED missing-source: file.managed '/etc/never'" in report
    assert "no-such-file" in report


def test_parse_top_file_render_error() -> None:
    result = _recorded("top-render-error")
    assert not result.ok and result.states == () and result.errors
    assert result.summary.startswith("Salt stopped before applying states: ")
    assert "top" in result.error_line().lower()


def test_parse_pillar_render_error() -> None:
    result = _recorded("pillar-render-error")
    assert not result.ok and result.states == ()
    assert "pillar" in result.error_line().lower()
    assert "data" in " ".join(result.errors)


def test_parse_no_matching_top_without_a_logged_reason() -> None:
    stdout = json.dumps(
        {
            "local": {
                "no_|-states_|-states_|-None": {
                    "result": False,
                    "name": "No States",
                    "changes": {},
                    "__run_num__": 0,
                    "comment": "No Top file or master_tops data matches found. Please see "
                    "master log for details.",
                }
            }
        }
    ).encode()
    result = salt.parse_result(stdout, 2, b"")
    assert not result.ok and result.states == ()
    assert result.error_line() == "No Top file or master_tops data matches found."


def test_parse_noise_and_nothing() -> None:
    success = json.loads((DATA / "success.json").read_text())["stdout"]
    noisy = salt.parse_result(("some module printed this\n" + success).encode(), 0)
    assert noisy.ok and noisy.changes == 4
    crashed = salt.parse_result(b"", 1, b"Traceback...\nImportError: no module named salt\n")
    assert not crashed.ok
    assert crashed.error_line() == (
        "salt-call printed no result (exit 1): Traceback... | ImportError: no module named salt"
    )


# -- keep_salt ------------------------------------------------------------------------------


def test_install_salt_copies_the_toolchain_and_a_wrapper(tmp_path: Path) -> None:
    source = tmp_path / "toolchain"
    (source / "usr/bin").mkdir(parents=True)
    (source / "usr/bin/python3.11").write_text("python")
    (source / "usr/lib64").mkdir()
    (source / "usr/lib64/ld").symlink_to("../bin/python3.11")
    root = tmp_path / "root"
    (root / "usr").mkdir(parents=True)
    # A link in the image pointing outside must not take the copy out of the root.
    (root / "opt").symlink_to("/nonexistent-outside")
    salt.install_salt(_toolchain(source), Root(root))
    kept = root / "nonexistent-outside/sysbake/salt"
    assert (kept / "usr/bin/python3.11").read_text() == "python"
    assert os.readlink(kept / "usr/lib64/ld") == "../bin/python3.11"
    wrapper = root / "usr/local/sbin/salt-call"
    assert os.access(wrapper, os.X_OK)
    text = wrapper.read_text()
    assert text.startswith("#!/bin/sh\n")
    assert (
        "exec /opt/sysbake/salt/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "
        "--library-path /opt/sysbake/salt/usr/lib/x86_64-linux-gnu "
        "/opt/sysbake/salt/usr/bin/python3.11 -I" in text
    )
    assert text.rstrip().endswith('"$@"')
    salt.install_salt(_toolchain(source), Root(root))  # idempotent
    assert (kept / "usr/bin/python3.11").is_file()


def test_without_custom_modules_salt_skips_their_sync_and_search(tmp_path: Path) -> None:
    config = json.loads(_run(tmp_path).config_files()["/run/sysbake/conf/minion"])
    assert config["autoload_dynamic_modules"] is False
    assert config["lazy_loader_strict_matching"] is True


def test_custom_modules_keep_salts_defaults(tmp_path: Path) -> None:
    (tmp_path / "salt" / "_modules").mkdir(parents=True)
    run = _run(tmp_path)
    assert run.custom_modules()
    config = json.loads(run.config_files()["/run/sysbake/conf/minion"])
    assert "autoload_dynamic_modules" not in config
    assert "lazy_loader_strict_matching" not in config


def _fake_salt(prefix: Path) -> None:
    lib = prefix / "opt/salt/lib/salt"
    for module in ("__init__", "minion", "state", "cli/__init__", "cli/call"):
        (lib / f"{module}.py").parent.mkdir(parents=True, exist_ok=True)
        (lib / f"{module}.py").write_text("")
    (lib / "scripts.py").write_text("def salt_call():\n    print('salt-call ran')\n")


@pytest.mark.parametrize(
    ("states", "code", "said"),
    [
        (["starting", "running"], 0, "salt-call ran"),
        (["degraded"], 0, "salt-call ran"),
        (["maintenance"], 97, "sysbake: boot: maintenance"),
    ],
)
def test_booted_salt_waits_for_systemd_first(
    tmp_path: Path, states: list[str], code: int, said: str
) -> None:
    """salt-call in a booted container imports Salt, then waits for the boot to end; a
    boot that ends badly stops it before any state runs (exit BOOT_FAILED)."""
    _fake_salt(tmp_path)
    answers = tmp_path / "answers"
    answers.write_text("\n".join(states) + "\n")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "systemctl").write_text(f"#!/bin/sh\nhead -n1 {answers}\nsed -i 1d {answers}\n")
    (fake_bin / "systemctl").chmod(0o755)
    program = salt_toolchain.boot_code(str(tmp_path), None, boot_timeout=5)
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
        timeout=30,
        check=False,
    )
    assert (out.returncode, said) == (code, (out.stdout + out.stderr).strip())
    assert code == salt_toolchain.BOOT_FAILED or code == 0


def test_booted_salt_asks_systemd_while_salt_imports(tmp_path: Path) -> None:
    """The first `systemctl is-system-running --wait` starts before Salt's imports (they
    take ~0.4 s, the boot about as long): the answer is there when they end. Salt's
    stand-in here only imports once that systemctl has run."""
    _fake_salt(tmp_path)
    started = tmp_path / "systemctl-started"
    (tmp_path / "opt/salt/lib/salt/__init__.py").write_text(
        "import os, time\n"
        "deadline = time.monotonic() + 10\n"
        f"while not os.path.exists({str(started)!r}):\n"
        "    if time.monotonic() > deadline:\n"
        "        raise SystemExit('salt imported before systemd was asked')\n"
        "    time.sleep(0.01)\n"
    )
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "systemctl").write_text(f"#!/bin/sh\ntouch {started}\necho running\n")
    (fake_bin / "systemctl").chmod(0o755)
    program = salt_toolchain.boot_code(str(tmp_path), None, boot_timeout=5)
    out = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        env={"PATH": f"{fake_bin}:/usr/bin:/bin"},
        timeout=30,
        check=False,
    )
    assert (out.returncode, (out.stdout + out.stderr).strip()) == (0, "salt-call ran")
