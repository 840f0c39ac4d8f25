"""Containers without a daemon: an overlay rootfs over the image's layer trees, an OCI
bundle (sysbake.runtime.bundle), runc or crun started detached under sysbake's monitor.

A container lives in `<store>/containers/<name>/`, whose files sysbake.runtime.container_dir
names; its state survives the sysbake process that started it, so any later `ps`, `stop`
or `rm` manages it. Every failure while creating a container leaves no mount, runtime
state or process behind. A container made for the life of one process (a build step's,
`sysbake test`'s) has an owner lock (sysbake.runtime.owners): once that process is gone,
`reap_orphans` removes it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from sysbake import log, proc, signals
from sysbake.errors import RuntimeFailure, SysbakeError
from sysbake.fsutil import atomic_write, remove_tree
from sysbake.oci import model as oci
from sysbake.rootfs import Root
from sysbake.runtime import bundle, overlay, owners
from sysbake.runtime import container_dir as cd
from sysbake.runtime.bundle import BindMount, BundleSpec

if TYPE_CHECKING:
    import socket

    from sysbake import cgroups
    from sysbake.runtime import monitor
    from sysbake.runtime.ports import Publish

STATE_ROOT = Path("/run/sysbake")
RUNTIMES = {"runc": "runc", "crun": "crun"}  # name -> Debian package
_RUNNING = ("running", "created", "paused", "starting")


class ContainerNotFound(RuntimeFailure):
    """No container by that name in the store."""


class NoSystemd(RuntimeFailure):
    """The image has no init to boot (checked before anything is started)."""


class RunOptions(NamedTuple):
    """How to run an image: name, mounts, network, runtime and overrides of its config."""

    name: str | None = None
    binds: tuple[BindMount, ...] = ()
    network: str = "none"
    runtime: str = "runc"
    env: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    # PID 1 starts as this program, which must exec its arguments: the image's command.
    wrapper: tuple[str, ...] = ()
    ports: tuple[Publish, ...] = ()  # published on the host (sysbake.runtime.ports)
    auto_remove: bool = False  # removed once PID 1 ends (`run -d --rm`)
    stop_signal: int | None = None  # instead of the image's


class Container(NamedTuple):
    """A container as recorded in its directory's state.json (see container_dir)."""

    name: str
    dir: Path
    runtime: str
    runtime_id: str
    image: str
    image_id: str
    created: float
    args: tuple[str, ...]
    stop_signal: int
    network: str
    pid: int | None = None
    id: str = ""  # 64 hex digits, as docker's container IDs
    lowerdirs: tuple[str, ...] = ()  # the image's layer trees, bottom to top (for `start`)
    ports: tuple[str, ...] = ()  # published ports, as sysbake.runtime.ports.Publish prints
    auto_remove: bool = False
    started: float = 0.0  # when PID 1 last started (seconds since the epoch)

    @property
    def rootfs(self) -> Path:
        return self.dir / cd.ROOTFS

    @property
    def console(self) -> Path:
        return self.dir / cd.CONSOLE

    @property
    def state_root(self) -> Path:
        return state_root() / self.runtime


class Status(NamedTuple):
    """What a container is doing now: running, exited, starting, dead (state lost), ..."""

    state: str
    pid: int | None = None
    exit_code: int | None = None

    @property
    def running(self) -> bool:
        return self.state in _RUNNING


class StopResult(NamedTuple):
    """How a container ended: PID 1's exit code (None if unknown) and whether it was killed."""

    exit_code: int | None
    killed: bool


# -- host checks -------------------------------------------------------------------------


def state_root() -> Path:
    """Where the runtime and the console sockets keep state: STATE_ROOT, or a rootless
    user's own directory (sysbake.userns.runtime_dir)."""
    from sysbake import userns

    return userns.runtime_dir(STATE_ROOT)


