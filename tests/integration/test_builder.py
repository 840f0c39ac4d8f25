"""The sysbake builder image (issue 12): built by sysbake from builder/sysbake.toml, loaded
into podman and a private dockerd, and run with exactly the flags `sysbake flags --builder`
prints, it bootstraps, provisions in boot mode, tests (booting the image under its own runc)
and pushes the bundled example from a bind-mounted checkout to a registry on loopback.
Without any one of those privileges it fails the way the README's "Building in a
container" says."""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from builder_fixtures import (
    BUILDER_REF,
    CHECKOUT,
    STORE,
    Builder,
    LoadBuilder,
    caches,
    checkout,
    tail,
)
from helpers import REPO, sysbake
from services import RegistryService, run

from sysbake import __version__
from sysbake.cgroups import host_cgroup_mode
from sysbake.engines import Engine, builder_capabilities
from sysbake.oci.store import Store

pytestmark = pytest.mark.integration

ENGINES: tuple[Engine, ...] = ("podman", "docker")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
# Capability numbers (linux/capability.h), for reading /proc/self/status.
# fmt: off
CAPS = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
    "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW",
    "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT",
    "SYS_ADMIN", "SYS_BOOT", "SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD",
    "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG",
    "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
)
# fmt: on


# builder_store and builders (session fixtures, builder_fixtures.py): the builder image is
# built and loaded into each engine once per run, for this module and test_builder_cache.


@pytest.fixture(scope="module", params=ENGINES)
def builder(request: pytest.FixtureRequest, builders: LoadBuilder) -> Builder:
    """The builder loaded into podman or the test dockerd, with its printed flags."""
    engine: Engine = request.param
    service = request.getfixturevalue("podman" if engine == "podman" else "dockerd")
    return builders(engine, service)


