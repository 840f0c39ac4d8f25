"""Host integration without a host: host facts from a fake /proc and /sys, flag selection
over every combination of host facts, the AppArmor profile text and load output parsing."""

from __future__ import annotations

import io
import itertools
import json
import os
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from sysbake import cli
from sysbake import engines as hostint
from sysbake.cgroups import CgroupMode
from sysbake.engines import HostError, HostFacts, ImageFacts, select_flags

V2 = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""
HYBRID = """\
25 30 0:22 / /sys rw - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
36 35 0:31 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
37 35 0:32 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
38 35 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
"""
V1 = """\
35 25 0:30 / /sys/fs/cgroup rw - tmpfs tmpfs rw,mode=755
37 35 0:32 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,name=systemd
38 35 0:33 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct
"""
MODES = {"v1": V1, "hybrid": HYBRID, "v2": V2}
KNOWN_GOOD_DOCKER = (
    "--tmpfs /run --tmpfs /run/lock --tmpfs /tmp "
    "-v /sys/fs/cgroup:/sys/fs/cgroup:ro -e container=docker "
    "--stop-signal SIGRTMIN+3"
)


def test_capability_bits() -> None:
    assert hostint.has_capability("CapEff:\t000001ffffffffff\n", 24)
    assert not hostint.has_capability("CapEff:\t000001fffeffffff\n", 24)
    assert not hostint.has_capability("Name: x\n", 24)


def _fake_root(
    tmp_path: Path, *, mountinfo: str, capeff: str, apparmor: str | None, profiles: str = ""
) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/status").write_text(f"Name:\tx\nCapEff:\t{capeff}\n")
    if apparmor is not None:
        params = tmp_path / "sys/module/apparmor/parameters"
        params.mkdir(parents=True)
        (params / "enabled").write_text(apparmor)
        if profiles:
            sec = tmp_path / "sys/kernel/security/apparmor"
            sec.mkdir(parents=True)
            (sec / "profiles").write_text(profiles)
    return tmp_path


def test_detect_host_reads_the_tree(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, mountinfo=HYBRID, capeff="000001fffeffffff", apparmor=None)
    assert hostint.detect_host(root, euid=0) == HostFacts(
        cgroup_mode="hybrid",
        rootless=False,
        apparmor=False,
        apparmor_profile_loaded=False,
        cap_sys_resource=False,
    )


def test_detect_host_apparmor_and_loaded_profile(tmp_path: Path) -> None:
    root = _fake_root(
        tmp_path,
        mountinfo=V2,
        capeff="000001ffffffffff",
        apparmor="Y\n",
        profiles="docker-default (enforce)\nsysbake-systemd (enforce)\n",
    )
    facts = hostint.detect_host(root, euid=1000)
    assert facts == HostFacts(
        cgroup_mode="v2",
        rootless=True,
        apparmor=True,
        apparmor_profile_loaded=True,
        cap_sys_resource=True,
    )


def test_detect_host_apparmor_disabled(tmp_path: Path) -> None:
    root = _fake_root(tmp_path, mountinfo=V1, capeff="0", apparmor="N\n")
    assert hostint.detect_host(root, euid=0).apparmor is False


def test_known_good_set_for_this_kind_of_host() -> None:
    host = HostFacts(cgroup_mode="hybrid", cap_sys_resource=False)
    assert select_flags("docker", host).line() == KNOWN_GOOD_DOCKER
    assert select_flags("podman", host).flags == ("--systemd=always", "--runtime=runc")


IMAGES = (
    None,
    ImageFacts("bare:1"),
    ImageFacts(
        "baked:1",
        stop_signal="SIGRTMIN+3",
        container_env="docker",
        command=("/lib/systemd/systemd",),
    ),
    ImageFacts("numeric:1", stop_signal="37"),
    ImageFacts("term:1", stop_signal="SIGTERM", container_env="oci"),
)


def _pairs(flags: tuple[str, ...], name: str) -> list[str]:
    return [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]


def _check(engine: hostint.Engine, host: HostFacts, image: ImageFacts | None) -> None:
    chosen = select_flags(engine, host, image)
    flags = chosen.flags
    notes = " ".join(chosen.notes)
    mode, rootless = host.cgroup_mode, host.rootless
    assert chosen.engine == engine
    assert not any(f.startswith(("--privileged", "--cap-add")) for f in flags)
    assert (_pairs(flags, "--security-opt") == ["apparmor=sysbake-systemd"]) == host.apparmor
    assert ("sysbake apparmor --install" in notes) == (
        host.apparmor and not host.apparmor_profile_loaded
    )
    if engine == "docker":
        assert _pairs(flags, "--tmpfs") == ["/run", "/run/lock", "/tmp"]
        volumes = _pairs(flags, "-v")
        if mode == "v2":
            assert volumes == ["/sys/fs/cgroup:/sys/fs/cgroup:rw"]
            assert "--cgroupns=host" in flags
            assert ("host's cgroup tree read-write" in notes) == (not rootless)
        else:
            assert volumes == ["/sys/fs/cgroup:/sys/fs/cgroup:ro"]
            assert not any(f.startswith("--cgroupns") for f in flags)
            assert ("rootless docker" in notes) == rootless
        has_env = image is not None and image.container_env is not None
        assert _pairs(flags, "-e") == ([] if has_env else ["container=docker"])
        rtmin = image is not None and image.stop_signal in ("SIGRTMIN+3", "37")
        assert _pairs(flags, "--stop-signal") == ([] if rtmin else ["SIGRTMIN+3"])
        assert "--systemd=always" not in flags
    else:
        assert flags[0] == "--systemd=always"
        assert ("--runtime=runc" in flags) == (mode == "hybrid")
        assert not any(f in ("-v", "--tmpfs", "-e", "--stop-signal") for f in flags)
        assert ("default_ulimits = []" in notes) == (not host.cap_sys_resource)
        assert ("rootless podman" in notes) == (rootless and mode != "v2")