def runtime_path(name: str) -> str:
    """The runtime executable, after checking the host can run systemd containers with it."""
    if name not in RUNTIMES:
        raise RuntimeFailure(f"unknown runtime {name!r}: expected " + " or ".join(RUNTIMES))
    path = proc.require(name, RUNTIMES[name])
    if name == "crun" and _cgroup_mode() == "hybrid":
        raise RuntimeFailure(
            "crun does not support hybrid cgroups (v1 controllers plus "
            "cgroup2 at /sys/fs/cgroup/unified), which this host uses: "
            "use --runtime runc"
        )
    return path


def _cgroup_mode() -> cgroups.CgroupMode:
    from sysbake import cgroups

    return cgroups.host_cgroup_mode()


def find_init(root: Root) -> str | None:
    """The first of /lib/systemd/systemd and /sbin/init that is a file in the image."""
    for candidate in bundle.INIT_CANDIDATES:
        if root.is_file(candidate):
            return candidate
    return None


# -- state files -------------------------------------------------------------------------


def load(containers_dir: Path, name: str) -> Container:
    """The container named `name`, or whose ID starts with `name` (3 hex digits or more,
    one container only); ContainerNotFound if there is none."""
    path = containers_dir / name / cd.STATE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        if _ID_PREFIX.fullmatch(name) and "/" not in name:
            return _by_id(containers_dir, name)
        raise ContainerNotFound(f"no container {name!r} in {containers_dir}") from None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"{path}: unreadable container state ({exc})") from None
    known = {k: v for k, v in data.items() if k in Container._fields}
    known["dir"] = Path(data["dir"])
    for key in ("args", "lowerdirs", "ports"):
        known[key] = tuple(data.get(key) or ())
    container = Container(**known)
    if not container.id:  # recorded before containers had IDs: one derived from its own
        container = container._replace(
            id=oci.hex_of(oci.sha256_digest(container.runtime_id.encode()))
        )
    return container


_ID_PREFIX = re.compile(r"[0-9a-f]{3,64}")


def _by_id(containers_dir: Path, prefix: str) -> Container:
    hits = [c for c in all_containers(containers_dir) if c.id.startswith(prefix)]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise ContainerNotFound(f"container ID prefix {prefix!r} is ambiguous")
    raise ContainerNotFound(f"no container {prefix!r} in {containers_dir}")


def _save(container: Container) -> None:
    data: dict[str, Any] = container._asdict()
    data["dir"] = str(container.dir)
    atomic_write(container.dir / cd.STATE, json.dumps(data, indent=1).encode(), durable=False)


def all_containers(containers_dir: Path) -> list[Container]:
    """Every container with a readable state file, oldest first."""
    if not containers_dir.is_dir():
        return []
    found = []
    for entry in sorted(containers_dir.iterdir()):
        try:
            found.append(load(containers_dir, entry.name))
        except RuntimeFailure:
            continue
    return sorted(found, key=lambda c: c.created)


def exit_code(container: Container) -> int | None:
    """PID 1's recorded exit code (128+N when killed by signal N); None if not recorded."""
    record = cd.read_exit(container.dir)
    return record.code if record else None


def _runtime_state(container: Container) -> dict[str, Any] | None:
    result = proc.run(
        [container.runtime, "--root", container.state_root, "state", container.runtime_id],
        check=False,
        what="runtime state",
    )
    if result.returncode != 0:
        return None
    try:
        value = json.loads(result.stdout)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _until_monitor_ends(container: Container, seconds: float) -> bool:
    """Wait until the monitor ends (after exit.json: the runtime's delete), `seconds` at
    most, woken by a pidfd rather than by polling (a stop waits for exactly this). False,
    at once, when there is no monitor to wait for."""
    pid = cd.monitor_pid(container.dir)
    try:
        pidfd = os.pidfd_open(pid) if pid is not None else None
    except OSError:
        pidfd = None
    if pidfd is None:
        return False
    try:
        # Still the monitor once the pidfd is open: its lock is only released at its end.
        if cd.monitor_alive(container.dir):
            waiter = select.poll()
            waiter.register(pidfd, select.POLLIN)
            waiter.poll(max(seconds, 0.0) * 1000)
    finally:
        os.close(pidfd)
    return True


