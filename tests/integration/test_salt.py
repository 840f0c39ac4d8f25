"""Salt inside images: a real toolchain, salt-call in a chroot of a copy-on-write image tree
(a runner like provision's chroot mode), and proof that nothing of Salt stays in the layer."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import new_store

from sysbake import proc
from sysbake.build.salt import run as salt
from sysbake.build.salt.run import SaltResult, SaltRun, Toolchain
from sysbake.errors import BuildError
from sysbake.fsutil import remove_tree
from sysbake.oci.store import Store
from sysbake.rootfs import Root

# Set to a directory to record salt-call's raw output as unit-test fixtures.
RECORD = os.environ.get("SYSBAKE_RECORD_SALT_FIXTURES", "")


@pytest.fixture(scope="session")
def toolchain_store(shared_store: Path) -> Path:
    """The run's store (its toolchains/ dir is shared across runs, see conftest)."""
    return shared_store


@pytest.fixture(scope="session")
def toolchain(toolchain_store: Path) -> Toolchain:
    start = time.monotonic()
    built = salt.ensure_toolchain(Store(toolchain_store))
    print(f"salt toolchain ready in {time.monotonic() - start:.1f}s")
    return built


@pytest.fixture(scope="session")
def image(shared_store: Path, base_image: str) -> Path:
    """The example base's tree (no Python in it), only ever a read-only overlay lower."""
    store = Store(shared_store)
    root = store.layer_tree(store.resolve(base_image).layers[-1])
    assert not list((root / "usr/bin").glob("python*")), "the image must not have Python"
    return root


