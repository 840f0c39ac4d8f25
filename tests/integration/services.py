"""Real daemons for integration tests: a private dockerd, podman with its own store, and an
OCI registry on loopback. Each is a context manager (`docker_daemon()`, `podman_store()`,
`registry_server()`) that stops what it started by pid, unmounts what was left under its
scratch directory and removes it, also when the test failed; none touches the host's
/var/lib/docker, podman store or /etc. `fixture(docker_daemon, scope="session")` makes a
pytest fixture of any scope."""

from __future__ import annotations

import base64
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

SCRATCH = Path(os.environ.get("SYSBAKE_TEST_ROOT", "/var/tmp/sysbake-test")) / "services"
DOCKERD = "/usr/sbin/dockerd"
REGISTRY = "/usr/bin/docker-registry"
INIT = "/lib/systemd/systemd"
_PR_SET_PDEATHSIG = 1


class ServiceError(RuntimeError):
    """A test service could not start, answer or stop."""


def _docker_client() -> str:
    # The Debian client matches dockerd 20.10; a newer docker earlier on PATH works too
    # (it negotiates the API version down) but is not what CI installs.
    if not os.access("/usr/bin/docker", os.X_OK):
        raise ServiceError("no /usr/bin/docker: install the Debian package 'docker.io'")
    return "/usr/bin/docker"


def _term_with_parent() -> None:
    # SIGTERM (not SIGKILL) so a daemon whose pytest died still unmounts its own state.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def scratch_dir(prefix: str, base: Path | None = None) -> Path:
    """A new private directory under `base` (default SCRATCH); kept short for socket paths."""
    (base or SCRATCH).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base or SCRATCH))