def _runtime_known(container: Container) -> bool:
    # runc and crun keep <root>/<id>/ while the container exists: no process to ask.
    return (container.state_root / container.runtime_id).exists()


def status(container: Container) -> Status:
    """The container's current status, from its exit record or the runtime."""
    record = cd.read_exit(container.dir)
    if record is not None:
        return Status("exited", exit_code=record.code)
    state = _runtime_state(container)
    if state is None:
        return Status("starting" if cd.monitor_alive(container.dir) else "dead")
    pid = int(state.get("pid") or 0) or None
    return Status(str(state.get("status", "unknown")), pid=pid if pid else None)


def describe_port(text: str) -> str:
    """A published port as docker's PORTS column shows it ("127.0.0.1:8080->80/tcp"),
    from the form a container records ("127.0.0.1:8080:80/tcp")."""
    host, _, inside = text.rpartition(":")
    return f"{host}->{inside}"


# -- creating ------------------------------------------------------------------------------


def _default_name(image: str) -> str:
    base = image.split("@")[0].rsplit("/", 1)[-1].split(":")[0]
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", base).strip("-._")[:40] or "c"
    return f"{base}-{os.urandom(3).hex()}"


def _etc_binds(
    container_dir: Path, root: Root, hostname: str, network: str
) -> tuple[BindMount, ...]:
    # Generated per container and bind-mounted, never written into the rootfs: a commit
    # of the upper dir (provisioning) must not capture them. A symlink in the image (say
    # to systemd-resolved's file) means the image manages that file itself.
    etc = container_dir / cd.ETC
    etc.mkdir()
    resolv = "# no network (sysbake --network none)\n"
    if network == "host":
        try:
            resolv = Path("/etc/resolv.conf").read_text()
        except OSError:
            resolv = ""
    files = {
        "hosts": bundle.hosts_file(hostname),
        "hostname": f"{hostname}\n",
        "resolv.conf": resolv,
    }
    binds = []
    for name, content in files.items():
        if root.is_symlink(f"etc/{name}"):
            continue
        (etc / name).write_text(content)
        binds.append(BindMount(str(etc / name), f"/etc/{name}"))
    return tuple(binds)


def _cgroups_path(runtime_id: str) -> str:
    # Relative on v1/hybrid: nested under the cgroup of whoever starts it, as runc does by
    # default. Absolute on v2, where a cgroup holding processes cannot have children with
    # controllers. Rootless, relative on v2 too: runc puts it beside its own cgroup, in
    # the user's delegated subtree (sysbake.userns).
    from sysbake import userns

    v2 = _cgroup_mode() == "v2" and not userns.inside()
    return f"/sysbake/{runtime_id}" if v2 else f"sysbake/{runtime_id}"


def _systemd_cgroup(runtime_name: str, cgroups_path: str) -> str:
    # Only for runc: crun puts a relative path below the hierarchy's root instead, and
    # keeps the whole subtree writable (as before; crun runs on v2 and pure v1 hosts only).
    if runtime_name != "runc" or _cgroup_mode() == "v2":
        return ""
    from sysbake import cgroups

    return cgroups.systemd_cgroup(
        cgroups.MOUNTINFO.read_text(errors="replace"),
        Path("/proc/self/cgroup").read_text(),
        cgroups_path,
    )


def _short_hash(text: str, length: int) -> str:
    return oci.hex_of(oci.sha256_digest(text.encode()))[:length]


def _prepare_monitor(
    cdir: Path, runtime: str, runtime_name: str, runtime_id: str, remove: bool = False
) -> monitor.Launch:
    """The container's monitor, forked now to get ready while the bundle is written;
    `remove`: it removes the container's directory once PID 1 has ended."""
    from sysbake.runtime import monitor

    # A short console socket path: unix socket paths are limited to 107 bytes.
    console = state_root() / "console" / f"{_short_hash(runtime_id, 16)}.sock"
    return monitor.prepare(
        monitor.MonitorSpec(
            runtime=runtime,
            root=state_root() / runtime_name,
            id=runtime_id,
            dir=cdir.absolute(),
            socket=console,
            remove=remove,
        )
    )


