"""Make a tree container-correct for systemd, clean it before a commit, and write the
image config (systemd's container interface: https://systemd.io/CONTAINER_INTERFACE/)."""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from sysbake import __version__, signals
from sysbake.project.specs import FinalizeSpec, OciConfigSpec

if TYPE_CHECKING:
    from sysbake.rootfs import Root

# Units that cannot work in a container (no devices, no kernel modules, no hardware
# clock, no real ttys, a read-only /sys) or that only make sense on a booted host.
DEFAULT_MASK = (
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-hwdb-update.service",
    "getty@.service",
    "serial-getty@.service",
    "getty-static.service",
    "console-getty.service",
    "hwclock.service",
    "systemd-timesyncd.service",
    "systemd-modules-load.service",
    "kmod-static-nodes.service",
    "systemd-remount-fs.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-logind.service",
    "systemd-firstboot.service",
    "systemd-pstore.service",
    "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "fstrim.timer",
    "cryptsetup.target",
    # Generators (masked in /etc/systemd/system-generators) that set up encrypted,
    # integrity-checked or verity block devices, resume from hibernation or look for the
    # boot disk's partitions: nothing of that exists in a container, and each costs ~10 ms
    # of CPU at every boot.
    "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-hibernate-resume-generator",
    "systemd-gpt-auto-generator",
)

SSH_KEYGEN_UNIT = "sysbake-ssh-host-keys.service"
_SSH_KEYGEN = """\
# Written by sysbake: images ship without ssh host keys; make them on first boot.
[Unit]
Description=Generate SSH host keys (sysbake)
ConditionFileIsExecutable=/usr/bin/ssh-keygen
ConditionPathExistsGlob=!/etc/ssh/ssh_host_*_key
Before=ssh.service sshd.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
"""
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# What to remove before a layer is committed (the seed's "snapshot" clean-up): the
# project file's [finalize] section.
Cleanup = FinalizeSpec


def masked_units(cleanup: Cleanup) -> list[str]:
    """The default mask list with the image's additions, minus what it unmasks."""
    return sorted((set(DEFAULT_MASK) | set(cleanup.mask)) - set(cleanup.unmask))


def _mask_link(name: str) -> str:
    kind = "system-generators" if name.endswith("-generator") else "system"
    return f"etc/systemd/{kind}/{name}"


def container_ready_inputs(cleanup: Cleanup) -> dict[str, object]:
    """What `make_container_ready` makes of a tree, for the stage key of the tree."""
    return {"mask": masked_units(cleanup), "files": [_SSH_KEYGEN, _HOSTS]}


def make_container_ready(root: Root, cleanup: Cleanup) -> None:
    """Mask units and generators that cannot work in a container, install the ssh
    first-boot key unit, and give the tree an empty machine-id and neutral host files.
    Idempotent."""
    units = "etc/systemd/system"
    root.mkdir(units)
    for name in masked_units(cleanup):
        link = _mask_link(name)
        root.mkdir(os.path.dirname(link))
        root.symlink("/dev/null", link)
    for name in cleanup.unmask:
        if root.readlink(_mask_link(name)) == "/dev/null":
            root.unlink(_mask_link(name))
    _write_if_changed(root, f"{units}/{SSH_KEYGEN_UNIT}", _SSH_KEYGEN.encode())
    root.mkdir(f"{units}/multi-user.target.wants")
    link = f"{units}/multi-user.target.wants/{SSH_KEYGEN_UNIT}"
    if not root.is_symlink(link):
        root.symlink(f"/etc/systemd/system/{SSH_KEYGEN_UNIT}", link)
    # The runtime provides /dev, the hostname and DNS; nothing of the build host stays.
    root.clear_dir("dev")
    for name in ("etc/resolv.conf", "etc/hostname"):
        if not root.is_symlink(name) and root.is_file(name):
            _write_if_changed(root, name, b"")
    if not root.exists("etc/hosts"):
        root.write_bytes("etc/hosts", _HOSTS.encode())


def clean_tree(root: Root, cleanup: Cleanup, *, epoch: int | None = None) -> None:
    """Remove caches, logs, keys and identities from a tree before it is committed; with
    `epoch` (the build's), also bring the dates a build writes into files down to it
    (`normalise`). What varies from one build to the next: README, "Reproducible builds"."""
    if cleanup.apt_lists:
        root.clear_dir("var/lib/apt/lists", keep=("lock", "partial"))
        root.clear_dir("var/lib/apt/lists/partial")
    if cleanup.logs:
        _clean_logs(root)
    if cleanup.machine_id:
        if root.is_symlink("etc/machine-id"):
            root.unlink("etc/machine-id")
        _write_if_changed(root, "etc/machine-id", b"")  # systemd makes one per container
        root.unlink("var/lib/dbus/machine-id")
    if cleanup.tmp:
        root.clear_dir("tmp")
        root.clear_dir("var/tmp")
    for pattern in removed_patterns(cleanup):
        for hit in root.glob(pattern):
            root.remove(hit)
    if epoch is not None:
        normalise(root, epoch)


def removed_patterns(cleanup: Cleanup) -> list[str]:
    """The shell patterns of what clean_tree removes outright, given the switches of
    `cleanup` (the lists, logs, machine IDs and tmp dirs it empties aside)."""
    patterns: list[str] = []
    if cleanup.apt_cache:
        patterns += [
            "var/cache/apt/*.bin",
            "var/cache/apt/archives/*.deb",
            "var/cache/apt/archives/partial/*",
            "var/cache/debconf/*-old",
        ]
    if cleanup.ssh_host_keys:
        patterns.append("etc/ssh/ssh_host_*")
    if cleanup.salt:
        patterns += [
            "etc/salt/pki",
            "etc/salt/minion_id",
            "var/cache/salt",
            "var/log/salt",
            "var/run/salt",
        ]
    return [*patterns, *cleanup.remove, *BUILD_TRACES]


