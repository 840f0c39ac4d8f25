"""Host integration on this machine: the test services themselves, the flags printed by
`sysbake flags` booting systemd to `running` under a real dockerd and podman, the AppArmor
profile compiling with apparmor_parser, and `sysbake load` into docker and podman."""

from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from services import (
    DockerService,
    PodmanService,
    docker_daemon,
    mounts_under,
    registry_server,
    run,
)

from sysbake import engines as hostint

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def docker_base(dockerd: DockerService, shared_store: Path, base_image: str) -> str:
    """The run's base image, loaded into the test dockerd with `sysbake load`."""
    sysbake("--store", shared_store, "load", base_image, "--into", "docker", "--host", dockerd.host)
    return base_image


@pytest.fixture(scope="module")
def podman_base(podman: PodmanService, shared_store: Path, base_image: str) -> str:
    """The run's base image, loaded into the test podman store with `sysbake load`."""
    sysbake("--store", shared_store, "load", base_image, "--into", "podman", env=podman.env)
    return f"localhost/{base_image}"


def sysbake(
    *args: str | os.PathLike[str], env: dict[str, str] | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "sysbake.cli", *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800, check=False)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{shlex.join(cmd)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result


def boot_with_printed_flags(
    engine: DockerService | PodmanService, image: str, *flags_args: str | os.PathLike[str]
) -> list[str]:
    """The acceptance check: `$(sysbake FLAGS_ARGS)` boots `image` to running, 0 failed
    units, and the engine's stop shuts systemd down cleanly (exit 0, no SIGKILL)."""
    printed = sysbake(*flags_args).stdout
    assert printed.count("\n") == 1, printed
    flags = shlex.split(printed)
    container = engine.run_systemd(image, flags)
    try:
        state = engine.wait_running(container)
        assert (state, engine.failed_units(container)) == ("running", [])
        pid1 = engine.cli("exec", container, "cat", "/proc/1/comm").stdout.strip()
        assert pid1 == "systemd"
        assert engine.stop(container, timeout=30) == 0
    finally:
        engine.cli("rm", "-f", container, check=False)
    return flags


# -- the services ---------------------------------------------------------------------------------


def test_dockerd_is_private(dockerd: DockerService) -> None:
    root_dir = dockerd.cli("info", "--format", "{{.DockerRootDir}}").stdout.strip()
    assert root_dir == str(dockerd.root / "data")
    assert dockerd.host == f"unix://{dockerd.root}/docker.sock"
    assert dockerd.docker[-2:] == ["-H", dockerd.host]


def test_dockerd_stops_and_leaves_nothing(shared_store: Path, base_image: str) -> None:
    with docker_daemon() as d:
        sysbake("--store", shared_store, "load", base_image, "--into", "docker", "--host", d.host)
        container = d.cli(
            "run", "-d", "--network", "none", "--pull", "never", base_image, "sleep", "600"
        ).stdout.strip()
        assert d.running(container)
        root, pid = d.root, d.pid
        assert mounts_under(root)
    assert not Path(f"/proc/{pid}").exists()
    assert mounts_under(root) == []
    assert not root.exists()
    leftovers = [
        p
        for p in Path("/proc").iterdir()
        if p.name.isdigit() and str(root).encode() in (p / "cmdline").read_bytes()
    ]
    assert leftovers == []


def test_podman_uses_its_own_store(podman: PodmanService) -> None:
    info = podman.cli(
        "info",
        "--format",
        "{{.Store.GraphRoot}} {{.Host.OCIRuntime.Name}} {{.Host.CgroupManager}} "
        "{{.Host.EventLogger}}",
    ).stdout.split()
    assert info == [str(podman.root / "graph"), "runc", "cgroupfs", "file"]


def test_registry_answers_v2() -> None:
    with registry_server() as reg:
        status, body = reg.get("/v2/")
        assert status == 200
        assert body.strip() == b"{}"
        root, pid = reg.root, reg.pid
    assert not Path(f"/proc/{pid}").exists()
    assert not root.exists()


def test_registry_with_auth_and_tls() -> None:
    with registry_server(auth=True, tls=True) as reg:
        assert reg.url.startswith("https://127.0.0.1:")
        assert reg.get("/v2/", auth=False)[0] == 401
        assert reg.get("/v2/")[0] == 200
        wrong = dataclasses.replace(reg, password="not-it")
        assert wrong.get("/v2/")[0] == 401
        assert reg.certs_dir is not None and (reg.certs_dir / "ca.crt").is_file()


# -- sysbake flags: the printed flags boot systemd ------------------------------------------------


def test_printed_docker_flags_boot_systemd(dockerd: DockerService, docker_base: str) -> None:
    boot_with_printed_flags(dockerd, docker_base, "flags", "docker")


def test_printed_podman_flags_boot_systemd(podman: PodmanService, podman_base: str) -> None:
    boot_with_printed_flags(podman, podman_base, "flags", "podman")


def test_docker_honours_the_image_stop_signal(dockerd: DockerService, docker_base: str) -> None:
    # Our images carry StopSignal SIGRTMIN+3, so even without --stop-signal docker stops
    # systemd cleanly; overriding it with SIGTERM (docker's default for images without one)
    # makes systemd re-execute instead of stopping, and docker has to SIGKILL it.
    flags = shlex.split(sysbake("flags", "docker").stdout)
    i = flags.index("--stop-signal")
    without = flags[:i] + flags[i + 2 :]
    for extra, expected in (([], 0), (["--stop-signal", "SIGTERM"], 137)):
        container = dockerd.run_systemd(docker_base, without + extra)
        try:
            dockerd.wait_running(container)
            assert dockerd.stop(container, timeout=3) == expected
        finally:
            dockerd.cli("rm", "-f", container, check=False)


# -- sysbake apparmor -----------------------------------------------------------------------------


def test_apparmor_profile_compiles(tmp_path: Path) -> None:
    profile = tmp_path / "sysbake-systemd"
    sysbake("apparmor", "-o", profile)
    checked = run(["apparmor_parser", "-Q", "-K", profile], check=False)
    assert checked.returncode == 0, checked.stderr
    broken = tmp_path / "broken"
    broken.write_text(profile.read_text().replace("  umount,", "  umount bogus bogus,"))
    assert run(["apparmor_parser", "-Q", "-K", broken], check=False).returncode != 0


def test_apparmor_install_needs_a_kernel_with_apparmor(tmp_path: Path) -> None:
    target = tmp_path / "sysbake-systemd"
    result = sysbake("apparmor", "--install", "-o", target, check=False)
    if hostint.detect_host().apparmor:
        assert result.returncode == 0, result.stderr
        loaded = Path("/sys/kernel/security/apparmor/profiles").read_text()
        assert "sysbake-systemd (enforce)" in loaded
    else:
        assert result.returncode == 1
        assert result.stderr.strip() == (
            "sysbake: error: AppArmor is not enabled in this kernel (/sys/module/apparmor/"
            "parameters/enabled is not Y): cannot load profile sysbake-systemd"
        )
        assert not target.exists()


# -- sysbake load ---------------------------------------------------------------------------------


def test_load_archive_into_podman(
    dockerd: DockerService, podman: PodmanService, docker_base: str, tmp_path: Path
) -> None:
    # An archive written by `docker save` (not by us) goes into podman too.
    dockerd.cli("tag", docker_base, "saved-by-docker:1")
    archive = tmp_path / "saved.tar"
    dockerd.cli("save", "-o", str(archive), "saved-by-docker:1")
    out = sysbake("load", "--archive", archive, "--into", "podman", env=podman.env).stdout
    assert out.split() == ["localhost/saved-by-docker:1"]
    podman.cli("image", "inspect", "localhost/saved-by-docker:1")


def test_load_reports_an_absent_daemon(tmp_path: Path) -> None:
    archive = tmp_path / "x.tar"
    archive.write_bytes(b"")
    sock = tmp_path / "none.sock"
    result = sysbake(
        "load", "--archive", archive, "--into", "docker", "--host", f"unix://{sock}", check=False
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"sysbake: error: docker does not answer at unix://{sock}:")
    assert result.stderr.count("\n") == 1


def test_load_stored_image_into_docker_and_podman_then_boot(
    dockerd: DockerService, podman: PodmanService, shared_store: Path, base_image: str
) -> None:
    out = sysbake(
        "--store", shared_store, "load", base_image, "--into", "docker", "--host", dockerd.host
    ).stdout
    assert out.split() == [base_image]
    generic = boot_with_printed_flags(dockerd, base_image, "flags", "docker")
    # The base image carries container= and StopSignal: flags tailored to it drop both.
    tailored = boot_with_printed_flags(
        dockerd, base_image, "--store", shared_store, "flags", "docker", base_image
    )
    assert [f for f in generic if f not in tailored] == [
        "-e",
        "container=docker",
        "--stop-signal",
        "SIGRTMIN+3",
    ]
    out = sysbake(
        "--store", shared_store, "load", base_image, "--into", "podman", env=podman.env
    ).stdout
    assert out.split() == [f"localhost/{base_image}"]
    boot_with_printed_flags(podman, f"localhost/{base_image}", "flags", "podman")