# What `create` waits for in the rootfs of a systemd PID 1 (`grace` s at most): by default
# systemd's private socket, so that `run -d` then `exec systemctl ...` works at once; build
# steps, which wait for the boot themselves, for nothing (None).
SYSTEMD_READY = "run/systemd/private"
SYSTEMD_STARTED = "run/systemd/system"


def _check_alive(container: Container, grace: float, ready: str | None) -> None:
    # A PID 1 that dies at once is an error of `run`, not a container to list later.
    deadline = time.monotonic() + grace
    systemd = False
    while time.monotonic() < deadline:
        record = cd.read_exit(container.dir)
        if record is not None:
            raise RuntimeFailure(
                f"container {container.name} exited immediately with code "
                f"{record.code}: {cd.console_tail(container.dir)}"
            )
        if ready is None:
            return
        if bundle.is_init(container.args) and container.pid:
            root = f"/proc/{container.pid}/root/"
            if os.path.exists(root + ready):
                return
            if not systemd and os.path.exists(root + SYSTEMD_STARTED):
                # systemd itself: its socket will come, later on a loaded host.
                systemd, deadline = True, time.monotonic() + _SOCKET_WAIT
        time.sleep(0.005)


_SOCKET_WAIT = 30.0  # seconds a started systemd may take to open its private socket


def create(
    containers_dir: Path,
    lowerdirs: Sequence[Path],
    image_config: dict[str, Any],
    *,
    image: str,
    image_id: str = "",
    options: RunOptions | None = None,
    require_init: bool = False,
    grace: float = 1.0,
    ready: str | None = SYSTEMD_READY,
) -> Container:
    """Start a container of the image whose layer trees are `lowerdirs` (bottom to top,
    never written); return it running, detached, once the path `ready` exists in it (for
    at most `grace` s; None: at once). On failure nothing is left behind."""
    options = options or RunOptions()
    name = bundle.check_name(options.name or _default_name(image))
    runtime = runtime_path(options.runtime)
    from sysbake import userns

    userns.require_boot(image)  # rootless: a cgroup to boot in, said before anything starts
    if options.network not in bundle.NETWORKS:
        raise RuntimeFailure(
            f"unknown network {options.network!r}: expected " + " or ".join(bundle.NETWORKS)
        )
    for bind in options.binds:
        if not os.path.exists(bind.source):
            raise RuntimeFailure(
                f"-v {bind.source}:{bind.destination}: the source {bind.source} does not exist"
            )
    containers_dir.mkdir(parents=True, exist_ok=True)
    cdir = containers_dir / name
    try:
        cdir.mkdir()
    except FileExistsError:
        raise RuntimeFailure(
            f"a container named {name!r} already exists: remove it with "
            f"`sysbake rm {name}` or choose another --name"
        ) from None
    runtime_id = f"{name}.{_short_hash(str(containers_dir.resolve()), 8)}"
    container: Container | None = None
    launch = None
    bound: list[tuple[Publish, socket.socket]] = []
    try:
        for sub in (cd.UPPER, cd.WORK, cd.ROOTFS):
            (cdir / sub).mkdir(parents=True)
        launch = _prepare_monitor(cdir, runtime, options.runtime, runtime_id, options.auto_remove)
        bound = _bind_ports(options.ports)
        rootfs = cdir / cd.ROOTFS
        overlay.mount_overlay(lowerdirs, cdir / cd.UPPER, cdir / cd.WORK, rootfs)
        spec = _bundle_spec(cdir, image, image_config, options, name, require_init)
        spec = spec._replace(cgroups_path=_cgroups_path(runtime_id))
        spec = spec._replace(systemd_cgroup=_systemd_cgroup(options.runtime, spec.cgroups_path))
        atomic_write(
            cdir / cd.CONFIG,
            json.dumps(bundle.runtime_config(spec), indent=1).encode(),
            durable=False,
        )
        args = spec.process.args[len(options.wrapper) :]
        container = Container(
            name=name,
            dir=cdir,
            runtime=options.runtime,
            runtime_id=runtime_id,
            image=image,
            image_id=image_id,
            created=time.time(),
            args=args,
            stop_signal=options.stop_signal or bundle.stop_signal(image_config, args),
            network=options.network,
            id=os.urandom(32).hex(),
            lowerdirs=tuple(str(d) for d in lowerdirs),
            ports=tuple(str(port) for port, _ in bound),
            auto_remove=options.auto_remove,
        )
        _save(container)
        container = _launch(container, launch, bound)
        _check_alive(container, grace, ready)
        return container
    except BaseException:
        _close_sockets(bound)
        try:
            started = launch.cancel() if launch is not None else None
            if started is not None and container is not None:
                container = container._replace(pid=started)
        finally:
            _teardown_dir(cdir, container)
        raise