# Traces of a build that differ from one build to the next and that nothing needs: the
# boot's seeds and timer stamps, shell history, ldconfig's cache of inode numbers and
# ctimes (mmdebstrap drops it too).
BUILD_TRACES = (
    "root/.bash_history",
    "var/lib/systemd/random-seed",
    "var/lib/systemd/timers/stamp-*",
    "var/cache/ldconfig/aux-cache",
)


def normalise(root: Root, epoch: int) -> None:
    """Bring the dates that tools write into files down to `epoch` where they are later
    (as mtimes are clamped): the day of each password change in /etc/shadow (and its
    backup), and the /usr timestamp that systemd-update-done writes to /etc/.updated and
    /var/.updated."""
    day = epoch // 86400
    for name in ("etc/shadow", "etc/shadow-"):
        _rewrite(root, name, lambda text: _clamp_shadow(text, day))
    for name in ("etc/.updated", "var/.updated"):
        _rewrite(root, name, lambda text: _clamp_updated(text, epoch * 1_000_000_000))


def drop_bytecode(root: Root, top: str) -> None:
    """Remove every __pycache__ directory under `top` in `root`: bytecode compiled where
    the files came from records their mtimes there (which the layer's clamp changes) and
    is not the same from one machine to the next; Python compiles it again when needed."""
    caches = [
        f"{here}/{name}"
        for here, dirs, _files, _fd in root.walk(top)
        for name in dirs
        if name == "__pycache__"
    ]
    for path in caches:
        root.remove(path)


def _rewrite(root: Root, path: str, change: Callable[[bytes], bytes]) -> None:
    """Apply `change` to the regular file `path` (not a symlink) if it exists."""
    st = root.lstat(path)
    if st is None or not stat.S_ISREG(st.st_mode):
        return
    _write_if_changed(root, path, change(root.read_bytes(path)))


def _clamp_shadow(text: bytes, day: int) -> bytes:
    """/etc/shadow with each entry's last-change day (the third field) at most `day`."""
    lines = text.split(b"\n")
    for i, line in enumerate(lines):
        fields = line.split(b":")
        if len(fields) > 2 and fields[2].isdigit() and int(fields[2]) > day:
            fields[2] = str(day).encode()
            lines[i] = b":".join(fields)
    return b"\n".join(lines)


def _clamp_updated(text: bytes, limit_ns: int) -> bytes:
    """A systemd-update-done stamp file with its TIMESTAMP_NSEC at most `limit_ns`."""

    def clamp(match: re.Match[bytes]) -> bytes:
        return b"TIMESTAMP_NSEC=" + str(min(int(match.group(1)), limit_ns)).encode()

    return re.sub(rb"^TIMESTAMP_NSEC=(\d+)", clamp, text, flags=re.M)


def _clean_logs(root: Root) -> None:
    """Empty /var/log: log files go, login accounting files (which must exist) are
    emptied, the journal directories of the machine IDs the build booted with go."""
    for here, _dirs, names, _fd in root.walk("var/log"):
        for name in names:
            path = f"{here}/{name}"
            st = root.lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode):
                continue  # symlinks, devices, FIFOs: not logs of ours
            if name in ("wtmp", "btmp", "lastlog", "faillog"):
                _write_if_changed(root, path, b"")
            else:
                root.unlink(path)
    for sub in root.glob("var/log/journal/*"):
        if root.is_dir(sub) and not root.is_symlink(sub) and not root.listdir(sub):
            root.remove(sub)


def _write_if_changed(root: Root, path: str, data: bytes) -> None:
    # On an overlay, writing an unchanged file still copies it up: only write when needed.
    st = root.stat(path)
    if (
        st is None
        or not stat.S_ISREG(st.st_mode)
        or st.st_size != len(data)
        or root.read_bytes(path) != data
    ):
        root.write_bytes(path, data)


_OWN_LABELS = "io.sysbake."


def _labels(settings: OciConfigSpec, labels: Mapping[str, str]) -> dict[str, str]:
    """An image's labels, sorted: those of `labels` (its parent's, and sysbake's own
    io.sysbake.*), the project's [config] labels over the parent's, sysbake's over both."""
    own = {k: v for k, v in labels.items() if k.startswith(_OWN_LABELS)}
    merged = {**labels, **dict(settings.labels), **own, "io.sysbake.version": __version__}
    return dict(sorted(merged.items()))


def image_config(
    settings: OciConfigSpec,
    *,
    architecture: str,
    diff_ids: Iterable[str],
    history: Iterable[Mapping[str, object]],
    created: str,
    labels: Mapping[str, str],
) -> dict[str, object]:
    """The OCI image config document for a finished image whose project file asked for
    `settings` (its [config] section)."""
    env = dict(settings.env)
    env.setdefault("PATH", DEFAULT_PATH)
    env["container"] = settings.container
    config: dict[str, object] = {
        "Env": [f"{k}={v}" for k, v in sorted(env.items())],
        "Cmd": list(settings.cmd),
        "StopSignal": signals.canonical(settings.stop_signal),
        "WorkingDir": settings.workdir,
        "Labels": _labels(settings, labels),
    }
    if settings.entrypoint:
        config["Entrypoint"] = list(settings.entrypoint)
    if settings.user:
        config["User"] = settings.user
    if settings.ports:
        config["ExposedPorts"] = {port: {} for port in settings.ports}  # "N/tcp" already
    if settings.volumes:
        config["Volumes"] = {v: {} for v in settings.volumes}
    return {
        "created": created,
        "architecture": architecture,
        "os": "linux",
        "config": config,
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
        "history": list(history),
    }