class Box:
    """An overlay of `lower` with its own upper dir, and a chroot-mode Salt runner on it."""

    def __init__(self, lower: Path, base: Path) -> None:
        self.lower, self.base = lower, base
        self.stderr = ""  # of the last Salt run
        self.upper, self.work, self.mnt = base / "upper", base / "work", base / "mnt"
        for d in (self.upper, self.work, self.mnt):
            d.mkdir(parents=True, exist_ok=True)

    def _script(self, mounts: list[tuple[Path, str, bool]], files: dict[str, bytes]) -> str:
        cfg = self.base / "cfg"
        remove_tree(cfg)
        for path, data in files.items():
            target = cfg / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        q = shlex.quote
        mnt = q(str(self.mnt))
        lines = [
            f"mount -t overlay overlay -o lowerdir={self.lower},upperdir={self.upper},"
            f"workdir={self.work} {mnt}",
            f"mount -t proc proc {mnt}/proc",
            f"mount --rbind /sys {mnt}/sys",
            f"mount --rbind /dev {mnt}/dev",
            f"mount -t tmpfs tmpfs {mnt}/run",
            f"mount --bind /etc/resolv.conf {mnt}/etc/resolv.conf",
        ]
        if files:
            lines.append(f"cp -a {q(str(cfg))}/. {mnt}/")
        for host, inside, ro in mounts:
            lines.append(f"mkdir -p {mnt}{q(inside)}")
            lines.append(f"mount --bind {'-o ro ' if ro else ''}{q(str(host))} {mnt}{q(inside)}")
        lines.append(f'exec chroot {mnt} "$@"')
        return "\n".join(lines)

    def chroot(
        self,
        argv: list[str],
        *,
        mounts: list[tuple[Path, str, bool]] | None = None,
        files: dict[str, bytes] | None = None,
        env: dict[str, str] | None = None,
    ) -> tuple[int, bytes, bytes]:
        script = self._script(mounts or [], files or {})
        result = proc.run(
            ["unshare", "--mount", "--propagation", "private", "sh", "-ec", script, "sh", *argv],
            check=False,
            timeout=900,
            env=env or {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
        )
        leftover = [
            line
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if str(self.base) in line
        ]
        assert leftover == [], "mounts outlived the runner"
        return result.returncode, result.stdout, result.stderr

    def salt(self, run: SaltRun, record: str = "") -> SaltResult:
        rc, out, err = self.chroot(
            run.command(), mounts=run.mounts(), files=run.config_files(), env=run.env()
        )
        self.stderr = err.decode()
        if RECORD and record:
            Path(RECORD, f"{record}.json").write_text(
                json.dumps(
                    {"returncode": rc, "stdout": out.decode(), "stderr": err.decode()}, indent=1
                )
                + "\n"
            )
        return salt.parse_result(out, rc, err)

    def changes(self) -> list[str]:
        return sorted(str(p.relative_to(self.upper)) for p in self.upper.rglob("*"))


@pytest.fixture()
def box(image: Path, tmp_path: Path) -> Box:
    return Box(image, tmp_path / "box")


def tree(base: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (base / name).parent.mkdir(parents=True, exist_ok=True)
        (base / name).write_text(text)
    return base


TOP = "base:\n  '*':\n    - {}\n"
DEMO = """\
demo-user:
  user.present:
    - name: demo
greeting-file:
  file.managed:
    - name: /etc/greeting
    - contents: {{ pillar['greeting'] }}
    - require:
      - user: demo-user
hello-package:
  pkg.installed:
    - name: hello
as-demo:
  cmd.run:
    - name: echo "$HOME" > /home/demo/home.txt
    - runas: demo
    - creates: /home/demo/home.txt
    - require:
      - user: demo-user
"""


def test_toolchain_is_reused_without_download(
    toolchain: Toolchain,
    toolchain_store: Path,
) -> None:
    start = time.monotonic()
    again = salt.ensure_toolchain(Store(toolchain_store), toolchain.version)
    assert time.monotonic() - start < 5
    assert again == toolchain and toolchain.ordered_pillar
    assert toolchain.key == salt.toolchain_key(toolchain.version)
    assert (toolchain.path / toolchain.python).is_file()
    assert not (toolchain.path / "usr/bin/gcc").exists(), "build tools must be removed"
    links = [
        p for p in toolchain.path.rglob("*") if p.is_symlink() and os.readlink(p).startswith("/")
    ]
    assert links == [], "absolute links would point into the image"


def test_toolchain_python_is_whole_inside_an_image_without_python(
    toolchain: Toolchain, box: Box
) -> None:
    code = (
        "import sys, ssl, ctypes, sqlite3, zlib, lzma, subprocess; print(sys.prefix); "
        "print(subprocess.run(['/bin/echo', 'child'], capture_output=True).stdout)"
    )
    rc, out, err = box.chroot(
        [*toolchain.argv(salt.SALT_MOUNT), "-I", "-c", code],
        mounts=[(toolchain.path, salt.SALT_MOUNT, True)],
    )
    assert rc == 0, err.decode()
    assert out.decode().splitlines() == ["/run/sysbake/salt/usr", "b'child\\n'"]
    rc, out, err = box.chroot(
        [f"{salt.SALT_MOUNT}/sysbake/python", "-I", "-c", "import sys; print(sys.executable)"],
        mounts=[(toolchain.path, salt.SALT_MOUNT, True)],
    )
    assert (rc, out) == (0, b"/run/sysbake/salt/usr/bin/python3.11\n"), err.decode()


def test_unknown_salt_version_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(
        BuildError,
        match=r"^salt_version '9999': no such version on the "
        r"package index$",
    ):
        salt.ensure_toolchain(Store(new_store(tmp_path / "store")), "9999")


def test_killed_toolchain_build_leaves_nothing(tmp_path: Path) -> None:
    store = new_store(tmp_path / "store", share=("debs",))  # a build must really start
    code = (
        "from pathlib import Path; from sysbake.build.salt import run as salt; "
        "from sysbake.oci.store import Store; "
        f"salt.ensure_toolchain(Store(Path({str(store)!r})))"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 300
        while not list((store / "tmp").glob("toolchain-*/tree/var")):
            assert child.poll() is None and time.monotonic() < deadline, "no build started"
            time.sleep(0.5)
        time.sleep(3)  # into mmdebstrap's work, with the wheel download running beside it
    finally:
        child.kill()  # only sysbake itself: its children must follow it
        child.wait()
    deadline = time.monotonic() + 30
    while _users_of(store) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _users_of(store) == []
    assert str(store) not in Path("/proc/self/mounts").read_text()
    assert list((store / "toolchains").glob("salt-*")) == []
    removed = Store(store).clean_stale()
    assert any(name.startswith("toolchain-") for name in removed)
    assert [p.name for p in (store / "tmp").iterdir()] == []


def _users_of(path: Path) -> list[str]:
    users = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if str(path) in cmdline.read_text(errors="replace"):
                users.append(cmdline.parent.name)
    return users


def test_states_apply_without_a_trace_and_are_idempotent(
    toolchain: Toolchain, box: Box, tmp_path: Path
) -> None:
    states = tree(tmp_path / "salt", {"top.sls": TOP.format("demo"), "demo.sls": DEMO})
    pillar = tree(
        tmp_path / "pillar",
        {"top.sls": TOP.format("data"), "data.sls": "greeting: hello from pillar\n"},
    )
    run = SaltRun(toolchain, (states,), (pillar,), grains_json='{"role": "web"}')
    first = box.salt(run, record="success")
    assert first.ok, first.report()
    assert [s.id for s in first.states] == [
        "demo-user",
        "greeting-file",
        "hello-package",
        "as-demo",
    ]
    assert first.changes == 4 and first.failed == ()
    changed = box.changes()
    assert "etc/greeting" in changed and "usr/bin/hello" in changed and "home/demo" in changed
    assert (box.upper / "etc/greeting").read_text().strip() == "hello from pillar"
    assert "demo:" in (box.upper / "etc/passwd").read_text()
    # runas asks a Python started as the user for its environment: the toolchain's wrapper.
    assert (box.upper / "home/demo/home.txt").read_text() == "/home/demo\n"
    assert "Environment could not be retrieved" not in box.stderr
    assert box.stderr == "", box.stderr
    salty = [p for p in changed if "salt" in p.lower() or p.split("/")[0] in ("opt", "run", "srv")]
    assert salty == [], f"Salt left traces in the layer: {salty}"
    assert [p for p in changed if p.startswith("tmp/")] == []

    second = box.salt(run)
    assert second.ok, second.report()
    assert second.changes == 0 and len(second.states) == 4


def test_custom_modules_in_the_state_tree_are_synced_and_found(
    toolchain: Toolchain, box: Box, tmp_path: Path
) -> None:
    """A tree with `_modules/` keeps Salt's sync and its search by virtual name (a module
    file named unlike its virtual name): sysbake only skips both for trees without any."""
    module = (
        '__virtualname__ = "greeter"\n\n\ndef __virtual__():\n'
        "    return __virtualname__\n\n\ndef hello(name):\n"
        '    return "hello " + name\n'
    )
    states = tree(
        tmp_path / "salt",
        {
            "top.sls": TOP.format("custom"),
            "_modules/greeting_impl.py": module,
            "custom.sls": "/etc/custom-greeting:\n  file.managed:\n"
            "    - contents: {{ salt['greeter.hello']('world') }}\n",
        },
    )
    run = SaltRun(toolchain, (states,))
    assert run.custom_modules()
    result = box.salt(run)
    assert result.ok, result.report()
    assert (box.upper / "etc/custom-greeting").read_text().strip() == "hello world"


def test_failing_states_are_reported(toolchain: Toolchain, box: Box, tmp_path: Path) -> None:
    states = tree(
        tmp_path / "salt",
        {
            "top.sls": TOP.format("broken"),
            "broken.sls": """\
fine:
  test.succeed_without_changes: []
broken-command:
  cmd.run:
    - name: echo about to fail; exit 3
missing-source:
  file.managed:
    - name: /etc/never
    - source: salt://no-such-file
after-broken:
  cmd.run:
    - name: touch /etc/not-reached
    - require:
      - cmd: broken-command
""",
        },
    )
    result = box.salt(SaltRun(toolchain, (states,)), record="failure")
    assert not result.ok and result.returncode == 2
    failed = {s.id: s for s in result.failed}
    assert set(failed) == {"broken-command", "missing-source", "after-broken"}
    assert failed["broken-command"].function == "cmd.run"
    assert failed["broken-command"].name == "echo about to fail; exit 3"
    assert failed["missing-source"].function == "file.managed"
    assert "no-such-file" in failed["missing-source"].comment
    assert "requisite" in failed["after-broken"].comment
    assert result.error_line().startswith("3 of 4 states failed, first: broken-command (cmd.run")
    assert not (box.upper / "etc/not-reached").exists()


def test_render_errors_are_reported(toolchain: Toolchain, box: Box, tmp_path: Path) -> None:
    bad_top = tree(tmp_path / "bad-top", {"top.sls": "base:\n  '*':\n    - a\n   - b: [\n"})
    result = box.salt(SaltRun(toolchain, (bad_top,)), record="top-render-error")
    assert not result.ok and result.states == () and result.errors
    assert result.error_line().startswith("Unable to render top file: ")

    states = tree(tmp_path / "salt", {"top.sls": TOP.format("demo"), "demo.sls": DEMO})
    pillar = tree(
        tmp_path / "pillar",
        {"top.sls": TOP.format("data"), "data.sls": "greeting: {{ undefined_thing( }}\n"},
    )
    result = box.salt(SaltRun(toolchain, (states,), (pillar,)), record="pillar-render-error")
    assert not result.ok and result.states == ()
    assert result.error_line() == (
        "pillar: Rendering SLS 'data' failed, render error: Jinja "
        "syntax error: unexpected '}', expected ')'; line 1: "
        "greeting: {{ undefined_thing( }}"
    )
    assert "etc/greeting" not in box.changes()


def test_project_pillar_is_merged_over_the_global_pillar(
    toolchain: Toolchain, box: Box, tmp_path: Path
) -> None:
    states = tree(
        tmp_path / "salt",
        {
            "top.sls": TOP.format("dump"),
            "dump.sls": """\
dump:
  file.managed:
    - name: /etc/pillar.json
    - contents: |
        {{ pillar | json }}
""",
        },
    )
    glob = tree(
        tmp_path / "global",
        {
            "top.sls": TOP.format("common"),
            "common.sls": """\
shared: global
only_global: kept
nested: {a: 1, b: 1}
""",
        },
    )
    project = tree(
        tmp_path / "project",
        {
            "top.sls": TOP.format("mine"),
            "mine.sls": """\
shared: project
nested: {b: 2}
only_project: {{ grains['os'] }}
""",
        },
    )
    run = SaltRun(toolchain, (states,), (glob,), project)
    # Without a fixed order Salt merges pillar envs in random order: ask more than once.
    for attempt in range(3):
        result = box.salt(run)
        assert result.ok, result.report()
        data = json.loads((box.upper / "etc/pillar.json").read_text())
        assert data == {
            "shared": "project",
            "only_global": "kept",
            "nested": {"a": 1, "b": 2},
            "only_project": "Debian",
        }, f"attempt {attempt}"

    # A seed-style project pillar: an init.sls and no top file.
    (project / "top.sls").unlink()
    (project / "init.sls").write_text("shared: from init\n")
    assert box.salt(run).ok
    data = json.loads((box.upper / "etc/pillar.json").read_text())
    assert data["shared"] == "from init" and data["only_global"] == "kept"


def test_no_pillar_means_none_not_the_images(
    toolchain: Toolchain, box: Box, tmp_path: Path
) -> None:
    # An image's own /srv/pillar (Salt's default pillar_roots) must not be read.
    tree(box.upper / "srv/pillar", {"top.sls": TOP.format("leak"), "leak.sls": "leak: yes\n"})
    states = tree(
        tmp_path / "salt",
        {
            "top.sls": TOP.format("dump"),
            "dump.sls": """\
dump:
  file.managed:
    - name: /etc/pillar.json
    - contents: |
        {{ pillar | json }}
""",
        },
    )
    result = box.salt(SaltRun(toolchain, (states,)))
    assert result.ok, result.report()
    assert json.loads((box.upper / "etc/pillar.json").read_text()) == {}


def test_dry_run_changes_nothing(toolchain: Toolchain, box: Box, tmp_path: Path) -> None:
    states = tree(tmp_path / "salt", {"top.sls": TOP.format("demo"), "demo.sls": DEMO})
    pillar = tree(
        tmp_path / "pillar", {"top.sls": TOP.format("data"), "data.sls": "greeting: hi\n"}
    )
    result = box.salt(SaltRun(toolchain, (states,), (pillar,), test=True))
    assert result.ok, result.report()
    assert result.changes >= 2 and {s.result for s in result.changed} == {None}
    assert not (box.upper / "etc/greeting").exists()
    assert not (box.upper / "usr/bin/hello").exists()


def test_keep_salt_installs_a_working_salt_call(toolchain: Toolchain, box: Box) -> None:
    salt.install_salt(toolchain, Root(box.upper))
    assert (box.upper / "opt/sysbake/salt" / toolchain.python).is_file()
    rc, out, err = box.chroot(
        ["/usr/local/sbin/salt-call", "--local", "--out=json", "grains.item", "os", "osfinger"]
    )
    assert rc == 0, err.decode()
    assert json.loads(out)["local"] == {"os": "Debian", "osfinger": "Debian-12"}
    rc, out, err = box.chroot(["/usr/local/sbin/salt-call", "--version"])
    assert rc == 0 and out.decode().split()[:2] == ["salt-call", toolchain.version], err.decode()
