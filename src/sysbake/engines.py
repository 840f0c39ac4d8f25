"""Host integration: docker/podman run flags for this host, the AppArmor profile for
systemd containers, and loading stored images into a local docker or podman.

Flag selection is a pure function of `HostFacts` (what the host is) and `ImageFacts`
(what the image already carries); `detect_host()` reads the facts from /proc and /sys.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from sysbake import log, proc, signals
from sysbake.cgroups import CgroupMode, cgroup_mode
from sysbake.errors import CommandError, SysbakeError
from sysbake.fsutil import atomic_write
from sysbake.records import record

Engine = Literal["docker", "podman"]
ENGINES: tuple[Engine, ...] = ("docker", "podman")

PROFILE_NAME = "sysbake-systemd"
PROFILE_PATH = Path("/etc/apparmor.d") / PROFILE_NAME
BUILDER_PROFILE_NAME = "sysbake-builder"
BUILDER_SECCOMP_PATH = Path("/etc/sysbake/builder-seccomp.json")
_CAP_SYS_RESOURCE = 24
_DEFAULT_INIT = "/lib/systemd/systemd"
_CLIENT_PACKAGE = {"docker": "docker.io", "podman": "podman"}


class HostError(SysbakeError):
    """The host cannot do what was asked (no AppArmor, no docker daemon, no cgroup fs...)."""


@record
class HostFacts:
    """What decides the run flags: the cgroup layout, privileges and security modules."""

    cgroup_mode: CgroupMode
    rootless: bool = False
    apparmor: bool = False
    apparmor_profile_loaded: bool = False
    cap_sys_resource: bool = True
    builder_profile_loaded: bool = False  # or not knowable (no securityfs: in a container)


@record
class ImageFacts:
    """What an image's config already provides to systemd (so flags need not repeat it)."""

    ref: str
    stop_signal: str | None = None
    container_env: str | None = None
    command: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, ref: str, config: dict[str, Any]) -> ImageFacts:
        """Read the OCI image config document (its "config" section) of image `ref`."""
        section = config.get("config") or {}
        container = None
        for item in section.get("Env") or []:
            key, _, value = str(item).partition("=")
            if key == "container" and value:
                container = value
        entry = [str(a) for a in section.get("Entrypoint") or []]
        cmd = [str(a) for a in section.get("Cmd") or []]
        signal = section.get("StopSignal")
        return cls(
            ref=ref,
            stop_signal=str(signal) if signal else None,
            container_env=container,
            command=(*entry, *cmd),
        )


@record
class RunFlags:
    """`<engine> run` flags for systemd as PID 1, with notes the user should read."""

    engine: Engine
    flags: tuple[str, ...]
    notes: tuple[str, ...] = ()

    def line(self) -> str:
        """The flags as one shell-quoted line (for `$(sysbake flags docker)`)."""
        return shlex.join(self.flags)

    def example(self, image: ImageFacts, name: str = "sysbake-demo") -> tuple[str, ...]:
        """A full detached `run` command line booting `image`."""
        argv: tuple[str, ...] = (self.engine, "run", "-d", "--name", name, *self.flags, image.ref)
        # An image without a command would start nothing: name the init explicitly.
        return argv if image.command else (*argv, _DEFAULT_INIT)


# -- host detection ----------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def has_capability(status: str, cap: int) -> bool:
    """Whether the CapEff mask in /proc/<pid>/status text holds capability number `cap`."""
    match = re.search(r"^CapEff:\s*([0-9a-fA-F]+)", status, re.MULTILINE)
    if match is None:
        return False
    return bool(int(match.group(1), 16) >> cap & 1)