def _bundle_spec(
    cdir: Path,
    image: str,
    image_config: dict[str, Any],
    options: RunOptions,
    name: str,
    require_init: bool,
) -> BundleSpec:
    """The bundle of a new container whose rootfs is mounted in `cdir` (its per-container
    /etc files written), without its cgroup paths."""
    hostname = bundle.hostname_for(name)
    with Root(cdir / cd.ROOTFS) as root:
        init = find_init(root)
        if require_init and init is None:
            raise NoSystemd(
                f"image {image} has no systemd: neither "
                + " nor ".join(bundle.INIT_CANDIDATES)
                + " exists in it"
            )
        process = bundle.process_from_image(
            image_config,
            init=init,
            container_uuid=os.urandom(16).hex(),
            env=options.env,
            command=options.command,
        )
        for exe in (*options.wrapper[:1], process.args[0]):
            if exe.startswith("/") and not root.exists(exe):
                raise RuntimeFailure(
                    f"image {image}: the command {exe} does not exist in the image"
                )
        etc_binds = _etc_binds(cdir, root, hostname, options.network)
        volatile_journal = root.is_dir("var/log/journal")
    return BundleSpec(
        hostname=hostname,
        process=process._replace(args=options.wrapper + process.args),
        network=options.network,
        binds=etc_binds + options.binds,
        volatile_journal=volatile_journal,
        annotations=(("org.sysbake.image", image), ("org.sysbake.name", name)),
    )


def _bind_ports(ports: Sequence[Publish]) -> list[tuple[Publish, socket.socket]]:
    # Before anything starts: a port in use is an error of `run`, not a broken container.
    if not ports:
        return []
    from sysbake.runtime import ports as publishing

    return publishing.bind(ports)


def _launch(
    container: Container, launch: monitor.Launch, bound: Sequence[tuple[Publish, socket.socket]]
) -> Container:
    """Have the prepared monitor start `container`; then forward its published ports.
    The container, with PID 1's host pid and start time, saved."""
    try:
        pid = launch.start()
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"starting container {container.name} failed: {exc}") from None
    container = container._replace(pid=pid, started=time.time())
    _save(container)
    if bound:
        from sysbake.runtime import ports as publishing

        publishing.start_forwarder(container.dir, bound, pid)
    return container


def _close_sockets(bound: Sequence[tuple[Publish, socket.socket]]) -> None:
    """Close the ports `_bind_ports` bound for a start that failed (none is forwarded)."""
    for _, sock in bound:
        sock.close()


def _end_init(container: Container) -> None:
    """Kill the PID 1 of a start that failed, wait for it (10 s at most), tear it down."""
    _kill(container, signal.SIGKILL)
    _wait_exit(container, 10.0)
    _teardown(container)


def _teardown_dir(cdir: Path, container: Container | None) -> None:
    rootfs = cdir / cd.ROOTFS
    try:
        if container is not None:
            _end_init(container)
    finally:
        overlay.umount(rootfs)
        # Never through a mounted rootfs: that would delete files of the image's view.
        if not overlay.is_mounted(rootfs):
            remove_tree(cdir)


