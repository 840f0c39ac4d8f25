"""Issue: provisioning — Salt (masterless), projects, scripts and files: the app image.

The example's `web` image is built once per run (`web_build`, provision_fixtures.py) into the
shared store; variants are copies of the example with one thing changed, tagged apart. Small
projects start from the store's `base:latest`, so nothing here bootstraps again, and all
Salt steps share the store's one toolchain (the unknown-version test excepted, which must
fail before building anything).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import EXAMPLE, SYSBAKE, sysbake
from provision_fixtures import (
    MESSAGE,
    StoreState,
    containers,
    copy_example,
    edit,
    exec_in,
    files_containing,
    image_refs,
    inspect,
    layer_digests,
    layer_entries,
    running,
    runtime_salt,
    salt_traces,
    stream_contains,
    web_build,
    web_image,
    write_project,
)
from services import DockerService, PodmanService

from sysbake.build.salt.run import DEFAULT_SALT_VERSION

__all__ = ["web_build", "web_image"]  # session fixtures, imported so pytest finds them

pytestmark = pytest.mark.integration

Engine = DockerService | PodmanService


def error_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("sysbake: error:")]


def report_for(doc: dict[str, object], ref: str) -> dict[str, object]:
    tests = doc["tests"]
    assert isinstance(tests, list)
    found = [t for t in tests if t["image"] == ref]
    assert len(found) == 1, f"no test report for {ref}: {tests}"
    return dict(found[0])


def check_results(report: dict[str, object]) -> dict[str, tuple[bool, str]]:
    checks = report["checks"]
    assert isinstance(checks, list)
    return {c["name"]: (c["passed"], c["detail"]) for c in checks}


def engine_boot(
    engine: Engine, image: str, flags_of: str, store: Path, probe: Callable[[str], None]
) -> None:
    """Boot `image` in docker or podman with the flags `sysbake flags` prints (plus
    --network none), wait for systemd to be running with no failed unit, run `probe` with
    the container ID, then stop it cleanly."""
    printed = sysbake("flags", flags_of, store=store).stdout
    container = engine.run_systemd(image, shlex.split(printed))
    try:
        state = engine.wait_running(container, timeout=120)
        assert (state, engine.failed_units(container)) == ("running", [])
        probe(container)
        assert engine.stop(container, timeout=30) == 0
    finally:
        engine.cli("rm", "-f", container, check=False)


# -- 1. the example builds, passes its tests, and serves its page everywhere -----------------


def test_example_builds_and_passes_its_tests(
    web_build: subprocess.CompletedProcess[str], shared_store: Path
) -> None:
    assert web_build.returncode == 0, web_build.stderr[-4000:]
    doc = json.loads(web_build.stdout)
    stages = {i["name"]: [(s["stage"], s["reused"]) for s in i["stages"]] for i in doc["images"]}
    assert stages == {"base": [("bootstrap", True)], "web": [("system", False), ("site", False)]}
    assert len(layer_digests(shared_store, "web:latest")) == 3
    assert report_for(doc, "base:latest")["passed"] is True
    web = report_for(doc, "web:latest")
    assert (web["state"], web["failed_units"], web["error"]) == ("running", [], "")
    checks = check_results(web)
    for name in (
        "unit nginx.service",
        "unit sysbake-heartbeat.timer",
        "port 80",
        f"command: curl -fsS http://127.0.0.1/ | grep -q '{MESSAGE}'",
        "command: id ops",
        "idempotence: system",
        "idempotence: site",
        "stop",
    ):
        assert checks.get(name, (False, "missing"))[0] is True, (name, checks)
    assert web["passed"] is True


def test_web_serves_the_page_under_docker(
    dockerd: DockerService, shared_store: Path, web_image: str
) -> None:
    loaded = sysbake(
        "load", web_image, "--into", "docker", "--host", dockerd.host, store=shared_store
    ).stdout.split()
    assert loaded == [web_image]

    def page(container: str) -> None:
        out = dockerd.cli("exec", container, "curl", "-fsS", "http://127.0.0.1/").stdout
        assert MESSAGE in out and "<title>sysbake example</title>" in out

    engine_boot(dockerd, web_image, "docker", shared_store, page)


def test_web_serves_the_page_under_podman(
    podman: PodmanService, shared_store: Path, web_image: str
) -> None:
    loaded = sysbake(
        "load", web_image, "--into", "podman", store=shared_store, env=podman.env
    ).stdout.split()
    assert loaded == [f"localhost/{web_image}"]

    def page(container: str) -> None:
        out = podman.cli("exec", container, "curl", "-fsS", "http://127.0.0.1/").stdout
        assert MESSAGE in out

    engine_boot(podman, f"localhost/{web_image}", "podman", shared_store, page)


# -- 2. a pillar change rebuilds only the project step ---------------------------------------


def test_project_pillar_change_rebuilds_only_the_project(
    web_image: str, shared_store: Path, tmp_path: Path
) -> None:
    project = copy_example(tmp_path / "web", "web-pillar:latest")
    new = f"Hello from a changed pillar {uuid.uuid4().hex[:8]}"
    edit(project / "projects/site/pillar/site.sls", f"message: {MESSAGE}", f"message: {new}")
    edit(
        project / "sysbake.toml",
        f"grep -q '{MESSAGE}'\",",
        f"grep -q '{new}'\",\n  \"! curl -fsS http://127.0.0.1/ | grep -q '{MESSAGE}'\",",
    )

    explained = sysbake("build", "--explain", project, store=shared_store).stdout
    lines = explained.strip().splitlines()
    assert lines[:2] == ["base: bootstrap: reused", "web: system: reused"], explained
    assert len(lines) == 3 and lines[2].startswith("web: site: rebuilt because "), explained
    # The changed input: the project's trees (its pillar among them).
    assert re.search(r"\b(trees|pillar|project_pillar)\b.* changed from ", lines[2]), lines[2]

    old, changed = (layer_digests(shared_store, r) for r in (web_image, "web-pillar:latest"))
    assert changed[:2] == old[:2], "the base and system layers must be reused as they are"
    assert changed[2] != old[2]

    report = json.loads(
        sysbake(
            "test", "--json", "--project", project, "web", store=shared_store, timeout=600
        ).stdout
    )
    assert report["image"] == "web-pillar:latest"
    checks = check_results(report)
    assert checks[f"command: curl -fsS http://127.0.0.1/ | grep -q '{new}'"][0] is True
    assert checks[f"command: ! curl -fsS http://127.0.0.1/ | grep -q '{MESSAGE}'"][0] is True
    assert report["passed"] is True, report


# -- 3. pillar data never lands in a layer, a tree or an export ------------------------------


def test_pillar_secrets_are_nowhere_in_the_store_or_exports(
    web_image: str, shared_store: Path, tmp_path: Path
) -> None:
    project = copy_example(tmp_path / "web", "web-secret:latest")
    secrets = {"global": str(uuid.uuid4()), "project": str(uuid.uuid4())}
    with open(project / "pillar/global.sls", "a") as f:
        f.write(f"db_password: {secrets['global']}\n")
    with open(project / "projects/site/pillar/site.sls", "a") as f:
        f.write(f"  api_token: {secrets['project']}\n")
    # Proof that Salt saw both values, without writing either: their digests.
    with open(project / "projects/site/salt/site/init.sls", "a") as f:
        f.write(
            '\n/etc/secret-digests:\n  file.managed:\n    - contents: "{{ '
            "pillar['db_password'] | sha256 }} {{ pillar['site']['api_token'] | sha256 "
            '}}"\n'
        )
    sysbake("build", "--target", "web", project, store=shared_store)
    digests = " ".join(
        hashlib.sha256(s.encode()).hexdigest() for s in (secrets["global"], secrets["project"])
    )
    with running(shared_store, "web-secret:latest") as name:
        assert exec_in(shared_store, name, "cat", "/etc/secret-digests").stdout.strip() == digests

    exports = tmp_path / "exports"
    exports.mkdir()
    # (an oci-archive holds the store's blobs as they are: searched below)
    for fmt, extra in (("docker-archive", ()), ("rootfs", ("--compression", "none"))):
        sysbake(
            "export",
            "web-secret:latest",
            "--format",
            fmt,
            *extra,
            "-o",
            exports / f"{fmt}.tar",
            store=shared_store,
            timeout=900,
        )

    places = [shared_store / d for d in ("oci", "trees", "cache", "containers", "tmp")]
    # The search itself works: it finds the digests in a compressed blob, a tree and
    # each export.
    digest = digests.split()[0].encode()
    found = [hit for p in places for hit in files_containing(p, digest)]
    assert any("/oci/blobs/" in hit for hit in found) and any("/trees/" in hit for hit in found)
    for secret in secrets.values():
        needle = secret.encode()
        assert [hit for p in places for hit in files_containing(p, needle)] == []
    for name in ("docker-archive.tar", "rootfs.tar"):
        with open(exports / name, "rb") as f:
            assert stream_contains(f, digest), name
        for secret in secrets.values():
            with open(exports / name, "rb") as f:
                assert not stream_contains(f, secret.encode()), name


# -- 4 and 7. deletions (whiteouts, opaque dirs), chroot mode, files with owner and mode -----

STEPS = """\
[images.steps]
from = "base:latest"