def detect_host(root: Path = Path("/"), *, euid: int | None = None) -> HostFacts:
    """Read this host's facts from `root`/proc and `root`/sys."""
    apparmor_dir = root / "sys/kernel/security/apparmor"
    apparmor = (
        _read(root / "sys/module/apparmor/parameters/enabled").strip().startswith("Y")
        or apparmor_dir.is_dir()
    )
    listing = apparmor_dir / "profiles"
    profiles = {line.split(" (")[0] for line in _read(listing).splitlines()}
    return HostFacts(
        cgroup_mode=cgroup_mode(_read(root / "proc/self/mountinfo")),
        rootless=(os.geteuid() if euid is None else euid) != 0,
        apparmor=apparmor,
        apparmor_profile_loaded=PROFILE_NAME in profiles,
        cap_sys_resource=has_capability(_read(root / "proc/self/status"), _CAP_SYS_RESOURCE),
        # Unknowable without securityfs (the builder printing its own flags): not nagged.
        builder_profile_loaded=BUILDER_PROFILE_NAME in profiles
        or (apparmor and not listing.is_file()),
    )


# -- flag selection ------------------------------------------------------------------------


def _docker_flags(host: HostFacts, image: ImageFacts | None) -> tuple[list[str], list[str]]:
    flags = ["--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp"]
    notes: list[str] = []
    if host.cgroup_mode == "v2":
        # Docker mounts a private cgroup2 read-only unless --privileged and has no flag
        # to make it writable; the host tree, in the host cgroup namespace, is the only
        # unprivileged way for systemd to create its init.scope.
        flags += ["--cgroupns=host", "-v", "/sys/fs/cgroup:/sys/fs/cgroup:rw"]
        if not host.rootless:
            notes.append(
                "cgroup v2: docker has no writable private cgroup mount, so the "
                "container gets the host's cgroup tree read-write (root in the "
                "container can change host cgroups); podman does this safely"
            )
    else:
        # v1/hybrid: docker's own cgroup mounts already give the container a writable
        # subtree; the read-only host tree is what systemd needs to find its hierarchy.
        flags += ["-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro"]
        if host.rootless:
            notes.append(
                "rootless docker cannot delegate cgroups on cgroup v1/hybrid: "
                "systemd will fail to create init.scope; use cgroup v2 or rootful docker"
            )
    if image is None or image.container_env is None:
        flags += ["-e", "container=docker"]
    if image is None or not _stops_systemd(image.stop_signal):
        flags += ["--stop-signal", signals.name(signals.SYSTEMD_STOP)]
    return flags, notes


def _stops_systemd(stop_signal: str | None) -> bool:
    """Whether an image's StopSignal is the one systemd shuts down on (in any spelling)."""
    try:
        return stop_signal is not None and signals.parse(stop_signal) == signals.SYSTEMD_STOP
    except ValueError:
        return False


def _podman_flags(host: HostFacts) -> tuple[list[str], list[str]]:
    # --systemd=always: tmpfs on /run, /run/lock, /tmp, /var/log/journal, a writable
    # cgroup, container=podman and SIGRTMIN+3, whatever the image's command is.
    flags = ["--systemd=always"]
    notes: list[str] = []
    if host.cgroup_mode == "hybrid":
        # crun (podman's default runtime) refuses hybrid cgroups; runc boots them.
        flags.append("--runtime=runc")
    if host.rootless and host.cgroup_mode != "v2":
        notes.append(
            "rootless podman cannot delegate cgroups on cgroup v1/hybrid: systemd "
            "is unlikely to start; use cgroup v2 or run as root"
        )
    if not host.cap_sys_resource:
        notes.append(
            "no CAP_SYS_RESOURCE here: podman cannot raise the open-file and "
            "process limits it sets by default; set default_ulimits = [] in "
            "containers.conf ([containers])"
        )
    return flags, notes


def select_flags(engine: Engine, host: HostFacts, image: ImageFacts | None = None) -> RunFlags:
    """The minimal unprivileged `<engine> run` flags that boot systemd on `host`."""
    _check_known(engine)
    flags, notes = _docker_flags(host, image) if engine == "docker" else _podman_flags(host)
    _add_apparmor(host, flags, notes, builder=False)
    return RunFlags(engine=engine, flags=tuple(flags), notes=tuple(notes))


