"""The one cgroup probe (sysbake.cgroups), from mountinfo text: the host's cgroup mode, which
the runtime and the docker/podman flags both read, and v1's name=systemd hierarchy."""

from __future__ import annotations

from pathlib import Path

import pytest

from sysbake import cgroups, engines
from sysbake.errors import RuntimeFailure

V2 = """\
25 30 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
35 25 0:30 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw
"""
HYBRID = """\
25 30 0:22 / /sys rw - sysfs sysfs rw
30 25 0:26 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
35 30 0:31 / /sys/fs/cgroup/memory rw,nosuid shared:15 - cgroup cgroup rw,memory
36 30 0:32 / /sys/fs/cgroup/systemd rw,nosuid shared:16 - cgroup cgroup rw,xattr,name=systemd
37 30 0:27 / /sys/fs/cgroup/unified rw,nosuid shared:10 - cgroup2 cgroup2 rw,nsdelegate
"""
V1 = "".join(line + "\n" for line in HYBRID.splitlines() if "unified" not in line)
MODES = {"v1": V1, "hybrid": HYBRID, "v2": V2}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_cgroup_mode_from_mountinfo(mode: cgroups.CgroupMode, tmp_path: Path) -> None:
    assert cgroups.cgroup_mode(MODES[mode]) == mode
    # The docker/podman flags read the same probe.
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(MODES[mode])
    assert engines.detect_host(tmp_path, euid=0).cgroup_mode == mode


def test_the_last_mount_wins_and_paths_are_unescaped() -> None:
    stacked = V1 + "40 35 0:40 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    assert cgroups.cgroup_mode(stacked) == "v2"
    assert cgroups.mounts(
        "1 2 0:1 /x\\134y /a\\040b rw shared:1 - tmpfs none rw,size=1k\n"
        "garbage\n2 3 0:2 / /c rw -\n"
    ) == [cgroups.Mount("/x\\y", "/a b", "tmpfs", "rw,size=1k")]


@pytest.mark.parametrize(
    "text",
    [
        "25 30 0:22 / /sys rw - sysfs sysfs rw\n",
        "",
        "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n",
    ],
)
def test_no_cgroup_fs_is_a_clear_error(text: str) -> None:
    with pytest.raises(RuntimeFailure, match="no cgroup file system is mounted at /sys/fs/cgroup"):
        cgroups.cgroup_mode(text)


def test_this_host_has_a_mode() -> None:
    assert cgroups.host_cgroup_mode() in ("v1", "hybrid", "v2")


def test_the_name_systemd_cgroup_of_a_relative_path() -> None:
    own = "9:name=systemd:/user.slice/session-1.scope\n8:pids:/user.slice\n0::/\n"
    assert (
        cgroups.systemd_cgroup(HYBRID, own, "sysbake/web.1234")
        == "/sys/fs/cgroup/systemd/user.slice/session-1.scope/sysbake/web.1234"
    )
    assert (
        cgroups.systemd_cgroup(HYBRID, "9:name=systemd:/\n", "sysbake/w.1")
        == "/sys/fs/cgroup/systemd/sysbake/w.1"
    )
    # In a container that sees only its own subtree (the mount's root): relative to it.
    subtree = HYBRID.replace(
        "0:32 / /sys/fs/cgroup/systemd", "0:32 /docker/ab /sys/fs/cgroup/systemd"
    )
    assert (
        cgroups.systemd_cgroup(subtree, "9:name=systemd:/docker/ab\n", "sysbake/w.1")
        == "/sys/fs/cgroup/systemd/sysbake/w.1"
    )
    assert cgroups.systemd_cgroup(subtree, "9:name=systemd:/other\n", "sysbake/w.1") == ""
    assert cgroups.systemd_cgroup(subtree, "9:name=systemd:/docker/abc\n", "s/w.1") == ""
    no_systemd = "".join(line + "\n" for line in HYBRID.splitlines() if "name=systemd" not in line)
    assert cgroups.systemd_cgroup(no_systemd, own, "sysbake/w.1") == ""
    assert cgroups.systemd_cgroup(V2, "0::/user.slice\n", "sysbake/w.1") == ""