[[images.steps.provision]]
type = "script"
name = "chroot-edit"
mode = "chroot"
run = '''
test -e /etc/issue.net
rm /etc/issue.net
test -e /etc/skel/.bashrc
mv /etc/skel /etc/skel.old
mkdir /etc/skel
cp -p /etc/skel.old/.bashrc /etc/skel/
rm -rf /etc/skel.old
echo recreated > /etc/skel/only-new
state=$(systemctl is-system-running 2>/dev/null) && rc=0 || rc=$?
echo "${state:-none} rc=$rc pid1=$(cat /proc/1/comm)" > /etc/chroot-step
'''

[[images.steps.provision]]
type = "files"
name = "data"
source = "files"
dest = "/srv/data"
owner = "www-data"
group = "www-data"
mode = "0640"

[[images.steps.provision]]
type = "script"
name = "booted"
run = '''
state=$(systemctl is-system-running 2>/dev/null) && rc=0 || rc=$?
echo "${state:-none} rc=$rc pid1=$(cat /proc/1/comm)" > /etc/boot-step
'''
"""
GONE = ("/etc/issue.net", "/etc/skel/.profile")
# /etc/skel is made again with .bashrc copied back unchanged: below the opaque dir it is
# no copy-up to prune, or the image would lose it.
SKEL = [".bashrc", "only-new"]


@pytest.fixture(scope="module")
def steps_image(
    shared_store: Path, base_image: str, tmp_path_factory: pytest.TempPathFactory
) -> str:
    """An image whose steps delete a file and recreate a directory (chroot mode), copy a
    tree with owner and mode, and run a script with systemd booted."""
    root = write_project(
        tmp_path_factory.mktemp("steps"),
        {
            "sysbake.toml": STEPS,
            "files/a.conf": "alpha\n",
            "files/sub/b.conf": "beta\n",
            "files/sub/run.sh": "#!/bin/sh\necho hi\n",
        },
    )
    (root / "files/sub/run.sh").chmod(0o755)
    sysbake("build", root, store=shared_store)
    return "steps:latest"


def test_deletions_are_whiteouts_in_the_layer(
    steps_image: str, shared_store: Path, base_image: str
) -> None:
    base = inspect(shared_store, base_image)["Layers"]
    assert isinstance(base, list)
    parent = shared_store / "trees" / str(base[0]["diff_id"]).split(":")[1]
    for path in GONE:
        assert (parent / path.lstrip("/")).is_file(), f"{path} must exist in the parent"
    layers = layer_entries(shared_store, steps_image)
    assert len(layers) == len(base) + 3
    edit_layer = set(layers[len(base)])
    assert {
        "etc/.wh.issue.net",
        "etc/skel/.wh..wh..opq",
        "etc/skel/only-new",
        "etc/skel/.bashrc",
    } <= edit_layer
    # Nothing of how the steps ran: no script, no policy-rc.d of the chroot.
    assert "usr/sbin/policy-rc.d" not in edit_layer
    assert [salt_traces(names) for names in layers[len(base) :]] == [[], [], []]


def test_deleted_files_stay_deleted_under_runc(steps_image: str, shared_store: Path) -> None:
    with running(shared_store, steps_image) as name:
        for path in GONE:
            assert (
                exec_in(shared_store, name, "test", "!", "-e", path, check=False).returncode == 0
            ), f"{path} came back"
        assert exec_in(shared_store, name, "ls", "-A", "/etc/skel").stdout.split() == SKEL
        assert exec_in(shared_store, name, "cat", "/etc/skel/only-new").stdout == "recreated\n"


def _deleted_in(engine: Engine, container: str) -> None:
    for path in GONE:
        assert (
            engine.cli("exec", container, "test", "!", "-e", path, check=False).returncode == 0
        ), f"{path} came back"
    assert engine.cli("exec", container, "ls", "-A", "/etc/skel").stdout.split() == SKEL


def test_deleted_files_stay_deleted_under_docker(
    dockerd: DockerService, steps_image: str, shared_store: Path
) -> None:
    sysbake("load", steps_image, "--into", "docker", "--host", dockerd.host, store=shared_store)
    engine_boot(dockerd, steps_image, "docker", shared_store, lambda c: _deleted_in(dockerd, c))


def test_deleted_files_stay_deleted_under_podman(
    podman: PodmanService, steps_image: str, shared_store: Path
) -> None:
    sysbake("load", steps_image, "--into", "podman", store=shared_store, env=podman.env)
    engine_boot(
        podman, f"localhost/{steps_image}", "podman", shared_store, lambda c: _deleted_in(podman, c)
    )


def test_chroot_steps_run_without_systemd_and_boot_steps_with_it(
    steps_image: str, shared_store: Path
) -> None:
    with running(shared_store, steps_image) as name:
        chroot = exec_in(shared_store, name, "cat", "/etc/chroot-step").stdout.split()
        assert chroot[0] in ("offline", "none") and chroot[1] != "rc=0", chroot
        assert chroot[2] != "pid1=systemd", chroot
        boot = exec_in(shared_store, name, "cat", "/etc/boot-step").stdout.split()
        assert boot == ["running", "rc=0", "pid1=systemd"]


def test_files_step_copies_with_owner_and_mode(steps_image: str, shared_store: Path) -> None:
    with running(shared_store, steps_image) as name:
        out = exec_in(
            shared_store,
            name,
            "stat",
            "-c",
            "%n %U:%G %a",
            "/srv/data/a.conf",
            "/srv/data/sub",
            "/srv/data/sub/b.conf",
            "/srv/data/sub/run.sh",
        ).stdout
        assert out.splitlines() == [
            "/srv/data/a.conf www-data:www-data 640",
            "/srv/data/sub www-data:www-data 755",
            "/srv/data/sub/b.conf www-data:www-data 640",
            "/srv/data/sub/run.sh www-data:www-data 640",
        ]
        assert exec_in(shared_store, name, "cat", "/srv/data/sub/b.conf").stdout == "beta\n"


# -- 8. keep_salt ----------------------------------------------------------------------------

KEEP = """\
[images.keep]
from = "base:latest"