@pytest.fixture(scope="module")
def example(
    builder: Builder, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """A fresh store volume in which the builder built the bundled example from the
    bind-mounted checkout, and the output of that `sysbake build --json`."""
    store = tmp_path_factory.mktemp(f"store-{builder.engine}")
    built = builder.run(
        "build", "--json", "examples/web", store=store, mounts=(checkout(), *caches())
    )
    return store, built


def _manifest(registry: RegistryService, repository: str, tag: str) -> bytes:
    """The manifest `repository:tag` as the registry serves it (OCI or docker schema 2)."""
    request = urllib.request.Request(
        f"{registry.url}/v2/{repository}/manifests/{tag}",
        headers={"Accept": f"{OCI_MANIFEST}, {DOCKER_MANIFEST}"},
    )
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(request, timeout=10) as response:
        return bytes(response.read())


def _stages(built: subprocess.CompletedProcess[str]) -> dict[str, dict[str, object]]:
    images = json.loads(built.stdout)["images"]
    return {f"{i['name']}/{s['stage']}": s for i in images for s in i["stages"]}


def test_the_builder_image_is_an_ordinary_sysbake_image(builder_store: Path) -> None:
    section = Store(builder_store).resolve(BUILDER_REF).config["config"]
    assert section["Entrypoint"] == ["/usr/bin/tini", "--", "/usr/local/bin/sysbake"]
    assert section["Cmd"] == ["build"]
    assert section["WorkingDir"] == CHECKOUT
    assert section["Volumes"] == {STORE: {}}
    assert "container=oci" in section["Env"]  # sysbake then runs runc --no-new-keyring


def test_the_builder_gets_exactly_the_printed_privileges(builder: Builder, tmp_path: Path) -> None:
    probe = (
        "grep -E '^(CapBnd|CapEff|Seccomp):' /proc/self/status; cat /proc/self/cgroup; "
        "unshare --user true && echo userns=yes || echo userns=no"
    )
    result = builder.run("-c", probe, store=tmp_path / "store", entrypoint="/bin/sh")
    assert result.returncode == 0, tail(result)
    status = dict(line.split(":\t", 1) for line in result.stdout.splitlines() if ":\t" in line)
    for field in ("CapBnd", "CapEff"):
        bits = int(status[field], 16)
        assert {name for i, name in enumerate(CAPS) if bits >> i & 1} == set(
            builder_capabilities()
        ), field
    assert status["Seccomp"].strip() == "2"  # a filter: the engine's, or the builder's
    # A private cgroup namespace: every hierarchy shows the builder's cgroup as its root.
    cgroups = [line for line in result.stdout.splitlines() if line[:1].isdigit()]
    assert cgroups and all(line.endswith(":/") for line in cgroups), cgroups
    if builder.engine == "docker":  # the builder's profile refuses user namespaces
        assert "userns=no" in result.stdout


def test_the_builder_builds_tests_and_pushes_the_example(
    builder: Builder,
    example: tuple[Path, subprocess.CompletedProcess[str]],
    registry: RegistryService,
) -> None:
    store, built = example
    assert built.returncode == 0, tail(built)
    stages = _stages(built)
    assert list(stages) == ["base/bootstrap", "web/system", "web/site"]
    # A new store: mmdebstrap ran in the builder, and both Salt steps booted the base.
    assert not any(stage["reused"] for stage in stages.values()), stages

    version = builder.run("--version", store=store)
    assert version.stdout.split() == ["sysbake", __version__], tail(version)

    mounts = (checkout(), *caches())
    tested = builder.run(
        "test", "web:latest", "--project", "examples/web", store=store, mounts=mounts
    )
    assert tested.returncode == 0, tail(tested)
    for line in (
        "ok    systemd: running, 0 failed units",
        "ok    unit nginx.service",
        "ok    port 80",
        "ok    idempotence: site: 3 states, no changes",
        "PASSED",
    ):
        assert line in tested.stdout, tail(tested)

    dest = f"{registry.address}/hbuild-{builder.engine}/web:1"
    pushed = builder.run("push", "--json", "web:latest", dest, store=store)
    assert pushed.returncode == 0, tail(pushed)
    digest = json.loads(pushed.stdout)["digest"]
    body = _manifest(registry, f"hbuild-{builder.engine}/web", "1")
    assert "sha256:" + hashlib.sha256(body).hexdigest() == digest


# (removed flag, what the builder's output says without it)
WITHOUT = {
    "no CAP_SYS_ADMIN": ("--cap-add=SYS_ADMIN", "cannot make /sys/fs/cgroup/"),
    "no CAP_NET_ADMIN": (
        "--cap-add=NET_ADMIN",
        "error during container init: operation not permitted",
    ),
    "no CAP_MKNOD": ("--cap-add=MKNOD", "unable to apply caps: operation not permitted"),
    "no private cgroup namespace": (
        "--cgroupns=private",
        "is not in a private cgroup namespace",
    ),
    "docker's own seccomp profile": ("--security-opt", "pivot_root .: operation not permitted"),
}


@pytest.mark.parametrize("case", list(WITHOUT))
def test_without_each_privilege_the_builder_fails_as_documented(
    builder: Builder, example: tuple[Path, subprocess.CompletedProcess[str]], case: str
) -> None:
    removed, message = WITHOUT[case]
    if removed not in builder.flags:
        # Only podman goes without a seccomp file: its default profile allows pivot_root
        # (test_the_builder_builds_tests_and_pushes_the_example builds and boots under it).
        assert (builder.engine, removed) == ("podman", "--security-opt"), builder.flags
        return
    if removed == "--cgroupns=private" and host_cgroup_mode() == "v2":
        pytest.skip("on cgroup v2 the engines give a private cgroup namespace by default")
    store, built = example
    assert built.returncode == 0, tail(built)
    failed = builder.run("test", "web:latest", store=store, flags=builder.without(removed))
    assert failed.returncode != 0, tail(failed)
    assert message in failed.stdout + failed.stderr, tail(failed)


def test_the_builder_apparmor_profile_compiles(tmp_path: Path) -> None:
    # This kernel has no AppArmor: the profile is only compiled (-Q: no kernel, -K: no cache).
    profile = tmp_path / "sysbake-builder"
    sysbake("apparmor", "--builder", "-o", profile, store=tmp_path / "store")
    checked = run(["apparmor_parser", "-Q", "-K", profile], check=False)
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "broken"
    broken.write_text(profile.read_text().replace("  pivot_root,", "  pivot_root bogus bogus,"))
    assert run(["apparmor_parser", "-Q", "-K", broken], check=False).returncode != 0


# The runner's `docker`, as far as this machine allows: the test's engine (docker, or podman,
# which takes the same flags), the loopback network, the .deb and toolchain caches, and the
# example's store in place of the job's store volume (so its build is cached).
_RUNNER_DOCKER = """\
#!/bin/bash
[ "$1" = pull ] && exit 0
if [ "$1" != run ]; then exec $ENGINE "$@"; fi
shift
args=()
for arg in "$@"; do
  case "$arg" in sysbake-store*:/var/lib/sysbake) arg="$TEST_STORE:/var/lib/sysbake" ;; esac
  args+=("$arg")
done
exec $ENGINE run --network host -v "$TEST_DEBS:/var/lib/sysbake/debs" \\
  -v "$TEST_TOOLCHAINS:/var/lib/sysbake/toolchains" "${args[@]}"
"""


def _ci_script(engine: Engine) -> tuple[str, dict[str, str], str]:
    """The shell of a CI example (GitHub Actions under docker, GitLab CI under podman),
    the variables the CI would set (beyond the test's), and the image it pushes."""
    import yaml  # type: ignore[import-untyped]

    ci = REPO / "examples" / "ci"
    project = str(REPO / "examples" / "web")
    if engine == "docker":
        (job,) = yaml.safe_load((ci / "github-actions.yml").read_text())["jobs"].values()
        steps = [step["run"] for step in job["steps"] if "run" in step]
        # GitHub reads $GITHUB_ENV between steps: the next step gets what one wrote there.
        load = 'while IFS== read -r k v; do export "$k=$v"; done <"$GITHUB_ENV"\n'
        env = {"GITHUB_WORKSPACE": project, "GITHUB_SHA": "0123456789abcdef"}
        return "\n".join(f"( {load}{s}\n)" for s in steps), env, "web:0123456789ab"
    script = "\n".join(yaml.safe_load((ci / "gitlab-ci.yml").read_text())["images"]["script"])
    env = {
        "CI_PROJECT_DIR": project,
        "CI_PROJECT_ID": "7",
        "CI_REGISTRY_USER": "ci",
        "CI_REGISTRY_PASSWORD": "secret",
        "CI_COMMIT_SHORT_SHA": "abc1234",
    }
    return script, env, "group/project/web:abc1234"


def test_the_ci_example_runs_the_builder(
    builder: Builder,
    example: tuple[Path, subprocess.CompletedProcess[str]],
    registry: RegistryService,
    tmp_path: Path,
) -> None:
    store, built = example
    assert built.returncode == 0, tail(built)
    script, ci_env, pushed = _ci_script(builder.engine)
    shims = tmp_path / "bin"
    shims.mkdir()
    (shims / "docker").write_text(_RUNNER_DOCKER)
    (shims / "docker").chmod(0o755)
    (tmp_path / "github.env").touch()
    env = {
        **builder.service.env,
        **ci_env,
        "PATH": f"{shims}:{builder.service.env['PATH']}",
        "TMPDIR": str(tmp_path),
        "ENGINE": " ".join(builder.service.client),
        "TEST_STORE": str(store),
        "TEST_DEBS": str(caches()[0].source),
        "TEST_TOOLCHAINS": str(caches()[1].source),
        "BUILDER": builder.image,
        "REGISTRY": registry.address,
        "RUNNER_TEMP": str(tmp_path),
        "GITHUB_ENV": str(tmp_path / "github.env"),
        "CI_REGISTRY": registry.address,
        "CI_REGISTRY_IMAGE": f"{registry.address}/group/project",
        "REGISTRY_USER": "ci",
        "REGISTRY_PASSWORD": "secret",
    }
    ran = run(["bash", "-ec", script], env=env, check=False, timeout=1800)
    assert ran.returncode == 0, f"{ran.stdout[-3000:]}\n{ran.stderr[-3000:]}"
    assert "PASSED" in ran.stdout
    repository, tag = pushed.rsplit(":", 1)
    assert _manifest(registry, repository, tag)
