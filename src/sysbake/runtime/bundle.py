"""OCI runtime bundles for systemd containers: config.json as a pure function of a spec.

Nothing here touches the file system; `sysbake.runtime.containers` mounts the rootfs, writes the
files and drives the runtime.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath
from typing import Any, NamedTuple

from sysbake.errors import RuntimeFailure

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
INIT_CANDIDATES = ("/lib/systemd/systemd", "/sbin/init")
NETWORKS = ("none", "host")

# Docker's default set. CAP_SYS_ADMIN is deliberately absent: systemd 252 boots to
# `running` without it (checked under runc on a hybrid host) and only skips the mount
# namespaces of units (PrivateTmp=, ProtectSystem=... are then not enforced inside,
# systemd logs it and carries on). Adding it would let the container remount its
# cgroup and sysfs mounts and mount arbitrary file systems.
# CAP_SYS_RESOURCE is absent too (hosts in CI lack it; dbus only warns about fd limits).
CAPABILITIES = (
    "CAP_AUDIT_WRITE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_MKNOD",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYS_CHROOT",
)

_MASKED = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
)
_READONLY = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


class BindMount(NamedTuple):
    """A host path bind-mounted into the container (`-v SRC:DST[:ro]`)."""

    source: str
    destination: str
    readonly: bool = False


class ProcessSpec(NamedTuple):
    """PID 1 of the container: argv, environment, working directory and ids."""

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str = "/"
    uid: int = 0
    gid: int = 0


class BundleSpec(NamedTuple):
    """Everything config.json depends on."""

    hostname: str
    process: ProcessSpec
    network: str = "none"
    binds: tuple[BindMount, ...] = ()
    cgroups_path: str = ""
    terminal: bool = True
    annotations: tuple[tuple[str, str], ...] = ()
    volatile_journal: bool = False  # a tmpfs on /var/log/journal (the image has the dir)
    # v1/hybrid hosts: the container's own cgroup of the name=systemd hierarchy, as a host
    # path; "" on v2 hosts, where the whole cgroup2 subtree is the container's to write.
    systemd_cgroup: str = ""


def check_name(name: str) -> str:
    """`name` if usable as a container name (runtime ID, directory and host name)."""
    if not _NAME_RE.match(name):
        raise RuntimeFailure(
            f"invalid container name {name!r}: expected 1-63 characters "
            "from [A-Za-z0-9_.-], starting with a letter or digit"
        )
    return name


def hostname_for(name: str) -> str:
    """A valid host name derived from a container name."""
    return name.replace("_", "-").strip(".-") or "sysbake"


def parse_volume(spec: str) -> BindMount:
    """Parse `-v SRC:DST[:ro|rw]`; both paths must be absolute (existence is checked later)."""
    parts = spec.split(":")
    mode = "rw"
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or mode not in ("ro", "rw") or not all(parts):
        raise RuntimeFailure(f"-v {spec!r}: expected SRC:DST or SRC:DST:ro")
    src, dst = parts
    if not src.startswith("/") or not dst.startswith("/"):
        raise RuntimeFailure(f"-v {spec!r}: SRC and DST must be absolute paths")
    if ".." in PurePosixPath(dst).parts:
        raise RuntimeFailure(f"-v {spec!r}: DST must not contain '..'")
    return BindMount(src, str(PurePosixPath(dst)), mode == "ro")


def is_init(args: Sequence[str]) -> bool:
    """Whether argv starts an init system (systemd or /sbin/init)."""
    return bool(args) and PurePosixPath(args[0]).name in ("systemd", "init")


def stop_signal(image_config: Mapping[str, Any], args: Sequence[str]) -> int:
    """The image's StopSignal, else SIGRTMIN+3 for an init and SIGTERM for anything else."""
    from sysbake import signals

    value = (image_config.get("config") or {}).get("StopSignal")
    if not value:
        return signals.SYSTEMD_STOP if is_init(args) else int(signal.SIGTERM)
    try:
        return signals.parse(value)
    except ValueError:
        raise RuntimeFailure(
            f"the image's StopSignal {value!r}: expected {signals.EXPECTED}"
        ) from None