[[images.keep.provision]]
type = "salt"
name = "kept"
mode = "chroot"
state_tree = "salt"
keep_salt = true
"""


def test_keep_salt_leaves_a_working_salt_call(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    root = write_project(
        tmp_path / "keep",
        {
            "sysbake.toml": KEEP,
            "salt/top.sls": "base:\n  '*':\n    - kept\n",
            "salt/kept.sls": "/etc/kept:\n  file.managed:\n    - contents: kept by salt\n",
        },
    )
    sysbake("build", root, store=shared_store)
    top = layer_entries(shared_store, "keep:latest")[-1]
    assert "usr/local/sbin/salt-call" in top
    assert any(n.startswith("opt/sysbake/salt/") for n in top)
    assert salt_traces(top), "salt_traces must see a kept Salt"
    with running(shared_store, "keep:latest") as name:
        assert exec_in(shared_store, name, "cat", "/etc/kept").stdout.strip() == "kept by salt"
        ping = exec_in(
            shared_store, name, "/usr/local/sbin/salt-call", "--local", "--out=json", "test.ping"
        )
        assert json.loads(ping.stdout) == {"local": True}
        version = exec_in(shared_store, name, "/usr/local/sbin/salt-call", "--version")
        assert version.stdout.split()[:2] == ["salt-call", DEFAULT_SALT_VERSION]


def test_default_leaves_no_trace_of_salt(web_image: str, shared_store: Path) -> None:
    layers = layer_entries(shared_store, web_image)
    assert len(layers) == 3 and all(layers)
    assert "var/www/html/index.html" in layers[2]  # the listing sees the project's work
    assert [salt_traces(names) for names in layers] == [[], [], []]


# -- 5. bad input: one clear line, nothing tagged, cached, running or mounted ----------------

TOP = "base:\n  '*':\n    - {}\n"


def _bad(step: str, **files: str) -> dict[str, str]:
    return {
        "sysbake.toml": f'[images.bad]\nfrom = "base:latest"\n\n[[images.bad.provision]]\n{step}',
        **files,
    }


BAD_INPUT = {
    "missing-state-tree": (
        _bad('type = "salt"\nname = "system"\nstate_tree = "no-such-tree"\n'),
        2,
        ["sysbake.toml: images.bad.provision[1].state_tree", "no-such-tree"],
    ),
    "top-syntax-error": (
        _bad(
            'type = "salt"\nname = "broken-top"\nmode = "chroot"\nstate_tree = "salt"\n',
            **{"salt/top.sls": "base:\n  '*':\n    - a\n   - b: [\n"},
        ),
        1,
        ["bad: broken-top: salt: ", "top file"],
    ),
    "failing-state": (
        _bad(
            'type = "salt"\nname = "fails"\nstate_tree = "salt"\n',
            **{
                "salt/top.sls": TOP.format("fail"),
                "salt/fail.sls": "always-fails:\n  cmd.run:\n"
                "    - name: echo salt-said-no; false\n",
            },
        ),
        1,
        [
            "bad: fails: salt: 1 of 1 states failed",
            "always-fails",
            "cmd.run 'echo salt-said-no; false'",
        ],
    ),
    "failing-script-boot": (
        _bad('type = "script"\nname = "broken"\nrun = "echo step-output-xyz\\nexit 7"\n'),
        1,
        ["bad: broken: script exited 7: ", "step-output-xyz"],
    ),
    "failing-script-chroot": (
        _bad(
            'type = "script"\nname = "broken"\nmode = "chroot"\n'
            'run = "echo step-output-xyz\\nexit 7"\n'
        ),
        1,
        ["bad: broken: script exited 7: ", "step-output-xyz"],
    ),
    "pillar-render-error": (
        _bad(
            'type = "salt"\nname = "system"\nstate_tree = "salt"\npillar = "pillar"\n',
            **{
                "salt/top.sls": TOP.format("ok"),
                "salt/ok.sls": "fine:\n  test.succeed_without_changes: []\n",
                "pillar/top.sls": TOP.format("data"),
                "pillar/data.sls": "greeting: {{ undefined_thing( }}\n",
            },
        ),
        1,
        ["bad: system: salt: pillar: ", "data", "undefined_thing("],
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error_and_leaves_nothing(
    case: str, shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    files, code, expected = BAD_INPUT[case]
    project = write_project(tmp_path / "bad", files)
    before = StoreState.of(shared_store)
    result = sysbake("build", project, store=shared_store, check=False, timeout=900)
    assert result.returncode == code, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], (text, errors[0])
    assert "Traceback" not in result.stderr
    if case == "failing-state":  # the report names the failed state with its comment
        assert "FAILED always-fails: cmd.run 'echo salt-said-no; false' (sls fail)" in result.stderr
        assert (
            'Command "echo salt-said-no; false" run'
            in result.stderr.split("FAILED always-fails", 1)[1]
        )
    StoreState.of(shared_store).assert_same_as(before)


def test_keep_failed_keeps_the_failed_step_container_for_inspection(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    """--keep-failed: the booted container of a failed step stays, running, named on
    stderr; what the step wrote is there to inspect. Nothing is tagged or cached."""
    project = write_project(
        tmp_path / "kept",
        _bad(
            'type = "script"\nname = "broken"\nrun = "echo typed-evidence > /root/evidence\\n'
            'exit 7"\n'
        ),
    )
    before = StoreState.of(shared_store)
    result = sysbake(
        "build", "--keep-failed", project, store=shared_store, check=False, timeout=900
    )
    kept = re.search(r"kept the failed container (build-[0-9a-f]+)", result.stderr)
    assert result.returncode == 1 and kept is not None, result.stderr
    assert error_lines(result) == [error_lines(result)[0]]
    assert "bad: broken: script exited 7" in error_lines(result)[0]
    try:
        shown = sysbake("exec", kept.group(1), "cat", "/root/evidence", store=shared_store)
        assert shown.stdout == "typed-evidence\n"
    finally:
        sysbake("rm", "-f", kept.group(1), store=shared_store)
    StoreState.of(shared_store).assert_same_as(before)


def test_a_systemd_that_ends_at_once_fails_the_salt_step_clearly(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    """Salt starts beside the booting systemd (no wait for it first): a PID 1 that ends at
    once is still reported as such, with its console output."""
    project = write_project(
        tmp_path / "nosystemd",
        {
            "sysbake.toml": '[images.broken]\nfrom = "base:latest"\n\n'
            '[[images.broken.provision]]\ntype = "script"\nname = "break"\n'
            'mode = "chroot"\nrun = """\nprintf \'#!/bin/sh\\necho no-boot-here\\n'
            'exit 3\\n\' > /lib/systemd/systemd\n"""\n\n'
            '[images.bad]\nfrom = "broken:latest"\n\n'
            '[[images.bad.provision]]\ntype = "salt"\nname = "system"\n'
            'state_tree = "salt"\n',
            "salt/top.sls": TOP.format("ok"),
            "salt/ok.sls": "fine:\n  test.succeed_without_changes: []\n",
        },
    )
    sysbake("build", "--target", "broken", project, store=shared_store)
    before = StoreState.of(shared_store)
    result = sysbake(
        "build", "--target", "bad", project, store=shared_store, check=False, timeout=300
    )
    assert result.returncode == 1, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(
        "sysbake: error: bad: system: the image's systemd ended during the step: "
    ), errors
    assert "no-boot-here" in errors[0]
    StoreState.of(shared_store).assert_same_as(before)


