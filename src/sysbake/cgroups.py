"""The host's mounts and cgroup layout, read from /proc/self/mountinfo: its one parser
(`mounts`, which the overlay code asks too) and the one probe of the cgroup version (what
the runtime and the docker/podman flags depend on) and of the name=systemd hierarchy that
v1 and hybrid hosts give systemd.

  v2      cgroup2 mounted at /sys/fs/cgroup
  hybrid  v1 controllers under /sys/fs/cgroup, plus cgroup2 at /sys/fs/cgroup/unified
  v1      v1 controllers only
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Literal, NamedTuple

from sysbake.errors import RuntimeFailure

CgroupMode = Literal["v1", "hybrid", "v2"]
MOUNTINFO = Path("/proc/self/mountinfo")


class Mount(NamedTuple):
    """One line of mountinfo: the mounted subtree (`root`), where, the type and the
    file system's own options ("rw,name=systemd")."""

    root: str
    point: str
    fstype: str
    options: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as octal escapes.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str) -> list[Mount]:
    """The mounts listed in the text of /proc/<pid>/mountinfo, in its order (malformed
    lines skipped)."""
    found = []
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if not sep or len(fields) < 5 or not tail:
            continue
        found.append(
            Mount(
                _unescape(fields[3]),
                _unescape(fields[4]),
                tail[0],
                tail[2] if len(tail) > 2 else "",
            )
        )
    return found


def cgroup_mode(mountinfo: str) -> CgroupMode:
    """v2, hybrid or v1 (see the module docstring) from the text of mountinfo; the last
    mount at a path wins. RuntimeFailure when no cgroup file system is mounted."""
    types = {m.point: m.fstype for m in mounts(mountinfo)}
    if types.get("/sys/fs/cgroup") == "cgroup2":
        return "v2"
    if types.get("/sys/fs/cgroup/unified") == "cgroup2":
        return "hybrid"
    if any(t == "cgroup" and p.startswith("/sys/fs/cgroup/") for p, t in types.items()):
        return "v1"
    raise RuntimeFailure(
        "no cgroup file system is mounted at /sys/fs/cgroup (read from "
        "/proc/self/mountinfo): systemd containers need one"
    )


@functools.cache
def host_cgroup_mode() -> CgroupMode:
    """This host's cgroup mode (read once per process)."""
    return cgroup_mode(MOUNTINFO.read_text(errors="replace"))


def systemd_cgroup(mountinfo: str, own_cgroups: str, cgroups_path: str) -> str:
    """The host path of the name=systemd cgroup `cgroups_path` on a v1/hybrid host, taken
    relative to this process's own cgroup there, as runc places a relative path. `mountinfo`
    is the text of /proc/self/mountinfo (the hierarchy's mount may show only a subtree: its
    root), `own_cgroups` that of /proc/self/cgroup. "" when the hierarchy is not mounted or
    this process's cgroup is not visible in it."""
    mount = next(
        (
            m
            for m in mounts(mountinfo)
            if m.fstype == "cgroup" and "name=systemd" in m.options.split(",")
        ),
        None,
    )
    own = next(
        (
            line.split(":", 2)[2]
            for line in own_cgroups.splitlines()
            if line.split(":", 2)[1:2] == ["name=systemd"]
        ),
        None,
    )
    if mount is None or own is None:
        return ""
    root = mount.root.rstrip("/")
    if own != root and not own.startswith(root + "/"):
        return ""
    parts = (part.strip("/") for part in (mount.point, own[len(root) :], cgroups_path))
    return "/" + "/".join(part for part in parts if part)