def _check_known(engine: str) -> None:
    """HostError unless `engine` is docker or podman."""
    if engine not in ENGINES:
        raise HostError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")


def _add_apparmor(host: HostFacts, flags: list[str], notes: list[str], *, builder: bool) -> None:
    """On an AppArmor host, add to `flags` the one naming the sysbake profile (`builder`:
    the builder's), and to `notes` how to load it when it is not loaded."""
    if not host.apparmor:
        return
    name = profile_name(builder=builder)
    flags += ["--security-opt", f"apparmor={name}"]
    if not (host.builder_profile_loaded if builder else host.apparmor_profile_loaded):
        install = (
            "sysbake apparmor --builder --install" if builder else "sysbake apparmor --install"
        )
        notes.append(f"AppArmor profile {name} is not loaded: run `{install}` first")


# -- AppArmor ------------------------------------------------------------------------------

_PROFILE = """\
# AppArmor profile for containers that boot systemd as PID 1 under docker or podman.
# Generated by sysbake {version}; load it with `sysbake apparmor --install`, then run
# containers with `--security-opt apparmor={name}`.
#
# Shaped like the engines' default profiles (no host-wide kernel knobs, no firmware or
# security file systems), plus the mounts systemd makes: API file systems when the engine
# did not provide them, and per-service sandboxes (PrivateTmp=, ProtectSystem=...) which
# systemd 252 builds under /run/systemd/unit-root. Mount rules matter only when the
# container has CAP_SYS_ADMIN; without it systemd skips sandboxing.

{opening}
  umount,

{peers}

  # API file systems systemd mounts itself when they are missing.
  mount fstype=tmpfs -> /{{run,run/lock,tmp,dev/shm}}/,
  mount fstype=tmpfs -> /sys/fs/cgroup/,
  mount fstype={{cgroup,cgroup2}} -> /sys/fs/cgroup/{{,**}},
  mount fstype=mqueue -> /dev/mqueue/,
  mount fstype={{tmpfs,ramfs}} -> /run/credentials/{{,**}},

  # Service sandboxes: a private copy of the tree under /run/systemd/unit-root, moved
  # onto / of the service's own mount namespace.
  mount options=(rw,rbind) / -> /run/systemd/unit-root/,
  mount options in (rw,bind,rbind) -> /run/systemd/unit-root/**,
  mount fstype={{tmpfs,proc,sysfs,mqueue}} -> /run/systemd/unit-root/**,
  mount options=(rw,move) /run/systemd/unit-root/ -> /,
  remount /run/systemd/unit-root/{{,**}},
  mount options in (rw,bind,rbind) /run/systemd/** -> /run/systemd/**,

  # Mount propagation changes (never new mounts).
  mount options=(rw,rshared) -> /,
  mount options=(rw,rslave) -> /,
  mount options=(rw,rprivate) -> /,
  mount options in (rw,slave,rslave,private,rprivate,shared,rshared) -> /run/systemd/{{,**}},

{denies}}}
"""

# Both profiles: how they open (what any process may use), the peers a confined process
# may signal and trace, what no container may write (or read) of the host's kernel.
_OPENING = """\
#include <tunables/global>

profile {name} flags=(attach_disconnected,mediate_deleted) {{
  #include <abstractions/base>

  network,
  capability,
  file,"""

_PEERS = """\
  signal (receive) peer=unconfined,
  signal (send,receive) peer={name},
  ptrace (trace,read,tracedby,readby) peer={name},"""