def _env_map(items: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not key or not sep:
            raise RuntimeFailure(f"environment entry {item!r}: expected KEY=VALUE")
        out[key] = value
    return out


def process_from_image(
    image_config: Mapping[str, Any],
    *,
    init: str | None,
    container_uuid: str,
    env: Sequence[str] = (),
    command: Sequence[str] = (),
) -> ProcessSpec:
    """PID 1 from the image config (Entrypoint + Cmd, or `command` instead of Cmd); with
    neither, `init`. The environment gets the systemd container interface variables."""
    cfg = image_config.get("config") or {}
    entry = list(cfg.get("Entrypoint") or [])
    args = entry + (list(command) or list(cfg.get("Cmd") or []))
    if not args:
        if init is None:
            raise RuntimeFailure(
                "the image has no Entrypoint/Cmd and no init: expected "
                + " or ".join(INIT_CANDIDATES)
            )
        args = [init]
    merged = {"PATH": DEFAULT_PATH, "TERM": "xterm"} | _env_map(cfg.get("Env") or [])
    merged.setdefault("container", "oci")
    merged["container_uuid"] = container_uuid
    merged |= _env_map(env)
    user = str(cfg.get("User") or "0")
    uid_text, _, gid_text = user.partition(":")
    bad_uid = not uid_text.isdigit() and uid_text != "root"
    if bad_uid or (gid_text and not gid_text.isdigit()):
        raise RuntimeFailure(f"image config User {user!r}: only numeric uid[:gid] is supported")
    uid = 0 if uid_text == "root" else int(uid_text)
    return ProcessSpec(
        args=tuple(str(a) for a in args),
        env=tuple(f"{k}={v}" for k, v in merged.items()),
        cwd=str(cfg.get("WorkingDir") or "/"),
        uid=uid,
        gid=int(gid_text) if gid_text else uid,
    )


def hosts_file(hostname: str) -> str:
    """/etc/hosts content: loopback names plus the container's own name."""
    return (
        f"127.0.0.1\tlocalhost\n127.0.1.1\t{hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    )


def _tmpfs(dest: str, *options: str) -> dict[str, Any]:
    return {
        "destination": dest,
        "type": "tmpfs",
        "source": "tmpfs",
        "options": ["nosuid", "nodev", *options],
    }


def _sysfs(spec: BundleSpec) -> dict[str, Any]:
    """/sys: a sysfs of the container's network namespace; rootless on the host's network
    (sysbake.userns), the host's bound read-only (sysfs mounts only in a network
    namespace of one's own user namespace)."""
    if spec.network == "host":
        from sysbake import userns

        if userns.inside():
            return {
                "destination": "/sys",
                "type": "bind",
                "source": "/sys",
                "options": ["rbind", "nosuid", "noexec", "nodev", "ro"],
            }
    return {
        "destination": "/sys",
        "type": "sysfs",
        "source": "sysfs",
        "options": ["nosuid", "noexec", "nodev", "ro"],
    }


def _mounts(spec: BundleSpec) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"],
        },
        {
            "destination": "/dev/mqueue",
            "type": "mqueue",
            "source": "mqueue",
            "options": ["nosuid", "noexec", "nodev"],
        },
        _sysfs(spec),
        # With a cgroup namespace the runtime mounts the container's own subtree here:
        # cgroup2 on v2 hosts, writable for systemd's slices and scopes. On v1/hybrid hosts
        # the v1 controllers stay read-only and only name=systemd is writable, as
        # systemd-nspawn does: systemd then tracks its units there without also creating
        # (and filling) a cgroup per unit in the memory, pids and devices hierarchies,
        # which made its boot ~30 ms slower.
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": [
                "nosuid",
                "noexec",
                "nodev",
                "relatime",
                "ro" if spec.systemd_cgroup else "rw",
            ],
        },
        *(
            [
                {
                    "destination": "/sys/fs/cgroup/systemd",
                    "type": "bind",
                    "source": spec.systemd_cgroup,
                    "options": ["bind", "rprivate", "nosuid", "noexec", "nodev"],
                }
            ]
            if spec.systemd_cgroup
            else []
        ),
        _tmpfs("/run", "mode=755"),
        _tmpfs("/run/lock", "noexec"),
        _tmpfs("/tmp"),
    ]
    if spec.volatile_journal:
        # As podman does for systemd: the journal lives and dies with the container, its
        # writes (and fsyncs at the flush) never reach the upper dir or a build's layer.
        mounts.append(_tmpfs("/var/log/journal"))
    for bind in spec.binds:
        options = ["rbind", "rprivate"] + (["ro"] if bind.readonly else [])
        mounts.append(
            {
                "destination": bind.destination,
                "type": "bind",
                "source": bind.source,
                "options": options,
            }
        )
    return mounts


def runtime_config(spec: BundleSpec) -> dict[str, Any]:
    """The OCI runtime config.json for a systemd container (never privileged)."""
    namespaces = ["pid", "ipc", "uts", "mount", "cgroup"]
    if spec.network == "none":
        # A fresh network namespace: runc and crun bring its loopback up.
        namespaces.insert(1, "network")
    elif spec.network != "host":
        raise RuntimeFailure(
            f"unknown network mode {spec.network!r}: expected " + " or ".join(NETWORKS)
        )
    caps = list(CAPABILITIES)
    proc = spec.process
    linux: dict[str, Any] = {
        # Deny every device except the runtime's defaults (null, zero, tty, ptmx...).
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [{"type": t} for t in namespaces],
        "maskedPaths": list(_MASKED),
        "readonlyPaths": list(_READONLY),
    }
    if spec.cgroups_path:
        linux["cgroupsPath"] = spec.cgroups_path
    config: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": {
            # A terminal gives systemd a /dev/console for its boot output; the runtime
            # hands the pty to sysbake's monitor, which writes it to console.log.
            "terminal": spec.terminal,
            "user": {"uid": proc.uid, "gid": proc.gid},
            "args": list(proc.args),
            "env": list(proc.env),
            "cwd": proc.cwd,
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            # Off, as under docker and podman: setuid programs (sudo, su) inside a system
            # container must work; the bounding set above still caps what they gain.
            "noNewPrivileges": False,
        },
        # No "rlimits": raising a limit needs CAP_SYS_RESOURCE, which our CI hosts lack.
        "root": {"path": "rootfs", "readonly": False},
        "hostname": spec.hostname,
        "mounts": _mounts(spec),
        "linux": linux,
    }
    if spec.annotations:
        config["annotations"] = dict(spec.annotations)
    return config