# -- stopping and removing -----------------------------------------------------------------


def send_signal(container: Container, sig: int) -> None:
    """Send `sig` to PID 1 (no error if it already exited)."""
    _kill(container, sig)


def _kill(container: Container, sig: int) -> None:
    pidfd = _init_pidfd(container)
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, sig)
        except ProcessLookupError:
            pass
        finally:
            os.close(pidfd)
        return
    # The number, not a name: runc does not know "RTMIN+3".
    proc.run(
        [
            container.runtime,
            "--root",
            container.state_root,
            "kill",
            container.runtime_id,
            str(int(sig)),
        ],
        check=False,
        what="runtime kill",
    )


def _init_pidfd(container: Container) -> int | None:
    """A pidfd of PID 1 when it is certainly PID 1: a child of the living monitor, which
    alone reaps it, so the pid cannot have been reused. None otherwise (ask the runtime)."""
    monitor = cd.monitor_pid(container.dir)
    if container.pid is None or monitor is None:
        return None
    try:
        pidfd = os.pidfd_open(container.pid)
    except OSError:
        return None
    try:
        status = Path(f"/proc/{container.pid}/status").read_text()
    except OSError:
        status = ""
    if f"\nPPid:\t{monitor}\n" not in status:
        os.close(pidfd)
        return None
    return pidfd


def open_root(container: Container) -> Root:
    """The file system of the running `container` as its processes see it (its tmpfs and
    bind mounts included), through PID 1's root; every path resolves inside it.
    RuntimeFailure when it does not run."""
    pidfd = _init_pidfd(container)
    if pidfd is None:
        raise RuntimeFailure(f"container {container.name} is not running")
    try:
        root = Root(f"/proc/{container.pid}/root")
        # PID 1 still alive once the root is open: it is its root, not a reused pid's.
        if select.select([pidfd], [], [], 0)[0]:
            root.close()
            raise RuntimeFailure(f"container {container.name} is not running")
        return root
    finally:
        os.close(pidfd)


@contextlib.contextmanager
def files_of(container: Container) -> Iterator[Root]:
    """The container's file system: as its processes see it while it runs (`open_root`),
    else its overlay (image and upper dir) mounted for the while."""
    if _running(container):
        with open_root(container) as root:
            yield root
        return
    _check_restartable(container, "its files cannot be reached")
    overlay.mount_overlay(
        [Path(d) for d in container.lowerdirs],
        container.dir / cd.UPPER,
        container.dir / cd.WORK,
        container.rootfs,
    )
    try:
        with Root(container.rootfs) as root:
            yield root
    finally:
        overlay.umount(container.rootfs)


def _running(container: Container) -> bool:
    # Without asking the runtime when the monitor answers: it lives until PID 1 is reaped.
    if cd.read_exit(container.dir) is not None:
        return False
    return cd.monitor_alive(container.dir) or status(container).running


def _wait_exit(container: Container, timeout: float, *, nudge: bool = False) -> bool:
    """Wait until PID 1 is gone (and the monitor recorded it, if it lives); True if so.

    `nudge`: send PID 1 a SIGCHLD every _NUDGE s meanwhile. Processes that `exec` started
    are not its children (their parent is the runtime, outside), so their end sends it no
    SIGCHLD. systemd-shutdown sends every process SIGTERM, then sleeps until a SIGCHLD
    (~10 s here) before it looks again for those still alive: one still ending at its first
    look held a stop until the container was killed. A spare SIGCHLD only makes PID 1 look
    again (its default action is to ignore it)."""
    start = time.monotonic()
    deadline, nudged = start + timeout, start
    while True:
        if cd.read_exit(container.dir) is not None:
            return True
        if not cd.monitor_alive(container.dir):
            state = _runtime_state(container) if _runtime_known(container) else None
            if state is None or state.get("status") == "stopped":
                return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if nudge and now - nudged >= _NUDGE:
            _kill(container, signal.SIGCHLD)
            nudged = now
        if not _until_monitor_ends(container, min(0.1, deadline - now)):
            time.sleep(0.005)  # no monitor: the runtime is asked again