_DENIES = """\
  # Host-wide kernel settings; /proc/sys/net and kernel/shm* are per-namespace.
  deny @{PROC}/sys/{abi,debug,dev,fs,user,vm}/** wklx,
  deny @{PROC}/sys/kernel/{[^s]*,s[^h]*,sh[^m]*} wklx,
  deny @{PROC}/sys/kernel/*/** wklx,
  deny @{PROC}/{sysrq-trigger,kcore,kmem,mem} rwklx,

  # sysfs is read-only outside the cgroup tree; firmware and LSM state stay hidden.
  deny /sys/{block,bus,class,dev,devices,hypervisor,kernel,module,power}/** wklx,
  deny /sys/fs/{[^c]*,c[^g]*,cg[^r]*}/** wklx,
  deny /sys/firmware/** rwklx,
  deny /sys/kernel/security/** rwklx,
  deny /sys/kernel/debug/** rwklx,
"""

_BUILDER_PROFILE = """\
# AppArmor profile for the sysbake builder container (sysbake-builder image) under docker,
# podman or Kubernetes. Generated by sysbake {version}; load it with
# `sysbake apparmor --builder --install`, then run the builder with the flags of
# `sysbake flags --builder docker|podman` (they name it: --security-opt apparmor={name}).
#
# The builder is a container runtime: it mounts (mmdebstrap's chroot, overlays, binds, the
# proc, sysfs, tmpfs, devpts, mqueue and cgroup mounts of the images it boots, its own
# cgroups remounted writable) and pivots into each image; the engines' default profiles
# refuse all of that. The images it boots run under this profile too. What no container may
# touch of the host's kernel stays denied, as do file systems no build needs.

{opening}
  unix,
  dbus,

  mount,
  remount,
  umount,
  pivot_root,

{peers}

  deny mount fstype=(debugfs,tracefs,securityfs,efivarfs,configfs,fusectl,binfmt_misc,bpf,pstore),

{denies}}}
"""


def apparmor_profile(*, builder: bool = False) -> str:
    """The text of the `sysbake-systemd` AppArmor profile (with `builder`: of the
    `sysbake-builder` profile, for the builder container)."""
    from sysbake import __version__

    template, name = (
        (_BUILDER_PROFILE, BUILDER_PROFILE_NAME) if builder else (_PROFILE, PROFILE_NAME)
    )
    return template.format(
        name=name,
        version=__version__,
        opening=_OPENING.format(name=name),
        peers=_PEERS.format(name=name),
        denies=_DENIES,
    )


def profile_name(*, builder: bool = False) -> str:
    """The name of the AppArmor profile `apparmor_profile(builder=builder)` defines."""
    return BUILDER_PROFILE_NAME if builder else PROFILE_NAME


def install_profile(host: HostFacts, path: Path = PROFILE_PATH, *, builder: bool = False) -> Path:
    """Write the profile to `path` and load it with `apparmor_parser -r` (AppArmor only)."""
    if not host.apparmor:
        raise HostError(
            "AppArmor is not enabled in this kernel (/sys/module/apparmor/"
            f"parameters/enabled is not Y): cannot load profile {profile_name(builder=builder)}"
        )
    parser = proc.require("apparmor_parser", "apparmor")
    atomic_write(path, apparmor_profile(builder=builder).encode())
    proc.run([parser, "-r", path], what=f"apparmor_parser -r {path}")
    return path


# -- the builder container ------------------------------------------------------------------