def run(
    cmd: Sequence[str | os.PathLike[str]],
    *,
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess[str]:
    """Run a command, text out; a failure raises ServiceError with its output."""
    argv = [os.fspath(c) for c in cmd]
    result = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    if check and result.returncode != 0:
        raise ServiceError(
            f"{' '.join(argv)} exited {result.returncode}\n"
            f"stdout: {result.stdout[-2000:]}\nstderr: {result.stderr[-2000:]}"
        )
    return result


# -- process and mount clean-up ----------------------------------------------------------------


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root` in this mount namespace, deepest first."""
    prefix = os.fspath(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                found.append(point)
    return sorted(set(found), key=lambda p: (-p.count("/"), p))


def unmount_under(root: Path) -> list[str]:
    """Unmount everything at or below `root` (lazily if busy); returns what stays mounted."""
    for _ in range(5):
        points = mounts_under(root)
        if not points:
            return []
        for point in points:
            if run(["umount", point], check=False).returncode != 0:
                run(["umount", "-l", point], check=False)
    return mounts_under(root)


def pids_using(root: Path) -> list[int]:
    """Processes whose command line names a path under `root` (daemons' helpers, shims)."""
    needle = os.fspath(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


def _alive(pid: int) -> bool:
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def stop_pids(pids: Sequence[int], *, timeout: float = 30) -> None:
    """SIGTERM `pids`, wait up to `timeout` seconds, then SIGKILL the ones still alive."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 10.0)):
        alive = [p for p in pids if _alive(p)]
        for pid in alive:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while alive and time.monotonic() < deadline:
            time.sleep(0.1)
            alive = [p for p in alive if _alive(p)]
        if not alive:
            return


def stop_child(child: subprocess.Popen[bytes], *, timeout: float = 30) -> None:
    """Stop a process this test started (SIGTERM, then SIGKILL) and reap it."""
    stop_pids([child.pid], timeout=timeout)
    child.wait(10)


def release(root: Path) -> None:
    """Kill what still runs from `root`, unmount below it and delete it."""
    stop_pids(pids_using(root), timeout=10)
    left = unmount_under(root)
    if left:
        raise ServiceError(f"still mounted after clean-up: {left}")
    run(["rm", "-rf", "--one-file-system", root], timeout=600)  # faster than shutil.rmtree


def wait_until(
    ready: Callable[[], bool],
    *,
    timeout: float,
    what: str,
    child: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll `ready()` until true; fail early if `child` died, naming its log's tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        if child is not None and child.poll() is not None:
            break
        time.sleep(0.2)
    tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
    state = "exited" if child is not None and child.poll() is not None else "timed out"
    raise ServiceError(f"{what}: {state} before it was ready\n{tail}")


# -- container engines ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Engine:
    """Client-side helpers shared by docker and podman (same CLI for what tests need)."""

    env: dict[str, str]
    root: Path

    @property
    def client(self) -> list[str]:
        raise NotImplementedError

    def cli(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run([*self.client, *args], env=self.env, check=check, timeout=timeout)

    def import_rootfs(self, rootfs: Path, ref: str, *, cmd: Sequence[str] = (INIT,)) -> str:
        """`<client> import` a root directory as image `ref` (the tree is only read)."""
        with subprocess.Popen(
            ["tar", "-C", os.fspath(rootfs), "-c", "."], stdout=subprocess.PIPE
        ) as tar:
            result = subprocess.run(
                [*self.client, "import", "-c", f"CMD {json.dumps(list(cmd))}", "-", ref],
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                env=self.env,
                timeout=600,
                check=False,
            )
        if tar.returncode != 0 or result.returncode != 0:  # e.g. no such rootfs
            raise ServiceError(f"importing {rootfs} as {ref} failed: {result.stderr[-2000:]}")
        return result.stdout.strip().splitlines()[-1]

    def run_systemd(
        self,
        image: str,
        flags: Sequence[str],
        *,
        extra: Sequence[str] = ("--network", "none", "--pull", "never"),
    ) -> str:
        """Start `image` detached with `flags` (plus `extra`: no network, and never a pull
        from a registry); returns the container ID."""
        return self.cli("run", "-d", *extra, *flags, image, timeout=120).stdout.strip()

    def running(self, container: str) -> bool:
        out = self.cli("inspect", "-f", "{{.State.Running}}", container, check=False)
        return out.stdout.strip() == "true"

    def wait_running(self, container: str, *, timeout: float = 90) -> str:
        """Poll `systemctl is-system-running` until running/degraded; the final state."""
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            if not self.running(container):
                logs = self.cli("logs", container, check=False)
                raise ServiceError(
                    f"container {container[:12]} exited while booting\n"
                    f"{(logs.stdout + logs.stderr)[-2000:]}"
                )
            state = self.cli(
                "exec", container, "systemctl", "is-system-running", check=False
            ).stdout.strip()
            if state in ("running", "degraded"):
                return state
            time.sleep(0.3)
        raise ServiceError(
            f"container {container[:12]} still {state!r} after {timeout:.0f}s; "
            f"failed units: {self.failed_units(container)}"
        )

    def failed_units(self, container: str) -> list[str]:
        out = self.cli(
            "exec",
            container,
            "systemctl",
            "list-units",
            "--failed",
            "--plain",
            "--no-legend",
            check=False,
        ).stdout
        return [line.split()[0] for line in out.splitlines() if line.strip()]

    def stop(self, container: str, *, timeout: int = 30) -> int:
        """Stop `container` (its stop signal, then SIGKILL after `timeout`); its exit code."""
        self.cli("stop", "-t", str(timeout), container, timeout=timeout + 60)
        return int(self.cli("inspect", "-f", "{{.State.ExitCode}}", container).stdout.strip())

    def remove_all(self) -> None:
        ids = self.cli("ps", "-aq", check=False).stdout.split()
        if ids:
            self.cli("rm", "-f", *ids, check=False, timeout=120)


@dataclass(frozen=True)
class DockerService(_Engine):
    """A private dockerd: `docker` is the client argv (with -H) that talks to it."""

    host: str = ""
    docker: list[str] = field(default_factory=list)
    pid: int = 0

    @property
    def client(self) -> list[str]:
        return self.docker

    def answers(self) -> bool:
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.cli("version", check=False, timeout=20).returncode == 0
        return False


@dataclass(frozen=True)
class PodmanService(_Engine):
    """podman with its own containers.conf and storage, selected through `env`."""

    podman: list[str] = field(default_factory=lambda: ["podman"])

    @property
    def client(self) -> list[str]:
        return self.podman


@contextlib.contextmanager
def docker_daemon(base: Path | None = None, *, timeout: float = 60) -> Iterator[DockerService]:
    """A dockerd with its own data root, exec root, pid file, socket and daemon.json."""
    if not os.access(DOCKERD, os.X_OK):
        raise ServiceError(f"{DOCKERD} missing: install the Debian package 'docker.io'")
    root = scratch_dir("dockerd-", base)
    sock = root / "docker.sock"
    (root / "daemon.json").write_text("{}\n")
    (root / "client").mkdir()
    logfile = root / "dockerd.log"
    argv = [
        DOCKERD,
        "--config-file",
        f"{root}/daemon.json",
        "--exec-opt",
        "native.cgroupdriver=cgroupfs",
        "--iptables=false",
        "--ip-forward=false",
        "--bridge=none",
        "--data-root",
        f"{root}/data",
        "--exec-root",
        f"{root}/exec",
        "--pidfile",
        f"{root}/docker.pid",
        "-H",
        f"unix://{sock}",
    ]
    child = None
    try:
        with open(logfile, "wb") as log:
            child = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_term_with_parent,
            )
        host = f"unix://{sock}"
        env = {**os.environ, "DOCKER_HOST": host, "DOCKER_CONFIG": str(root / "client")}
        env.pop("DOCKER_CONTEXT", None)
        service = DockerService(
            env=env, root=root, host=host, docker=[_docker_client(), "-H", host], pid=child.pid
        )
        wait_until(
            service.answers,
            timeout=timeout,
            what=f"dockerd (pid {child.pid})",
            child=child,
            log=logfile,
        )
        try:
            yield service
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired, ServiceError):
                service.remove_all()
    finally:
        if child is not None:
            stop_child(child, timeout=30)
        release(root)


# -- podman ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def podman_store(base: Path | None = None) -> Iterator[PodmanService]:
    """podman configured as HOST.md says (runc, no default ulimits, cgroupfs, file events),
    with graph root, run root, tmp dir and network config under a private directory."""
    if shutil.which("podman") is None:
        raise ServiceError("podman missing: install the Debian package 'podman'")
    root = scratch_dir("podman-", base)
    conf, storage = root / "containers.conf", root / "storage.conf"
    conf.write_text(
        "[containers]\ndefault_ulimits = []\n\n[engine]\n"
        'runtime = "runc"\ncgroup_manager = "cgroupfs"\nevents_logger = "file"\n'
        f'events_logfile_path = "{root}/events.log"\n'
        f'tmp_dir = "{root}/tmp"\nstatic_dir = "{root}/graph/libpod"\n'
        f'volume_path = "{root}/graph/volumes"\n\n'
        f'[network]\nnetwork_config_dir = "{root}/networks"\n'
    )
    storage.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
    service = PodmanService(env=env, root=root)
    try:
        info = service.cli("info", "--format", "{{.Store.GraphRoot}}", timeout=60)
        if info.stdout.strip() != f"{root}/graph":
            raise ServiceError(f"podman ignored {storage}: graph root {info.stdout.strip()}")
        try:
            yield service
        finally:
            service.cli("rm", "-af", "-t", "5", check=False, timeout=180)
            service.cli("rmi", "-af", check=False, timeout=180)
    finally:
        release(root)


# -- registry --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegistryService:
    """docker-registry on 127.0.0.1: `address` is host:port for image references."""

    address: str
    url: str
    root: Path
    pid: int
    username: str | None = None
    password: str | None = None
    ca_cert: Path | None = None
    certs_dir: Path | None = None

    def get(self, path: str, *, auth: bool = True) -> tuple[int, bytes]:
        """GET `path` from the registry; (status, body), errors included."""
        request = urllib.request.Request(self.url + path)
        if auth and self.username is not None:
            token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        context = ssl.create_default_context(cafile=str(self.ca_cert)) if self.ca_cert else None
        opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
        )
        try:
            with opener.open(request, timeout=10) as response:
                return int(response.status), bytes(response.read())
        except urllib.error.HTTPError as exc:
            return int(exc.code), exc.read()

    def answers(self) -> bool:
        """Whether /v2/ answers (200, or 401 when auth is on)."""
        try:
            return self.get("/v2/")[0] in (200, 401)
        except OSError:
            return False


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.create_server(("127.0.0.1", 0)) as s:
        return int(s.getsockname()[1])


def bcrypt_hash(password: str) -> str:
    """A bcrypt ($2b$) hash from the system's libcrypt, as htpasswd -B would write."""
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise ServiceError("libcrypt not found (Debian package libcrypt1)")
    libcrypt = ctypes.CDLL(name)
    libcrypt.crypt_gensalt.restype = libcrypt.crypt.restype = ctypes.c_char_p
    libcrypt.crypt_gensalt.argtypes = [
        ctypes.c_char_p,
        ctypes.c_ulong,
        ctypes.c_char_p,
        ctypes.c_int,
    ]
    libcrypt.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    salt = libcrypt.crypt_gensalt(b"$2b$", 10, None, 0)
    hashed = libcrypt.crypt(password.encode(), salt) if salt else None
    if not hashed or not hashed.startswith(b"$2b$"):
        raise ServiceError("libcrypt cannot make bcrypt hashes")
    return str(hashed.decode())


def _self_signed(root: Path, names: Sequence[str] = ()) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1 (and the DNS `names`), its key, and a certs dir holding
    it as ca.crt."""
    cert, key, certs = root / "registry.crt", root / "registry.key", root / "certs"
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName="
            + ",".join(["IP:127.0.0.1", "DNS:localhost", *(f"DNS:{n}" for n in names)]),
            "-keyout",
            key,
            "-out",
            cert,
        ],
        timeout=60,
    )
    certs.mkdir()
    shutil.copy(cert, certs / "ca.crt")
    return cert, key, certs


@contextlib.contextmanager
def registry_server(
    base: Path | None = None,
    *,
    auth: bool = False,
    tls: bool = False,
    tls_names: Sequence[str] = (),
    timeout: float = 30,
) -> Iterator[RegistryService]:
    """docker-registry (distribution 2.8) on 127.0.0.1:<free port>, filesystem storage,
    optionally with htpasswd auth (user "sysbake", random password) and a self-signed TLS
    certificate (`ca_cert`; `certs_dir` holds it as ca.crt for skopeo --cert-dir), also
    valid for the host names `tls_names`."""
    if not os.access(REGISTRY, os.X_OK):
        raise ServiceError(f"{REGISTRY} missing: install the Debian package 'docker-registry'")
    root = scratch_dir("registry-", base)
    child = None
    try:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "warn", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(root / "data")},
                "delete": {"enabled": True},
            },
            "http": {"secret": secrets.token_hex(16)},
        }
        username = password = None
        if auth:
            username, password = "sysbake", secrets.token_urlsafe(12)
            (root / "htpasswd").write_text(f"{username}:{bcrypt_hash(password)}\n")
            config["auth"] = {"htpasswd": {"realm": "sysbake-test", "path": str(root / "htpasswd")}}
        ca_cert = certs_dir = None
        if tls:
            ca_cert, key, certs_dir = _self_signed(root, tls_names)
            config["http"]["tls"] = {"certificate": str(ca_cert), "key": str(key)}
        logfile = root / "registry.log"
        for attempt in range(3):  # someone may take the port between free_port() and bind
            port = free_port()
            config["http"]["addr"] = f"127.0.0.1:{port}"
            # JSON is YAML: no YAML library needed.
            (root / "config.yml").write_text(json.dumps(config, indent=1))
            with open(logfile, "wb") as log:
                child = subprocess.Popen(
                    [REGISTRY, "serve", str(root / "config.yml")],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    preexec_fn=_term_with_parent,
                )
            scheme = "https" if tls else "http"
            service = RegistryService(
                address=f"127.0.0.1:{port}",
                url=f"{scheme}://127.0.0.1:{port}",
                root=root,
                pid=child.pid,
                username=username,
                password=password,
                ca_cert=ca_cert,
                certs_dir=certs_dir,
            )
            try:
                wait_until(
                    service.answers,
                    timeout=timeout,
                    what=f"docker-registry (pid {child.pid})",
                    child=child,
                    log=logfile,
                )
            except ServiceError:
                stop_child(child)
                if attempt == 2 or "address already in use" not in logfile.read_text():
                    raise
                continue
            yield service
            return
    finally:
        if child is not None:
            stop_child(child, timeout=15)
        release(root)


# -- pytest glue -----------------------------------------------------------------------------------


def fixture(
    factory: Callable[..., contextlib.AbstractContextManager[Any]],
    *,
    scope: str = "session",
    name: str | None = None,
    **kwargs: Any,
) -> Any:
    """A pytest fixture (of `scope`) yielding `factory(**kwargs)`'s service, stopped after."""

    def _fixture() -> Iterator[Any]:
        with factory(**kwargs) as service:
            yield service

    _fixture.__name__ = name or str(getattr(factory, "__name__", "service"))
    return pytest.fixture(scope=scope, name=name)(_fixture)  # type: ignore[call-overload]