_NUDGE = 0.5  # seconds between two SIGCHLDs to a stopping PID 1


def ended(container: Container) -> bool:
    """Whether PID 1 has ended (and, if its monitor lives, its end is recorded)."""
    return _wait_exit(container, 0.0)


def _teardown(container: Container) -> None:
    # Idempotent: the monitor normally did all of this already.
    _stop_forwarder(container)
    _until_monitor_ends(container, 5.0)
    pid = cd.monitor_pid(container.dir)
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
    if _runtime_known(container):
        proc.run(
            [
                container.runtime,
                "--root",
                container.state_root,
                "delete",
                "--force",
                container.runtime_id,
            ],
            what=f"deleting container {container.name}",
        )
    overlay.umount(container.rootfs)


def _stop_forwarder(container: Container) -> None:
    # Ends with PID 1 by itself; ended here too, so that the host ports are free at once.
    if container.ports:
        from sysbake.runtime import ports

        ports.stop_forwarder(container.dir)


def stop(container: Container, timeout: float = 10.0) -> StopResult:
    """Stop with the image's stop signal, SIGKILL after `timeout` s; delete the runtime
    state and unmount the rootfs. Idempotent."""
    result = halt(container, timeout)
    _teardown(container)
    return result


def halt(container: Container, timeout: float = 10.0) -> StopResult:
    """`stop`, but returning once PID 1's end is recorded (its rootfs unmounted), while
    the runtime's state may still be being deleted (`stop` and `remove` wait for that).
    Idempotent."""
    killed = False
    if _running(container):
        log.info(f"stopping {container.name} ({signals.name(container.stop_signal)})")
        _kill(container, container.stop_signal)
        if not _wait_exit(container, timeout, nudge=True):
            log.warn(f"{container.name} did not stop within {timeout:.0f}s: killing it")
            killed = True
            _kill(container, signal.SIGKILL)
            if not _wait_exit(container, 30.0):
                raise RuntimeFailure(f"container {container.name} survived SIGKILL")
    if cd.read_exit(container.dir) is None:  # no monitor recorded the end: it did not unmount
        overlay.umount(container.rootfs)
    return StopResult(exit_code(container), killed)


def remove(container: Container, *, force: bool = False) -> None:
    """Delete the container's state and upper dir; a running one needs `force` (killed)."""
    if status(container).running:
        if not force:
            raise RuntimeFailure(
                f"container {container.name} is running: stop it first "
                f"or use `sysbake rm -f {container.name}`"
            )
        _kill(container, signal.SIGKILL)
        _wait_exit(container, 30.0)
    _teardown(container)
    remove_tree(container.dir)


def start(
    container: Container, *, grace: float = 1.0, ready: str | None = SYSTEMD_READY
) -> Container:
    """Start the ended `container` again (`sysbake start`): its rootfs (the image's layer
    trees and its own upper dir) mounted again and PID 1 run from its bundle, its ports
    published again; returned running, as `create` returns a new one. A running container
    is returned as it is. On failure it is left ended, as it was."""
    if _running(container):
        return container
    _check_restartable(container)
    runtime = runtime_path(container.runtime)
    _teardown(container)  # the runtime's state, a mount or a forwarder a crash left
    for name in (cd.EXIT, cd.INIT_PID, cd.START_ERROR):
        (container.dir / name).unlink(missing_ok=True)
    container = container._replace(pid=None)
    launch = None
    bound: list[tuple[Publish, socket.socket]] = []
    try:
        launch = _prepare_monitor(
            container.dir, runtime, container.runtime, container.runtime_id, container.auto_remove
        )
        bound = _bind_ports(_published(container))
        lowerdirs = [Path(d) for d in container.lowerdirs]
        overlay.mount_overlay(
            lowerdirs, container.dir / cd.UPPER, container.dir / cd.WORK, container.rootfs
        )
        container = _launch(container, launch, bound)
        _check_alive(container, grace, ready)
        return container
    except BaseException:
        _close_sockets(bound)
        started = launch.cancel() if launch is not None else None
        _end_failed_start(container._replace(pid=started or container.pid))
        raise