# The sysbake-builder image runs sysbake itself: mmdebstrap, overlay mounts and runc booting
# each image. What it needs beyond an ordinary container, each found by taking it away
# (README, "Building in a container", says what fails without it):
# - the capabilities runc gives every image it boots (runtime.bundle.CAPABILITIES): a
#   booted image's set cannot exceed the builder's ("unable to apply caps");
BUILDER_EXTRA_CAPABILITIES = (
    # mmdebstrap's mounts and chroot set-up, the overlays of build steps, the namespaces,
    # mounts and pivot_root of runc, remounting the builder's own cgroups writable
    "CAP_SYS_ADMIN",
    # runc brings up the loopback interface of each booted image's network namespace
    # (`sysbake test` and `run` boot with --network none)
    "CAP_NET_ADMIN",
)
# - a private cgroup namespace, so the cgroup mounts show only the builder's own subtree,
#   which its entrypoint then makes writable for runc (builder/entrypoint);
# - under docker, a seccomp profile that allows pivot_root: docker's default refuses it even
#   with CAP_SYS_ADMIN (podman's allows it). The builder's profile refuses what no build
#   needs: loading kernels and modules, setting the clock, swap, accounting, quotas, BPF,
#   perf, kernel keys (runc is told --no-new-keyring in a container), file handles,
#   obsolete calls, and user namespaces; clone3 is reported missing, so that the C library
#   falls back to clone, whose flags the profile can check (as docker's default does);
_SECCOMP_REFUSED = (
    "_sysctl",
    "acct",
    "add_key",
    "bpf",
    "clock_adjtime",
    "clock_settime",
    "create_module",
    "delete_module",
    "finit_module",
    "get_kernel_syms",
    "init_module",
    "ioperm",
    "iopl",
    "kexec_file_load",
    "kexec_load",
    "keyctl",
    "lookup_dcookie",
    "name_to_handle_at",
    "nfsservctl",
    "open_by_handle_at",
    "perf_event_open",
    "query_module",
    "quotactl",
    "reboot",
    "request_key",
    "settimeofday",
    "stime",
    "swapoff",
    "swapon",
    "sysfs",
    "syslog",
    "uselib",
    "userfaultfd",
    "ustat",
    "vm86",
    "vm86old",
)
_CLONE_NEWUSER = 0x10000000
_EPERM, _ENOSYS = 1, 38
# - on AppArmor hosts, the sysbake-builder profile (the engines' default profiles refuse
#   every mount).


def builder_capabilities() -> tuple[str, ...]:
    """The capabilities of the builder container, sorted, without the CAP_ prefix (as
    docker, podman and Kubernetes all accept them)."""
    from sysbake.runtime.bundle import CAPABILITIES

    caps = {*CAPABILITIES, *BUILDER_EXTRA_CAPABILITIES}
    return tuple(sorted(c.removeprefix("CAP_") for c in caps))