@pytest.mark.parametrize("engine", hostint.ENGINES)
@pytest.mark.parametrize("mode", ["v1", "hybrid", "v2"])
def test_flags_for_every_host(engine: hostint.Engine, mode: CgroupMode) -> None:
    checked = 0
    for rootless, apparmor, loaded, capres in itertools.product((False, True), repeat=4):
        host = HostFacts(
            cgroup_mode=mode,
            rootless=rootless,
            apparmor=apparmor,
            apparmor_profile_loaded=loaded,
            cap_sys_resource=capres,
        )
        for image in IMAGES:
            try:
                _check(engine, host, image)
            except AssertionError as exc:
                raise AssertionError(f"{engine} {host} {image}: {exc}") from exc
            checked += 1
    assert checked == 16 * len(IMAGES)


def test_unknown_engine() -> None:
    with pytest.raises(HostError, match="unknown engine 'lxc'"):
        select_flags("lxc", HostFacts(cgroup_mode="v2"))  # type: ignore[arg-type]


def test_image_facts_from_config() -> None:
    config = {
        "config": {
            "Env": ["PATH=/usr/bin", "container=docker"],
            "StopSignal": "SIGRTMIN+3",
            "Entrypoint": None,
            "Cmd": ["/sbin/init"],
        }
    }
    assert ImageFacts.from_config("web:1", config) == ImageFacts(
        "web:1", stop_signal="SIGRTMIN+3", container_env="docker", command=("/sbin/init",)
    )
    assert ImageFacts.from_config("x", {"config": {"Env": ["container="]}}) == ImageFacts("x")
    assert ImageFacts.from_config("x", {}) == ImageFacts("x")


def test_example_command_line() -> None:
    chosen = select_flags("docker", HostFacts(cgroup_mode="hybrid"))
    baked = ImageFacts("web:1", command=("/lib/systemd/systemd",))
    assert chosen.example(baked)[:5] == ("docker", "run", "-d", "--name", "sysbake-demo")
    assert chosen.example(baked)[-1] == "web:1"
    assert chosen.example(ImageFacts("bare:1"))[-2:] == ("bare:1", "/lib/systemd/systemd")


def test_profile_text() -> None:
    text = hostint.apparmor_profile()
    assert "profile sysbake-systemd flags=(attach_disconnected,mediate_deleted) {" in text
    assert text.count("{") == text.count("}")
    assert "pivot_root" not in text
    assert "deny /sys/firmware/** rwklx," in text


def test_install_refuses_without_apparmor(tmp_path: Path) -> None:
    target = tmp_path / "sysbake-systemd"
    with pytest.raises(HostError, match="AppArmor is not enabled"):
        hostint.install_profile(HostFacts(cgroup_mode="v2", apparmor=False), target)
    assert not target.exists()


def test_write_the_profile(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "profiles" / "sysbake-systemd"
    assert cli.main(["apparmor", "-o", str(target)]) == 0
    assert target.read_text() == hostint.apparmor_profile()
    assert os.listdir(target.parent) == ["sysbake-systemd"]  # no temp file left
    assert target.stat().st_mode & 0o777 == 0o644
    assert capsys.readouterr().out == ""


def test_loaded_names() -> None:
    assert hostint.loaded_names("Loaded image: web:latest\n") == ("web:latest",)
    assert hostint.loaded_names(
        "Getting image source signatures\nLoaded image: localhost/web:latest\n"
    ) == ("localhost/web:latest",)
    assert hostint.loaded_names("Loaded image(s): a:1, b:2\n") == ("a:1", "b:2")
    assert hostint.loaded_names("Loaded image ID: sha256:ab\n") == ("sha256:ab",)
    assert hostint.loaded_names("nothing\n") == ()


def test_missing_client_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(HostError, match=r"install the Debian package 'docker\.io'"):
        hostint.client_command("docker")
    with pytest.raises(HostError, match="no such archive"):
        hostint.load_archive("podman", tmp_path / "missing.tar")


def test_client_command_host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("docker", "podman"):
        (tmp_path / name).write_text("#!/bin/sh\n")
        (tmp_path / name).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert hostint.client_command("docker", "unix:///d.sock")[1:] == ["-H", "unix:///d.sock"]
    assert hostint.client_command("podman", "unix:///p.sock")[1:] == ["--url", "unix:///p.sock"]


def test_cli_flags_json_matches_detection() -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["flags", "docker", "--json"]) == 0
    expected = select_flags("docker", hostint.detect_host())
    assert json.loads(out.getvalue()) == list(expected.flags)


def test_cli_apparmor_prints_profile(tmp_path: Path) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert cli.main(["apparmor"]) == 0
    assert out.getvalue() == hostint.apparmor_profile()
    assert cli.main(["apparmor", "-o", str(tmp_path / "prof")]) == 0
    assert (tmp_path / "prof").read_text() == hostint.apparmor_profile()
