from pathlib import Path

import pytest

from sysbake.build import bootstrap
from sysbake.build.bootstrap import AptSource, BootstrapPlan, mmdebstrap_command, source_lines
from sysbake.errors import BuildError

DEB822 = """\
Types: deb
URIs: http://mirror.invalid/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

# a comment
Types: deb
URIs: http://security.invalid/debian-security
Suites: bookworm-security
Components: main

Types: deb-src
URIs: http://src.invalid/debian
Suites: bookworm
Components: main
"""


def test_host_sources_deb822_and_one_line(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# x\ndeb [arch=amd64 signed-by=/k.gpg] http://one.invalid/debian/ bookworm main contrib\n"
        "deb-src http://one.invalid/debian bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(DEB822)
    found = bootstrap.host_apt_sources(tmp_path)
    assert found[0] == AptSource("http://one.invalid/debian", "bookworm", ("main", "contrib"))
    assert [s.suite for s in found[1:]] == ["bookworm", "bookworm-updates", "bookworm-security"]
    assert all("src" not in s.uri for s in found)


def test_source_lines_follow_the_host_archive_for_another_suite() -> None:
    sources = list(bootstrap._parse_deb822(DEB822))
    lines = source_lines(
        distro="debian",
        suite="trixie",
        components=("main",),
        mirror="",
        snapshot="",
        security=True,
        sources=sources,
        this_distro="debian",
    )
    assert lines == [
        "deb http://mirror.invalid/debian trixie main",
        "deb http://mirror.invalid/debian trixie-updates main",
        "deb http://security.invalid/debian-security trixie-security main",
    ]
    only = source_lines(
        distro="debian",
        suite="sid",
        components=("main",),
        mirror="",
        snapshot="",
        security=True,
        sources=sources,
        this_distro="debian",
    )
    assert only == ["deb http://mirror.invalid/debian sid main"]


def test_explicit_mirror_and_snapshot() -> None:
    lines = source_lines(
        distro="ubuntu",
        suite="noble",
        components=("main", "universe"),
        mirror="http://snap.invalid/archive/{snapshot}/",
        snapshot="20240101T0Z",
        security=True,
        sources=[],
        this_distro="debian",
    )
    assert lines == ["deb http://snap.invalid/archive/20240101T0Z noble main universe"]


def test_other_distro_without_mirror_is_a_clear_error() -> None:
    with pytest.raises(BuildError, match=r"bootstrap.mirror: required for ubuntu"):
        source_lines(
            distro="ubuntu",
            suite="noble",
            components=("main",),
            mirror="",
            snapshot="",
            security=True,
            sources=[],
            this_distro="debian",
        )
    with pytest.raises(BuildError, match="no usable entry"):
        source_lines(
            distro="debian",
            suite="bookworm",
            components=("main",),
            mirror="",
            snapshot="",
            security=True,
            sources=[],
            this_distro="debian",
        )


def test_mmdebstrap_command_runs_in_a_private_mount_namespace(tmp_path: Path) -> None:
    plan = BootstrapPlan(
        suite="bookworm",
        variant="minbase",
        architecture="amd64",
        components=("main",),
        packages=("systemd", "dbus"),
        sources=("deb http://m.invalid/debian bookworm main",),
        keyring="",
        snapshot="",
        hooks=(),
    )
    cmd = mmdebstrap_command(plan, tmp_path / "root", tmp_path / "debs")
    assert cmd[:6] == ["unshare", "--mount", "--propagation", "private", "--pid", "--kill-child"]
    assert "--include=systemd,dbus" in cmd
    assert cmd[-3:] == ["bookworm", str(tmp_path / "root"), plan.sources[0]]
    assert any(str(tmp_path / "debs") in c and "mount -o bind" in c for c in cmd)


def test_failure_explanations_pick_the_telling_line() -> None:
    tail = (
        "I: running apt-get update...\n"
        "E: Unable to locate package nosuchpkg\n"
        "E: apt-get install failed\n"
    )
    assert bootstrap._explain_failure(tail) == "Unable to locate package nosuchpkg"
    tail = "W: x\nE: The repository 'http://m bookwurm Release' does not have a Release file.\n"
    assert "does not have a Release file" in bootstrap._explain_failure(tail)