def test_unknown_salt_version_fails_fast(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(
        tmp_path / "bad",
        _bad(
            'type = "salt"\nname = "system"\nsalt_version = "9999.1"\nstate_tree = "salt"\n',
            **{
                "salt/top.sls": TOP.format("ok"),
                "salt/ok.sls": "fine:\n  test.succeed_without_changes: []\n",
            },
        ),
    )
    before = StoreState.of(shared_store)
    started = time.monotonic()
    result = sysbake("build", project, store=shared_store, check=False, timeout=600)
    elapsed = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    errors = error_lines(result)
    assert len(errors) == 1, result.stderr
    assert "salt_version '9999.1': no such version on the package index" in errors[0]
    assert "bad: system: " in errors[0], "the error must name the image and the step"
    # Before any bootstrap or wheel download: only the index was asked.
    assert "bootstrapping" not in result.stderr and "pip install" not in result.stderr
    assert elapsed < 90, f"took {elapsed:.0f}s to find out"
    assert list((shared_store / "toolchains").glob("salt-9999.1-*")) == []
    assert list((shared_store / "toolchains" / "wheels").glob("salt-9999.1-*")) == []
    StoreState.of(shared_store).assert_same_as(before)


# -- 5b. interrupted in the middle of a Salt run ---------------------------------------------

SLEEPY = """\
[images.sleepy]
from = "base:latest"

[[images.sleepy.provision]]
type = "salt"
name = "slow"
state_tree = "salt"
"""
SLEEP = "sleep 97"


def _sleepy_project(root: Path, command: str = SLEEP) -> Path:
    # A fresh comment each time: the step never comes from the cache.
    return write_project(
        root,
        {
            "sysbake.toml": SLEEPY,
            "salt/top.sls": TOP.format("slow"),
            "salt/slow.sls": f"# {uuid.uuid4()}\ntake-your-time:\n  cmd.run:\n"
            f"    - name: {command}\n",
        },
    )


def _salt_sleeps_in(store: Path) -> list[int]:
    """PIDs of the state's `sleep` (or its shell) running in a build container of `store`."""
    cgroup = re.compile(rf"/build-[0-9a-f]+\.{runtime_salt(store)}$", re.M)
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if (
                entry.name.isdigit()
                and SLEEP
                in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                and cgroup.search((entry / "cgroup").read_text())
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def _start_and_wait_for_salt(project: Path, store: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        build = subprocess.Popen(
            [*SYSBAKE, "--store", str(store), "build", str(project)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    deadline = time.monotonic() + 900  # the toolchain may still have to be built
    while not _salt_sleeps_in(store):
        if build.poll() is not None or time.monotonic() > deadline:
            build.kill()
            build.wait()
            pytest.fail(f"the salt state never ran:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    assert [c for c in containers(store) if c.startswith("build-")], (
        "the salt run must show as a build container in `sysbake ps`"
    )
    return build


def test_ctrl_c_in_a_salt_run_cleans_up(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = _sleepy_project(tmp_path / "sleepy")
    before = StoreState.of(shared_store)
    build = _start_and_wait_for_salt(project, shared_store, tmp_path / "build.log")
    os.kill(build.pid, signal.SIGINT)
    try:
        code = build.wait(120)
    finally:
        if build.poll() is None:
            build.kill()
            build.wait()
    output = (tmp_path / "build.log").read_text()
    assert code == 130, output[-3000:]
    assert "sysbake: interrupted" in output and "Traceback" not in output
    assert _salt_sleeps_in(shared_store) == []
    StoreState.of(shared_store).assert_same_as(before)


def test_kill_9_in_a_salt_run_then_a_build_reaps_the_orphan(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = _sleepy_project(tmp_path / "sleepy")
    before = StoreState.of(shared_store)
    build = _start_and_wait_for_salt(project, shared_store, tmp_path / "build.log")
    orphans = {c for c in containers(shared_store) if c.startswith("build-")}
    build.kill()
    build.wait()
    assert orphans <= containers(shared_store), "kill -9 left no orphan to reap"
    assert image_refs(shared_store) == before.images
    # The next build (the state no longer sleeps) removes the orphan and succeeds.
    _sleepy_project(project, "sleep 1")
    sysbake("build", project, store=shared_store, timeout=900)
    assert "sleepy:latest" in image_refs(shared_store)
    after = StoreState.of(shared_store)
    assert after.containers & orphans == set(), "the orphaned build container is still there"
    assert [c for c in after.containers if c.startswith("build-")] == []
    assert after.runc == before.runc and after.mounts == before.mounts
    assert _salt_sleeps_in(shared_store) == []
    assert after.staging - before.staging == set()


# -- 6. sysbake test re-applies Salt and fails on changes ------------------------------------

NOT_IDEMPOTENT = """\
[images.restless]
from = "base:latest"

[[images.restless.provision]]
type = "salt"
name = "stamp"
state_tree = "salt"
"""


def test_idempotence_check_names_the_state_that_changes(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(
        tmp_path / "restless",
        {
            "sysbake.toml": NOT_IDEMPOTENT,
            "salt/top.sls": TOP.format("stamp"),
            "salt/stamp.sls": "stamp-every-run:\n  cmd.run:\n    - name: date > /var/tmp/stamp\n"
            "settled:\n  file.managed:\n    - name: /etc/settled\n"
            "    - contents: settled\n",
        },
    )
    sysbake("build", project, store=shared_store)
    result = sysbake(
        "test", "--project", project, "restless", store=shared_store, check=False, timeout=600
    )
    assert result.returncode == 1, result.stdout + result.stderr
    failing = [line for line in result.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert failing and "stamp-every-run" in "\n".join(failing), result.stdout
    assert "/etc/settled" not in "\n".join(failing), "only the state that changes is named"
    assert result.stdout.rstrip().endswith("FAILED")


def test_idempotence_check_passes_on_the_example(web_image: str, shared_store: Path) -> None:
    report = json.loads(
        sysbake(
            "test", "--json", "--project", EXAMPLE, "web", store=shared_store, timeout=600
        ).stdout
    )
    idempotence = {
        name: passed
        for name, (passed, _) in check_results(report).items()
        if "idempot" in name.lower()
    }
    assert idempotence and all(idempotence.values()), check_results(report)
    assert report["passed"] is True