def builder_seccomp_profile() -> dict[str, Any]:
    """The builder's seccomp profile (docker's JSON format, which podman and Kubernetes'
    Localhost profiles read too): everything allowed but `_SECCOMP_REFUSED` and user
    namespaces."""
    newuser = {
        "index": 0,
        "value": _CLONE_NEWUSER,
        "valueTwo": _CLONE_NEWUSER,
        "op": "SCMP_CMP_MASKED_EQ",
    }
    return {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [
            {"names": list(_SECCOMP_REFUSED), "action": "SCMP_ACT_ERRNO", "errnoRet": _EPERM},
            {
                "names": ["clone", "unshare"],
                "action": "SCMP_ACT_ERRNO",
                "errnoRet": _EPERM,
                "args": [newuser],
            },
            {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": _ENOSYS},
        ],
    }


def builder_seccomp_json() -> str:
    """`builder_seccomp_profile()` as the text of a profile file."""
    import json

    return json.dumps(builder_seccomp_profile(), indent=1) + "\n"


def select_builder_flags(
    engine: Engine, host: HostFacts, seccomp_profile: Path = BUILDER_SECCOMP_PATH
) -> RunFlags:
    """The least-privilege `<engine> run` flags of the sysbake-builder container on `host`;
    under docker they name the seccomp profile file `seccomp_profile`."""
    _check_known(engine)
    flags = ["--cgroupns=private", "--cap-drop=ALL"]
    flags += [f"--cap-add={cap}" for cap in builder_capabilities()]
    notes: list[str] = []
    if engine == "docker":
        flags += ["--security-opt", f"seccomp={seccomp_profile}"]
    elif host.cgroup_mode == "hybrid":
        flags.append("--runtime=runc")  # crun refuses hybrid cgroups
    if engine == "podman" and not host.cap_sys_resource:
        notes.append(
            "no CAP_SYS_RESOURCE here: podman cannot raise the open-file and process "
            "limits it sets by default; set default_ulimits = [] in containers.conf"
        )
    _add_apparmor(host, flags, notes, builder=True)
    if host.rootless:
        notes.append(
            "the builder needs a rootful engine: mmdebstrap makes device nodes and files "
            "of every owner, and runc boots images as root"
        )
    return RunFlags(engine=engine, flags=tuple(flags), notes=tuple(notes))


# -- load into docker / podman ---------------------------------------------------------------


def find_client(engine: str, missing: Callable[[str], SysbakeError]) -> str:
    """The path of the client of `engine` (docker or podman); when it is not on PATH,
    `missing(remedy)` is raised, `remedy` naming the Debian package to install."""
    client = proc.which(engine)
    if client is None:
        raise missing(f"install the Debian package '{_CLIENT_PACKAGE[engine]}'")
    return client


def client_command(engine: Engine, host: str | None = None) -> list[str]:
    """The client argv prefix for `engine`, talking to `host` when given."""
    _check_known(engine)
    client = find_client(
        engine,
        lambda remedy: HostError(f"{engine} is not installed (no '{engine}' on PATH): {remedy}"),
    )
    if host is None:
        return [client]
    return [client, "-H", host] if engine == "docker" else [client, "--url", host]


def check_engine(engine: Engine, client: Sequence[str]) -> None:
    """Fail with one clear line when `engine`'s daemon (or podman service) does not answer."""
    try:
        proc.run(
            [*client, "version", "--format", "{{.Server.Version}}"]
            if engine == "docker"
            else [*client, "info", "--format", "{{.Host.Arch}}"],
            what=f"{engine} version",
            timeout=60,
        )
    except CommandError as exc:
        where = next((a for a in client[1:] if "://" in a), "its default socket")
        raise HostError(
            f"{engine} does not answer at {where}: {proc.tail(exc.tail, empty=str(exc))}"
        ) from exc


def loaded_names(output: str) -> tuple[str, ...]:
    """Image names from `docker load` / `podman load` output ("Loaded image: NAME")."""
    names: list[str] = []
    for line in output.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().startswith("Loaded image"):
            names.extend(v.strip() for v in value.split(",") if v.strip())
    return tuple(names)


def _load(engine: Engine, client: Sequence[str], archive: Path) -> tuple[str, ...]:
    with log.step(f"loading {archive.name} into {engine}"):
        result = proc.run([*client, "load", "-i", archive], what=f"{engine} load", timeout=3600)
    out = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
    return loaded_names(out)


def load_archive(engine: Engine, archive: Path, host: str | None = None) -> tuple[str, ...]:
    """Load a docker-archive file into docker or podman; returns the loaded image names."""
    if not archive.is_file():
        raise HostError(f"{archive}: no such archive to load")
    client = client_command(engine, host)
    check_engine(engine, client)
    return _load(engine, client, archive)


@contextlib.contextmanager
def _exported(store: Any, ref: str) -> Iterator[Path]:
    # A file rather than a pipe: proc.run feeds stdin from memory only, and the engine
    # then reads the archive at its own pace.
    from sysbake.oci.export import export_docker_archive

    store.resolve(ref)  # an unknown image fails before anything is written
    with store.staging("load") as tmp:
        archive = Path(tmp) / "image.tar"
        with open(archive, "wb") as out:
            export_docker_archive(store, ref, out)
        yield archive


def load_image(store: Any, ref: str, engine: Engine, host: str | None = None) -> tuple[str, ...]:
    """Export stored image `ref` as a docker-archive and load it into `engine`."""
    client = client_command(engine, host)
    check_engine(engine, client)  # before the export, which can take a while
    with _exported(store, ref) as archive:
        return _load(engine, client, archive)