def _check_restartable(container: Container, what: str = "it cannot be started again") -> None:
    if not container.lowerdirs:  # recorded before containers kept their layer trees
        raise RuntimeFailure(
            f"container {container.name}: {what} (made by an older sysbake): "
            f"remove it and run {container.image} anew"
        )
    for tree in container.lowerdirs:
        if not os.path.isdir(tree):
            raise RuntimeFailure(
                f"container {container.name}: the layer tree {tree} of its image "
                f"{container.image} is gone (pruned): remove it and run the image anew"
            )


def _published(container: Container) -> list[Publish]:
    if not container.ports:
        return []
    from sysbake.runtime import ports

    return [port for text in container.ports for port in ports.parse(text)]


def _end_failed_start(container: Container) -> None:
    """Kill and tear down what a failed `start` began; the container stays, ended."""
    try:
        _end_init(container)
    finally:
        overlay.umount(container.rootfs)
        if cd.read_exit(container.dir) is None:
            cd.write_exit(container.dir, None)


def restart(container: Container, timeout: float = 10.0) -> Container:
    """Stop `container` (if it runs; `stop`'s `timeout`), then `start` it again."""
    if container.auto_remove:
        raise RuntimeFailure(
            f"container {container.name} is removed when it stops (run --rm): "
            "it cannot be restarted"
        )
    stop(container, timeout)
    return start(container)


def detach_upper(container: Container, dest: Path) -> Path:
    """Move the upper dir of an ended container (all its processes wrote, in overlay form:
    whiteouts, opaque xattrs) to `dest` on the store's file system; return `dest`. The
    container keeps the rest until removed. Refused while PID 1 runs."""
    if _running(container):
        raise RuntimeFailure(
            f"container {container.name} is running: its upper dir cannot be detached"
        )
    overlay.umount(container.rootfs)  # idempotent: the monitor has normally done it
    os.rename(container.dir / cd.UPPER, dest)
    return dest


# -- orphans -------------------------------------------------------------------------------


def reap_orphans(containers_dir: Path) -> list[owners.Orphan]:
    """Remove every container whose owning process is gone (see sysbake.runtime.owners): PID 1
    killed, runtime state deleted, rootfs unmounted, directory removed. What was found,
    each with the error that kept it, if any. Idempotent."""
    found = []
    for orphan in owners.claim_orphans(containers_dir):
        cdir = containers_dir / orphan.name
        try:
            container: Container | None = load(containers_dir, orphan.name)
        except RuntimeFailure:  # killed before its state was written: a dir to clear
            container = None
        if container is not None:
            orphan = orphan._replace(image=container.image)
        try:
            if container is not None:
                remove(container, force=True)
            _teardown_dir(cdir, None)
            if cdir.exists():
                raise RuntimeFailure(f"{cdir / cd.ROOTFS} is still mounted")
        except (SysbakeError, OSError) as exc:
            found.append(orphan._replace(error=str(exc)))
            continue
        owners.forget(containers_dir, orphan.name)
        found.append(orphan)
    return found


# -- store glue ------------------------------------------------------------------------------


def run_image(
    store: Any,
    ref: str,
    options: RunOptions,
    *,
    require_init: bool = False,
    owner: owners.OwnerLock | None = None,
) -> Container:
    """Resolve `ref` in `store` (a sysbake.oci.store.Store) and start a container of it;
    `owner`, the container's owner lock, is taken before it is made."""
    image = store.resolve(ref)
    if not image.layers:
        raise RuntimeFailure(f"image {ref} has no layers")
    store.ensure()
    if owner is not None:
        owner.acquire()
    lowerdirs = [store.layer_tree(layer) for layer in image.layers]
    return create(
        store.containers_dir,
        lowerdirs,
        image.config,
        image=ref,
        image_id=image.id,
        options=options,
        require_init=require_init,
    )
