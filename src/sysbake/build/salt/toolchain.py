"""The Salt toolchain: the host suite's python3 with Salt installed, outside any image.

Built once per (Salt version, suite, architecture) under <store>/toolchains/salt-<v>-<hash>/:
mmdebstrap of the host's suite (python3 + compilers), then pip *inside* it (chroot, clean
environment, no index) from a wheelhouse the host's own pip downloaded (its index, proxy and
CA settings), then the compilers removed. Its Python is always started with its own dynamic
loader and libraries (`Toolchain.argv`), so it runs inside any image, wherever it is mounted.
See sysbake.build.salt.run for how a step uses it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sysbake import log, proc
from sysbake.build import bootstrap
from sysbake.errors import BuildError, CommandError, LayerError, SysbakeError
from sysbake.fsutil import atomic_write, publish_dir, remove_tree
from sysbake.oci import model as oci
from sysbake.oci.model import Layer
from sysbake.oci.store import Store
from sysbake.records import record

DEFAULT_SALT_VERSION = "3007.16"  # the newest 3007.x whose dependencies the index serves here
# Bump when salt/run.py's generated config or command changes what a run does. Here, not
# there: a Salt step's key needs it, and a no-op build should not load the run module.
RUN_SCHEMA = 1
RECIPE = 2  # bump when the way a toolchain is built changes: every toolchain is rebuilt
BUILD_PACKAGES = ("python3-dev", "gcc", "libc6-dev")  # to compile sdists; removed afterwards
_VERSION_RE = re.compile(r"^\d+(\.\d+)*(rc\d+)?$")
_CLEAN_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}
META = "sysbake/toolchain.json"
PYTHON_WRAPPER = "sysbake/python"

_LOADERS = {
    "amd64": "lib64/ld-linux-x86-64.so.2",
    "arm64": "lib/ld-linux-aarch64.so.1",
    "armhf": "lib/ld-linux-armhf.so.3",
    "i386": "lib/ld-linux.so.2",
    "ppc64el": "lib64/ld64.so.2",
    "s390x": "lib/ld64.so.1",
    "riscv64": "lib/ld-linux-riscv64-lp64d.so.1",
}
_TRIPLETS = {
    "amd64": "x86_64-linux-gnu",
    "arm64": "aarch64-linux-gnu",
    "armhf": "arm-linux-gnueabihf",
    "i386": "i386-linux-gnu",
    "ppc64el": "powerpc64le-linux-gnu",
    "s390x": "s390x-linux-gnu",
    "riscv64": "riscv64-linux-gnu",
}


def loader_path(architecture: str) -> str:
    """The ABI path of the dynamic loader of a Debian architecture, relative to '/'."""
    try:
        return _LOADERS[architecture]
    except KeyError:
        raise BuildError(
            f"salt toolchain: architecture {architecture!r} is not supported "
            f"(expected one of {', '.join(sorted(_LOADERS))})"
        ) from None


BOOT_FAILED = 97  # exit code of a salt-call whose container did not boot (see boot_code)


def boot_code(prefix: str, tmpdir: str | None, *, boot_timeout: float | None = None) -> str:
    """The `python -c` program that starts salt-call from the toolchain mounted at `prefix`.
    sys.executable points at the toolchain's wrapper so the Pythons Salt spawns (cmd.run's
    runas) also use the toolchain's loader; temp files go to `tmpdir` (a tmpfs).

    With `boot_timeout`, Salt's imports run while systemd still boots (and a first
    `systemctl is-system-running --wait` beside them), then the program waits for the boot
    to end (at most that many seconds) before any state is applied;
    if systemd ends neither running nor degraded it prints `sysbake: boot: STATE` on stderr
    and exits BOOT_FAILED."""
    lines = [
        "import os, sys, tempfile, warnings",
        # Salt imports crypt, which warns on every run (stderr noise): import it first.
        "with warnings.catch_warnings():",
        "    warnings.simplefilter('ignore')",
        "    try:",
        "        import crypt",
        "    except ImportError:",
        "        pass",
        f"sys.path[:0] = [{prefix + '/opt/salt/lib'!r}]",
        f"sys.executable = {prefix + '/' + PYTHON_WRAPPER!r}",
        "sys.argv[0] = 'salt-call'",
    ]
    if tmpdir:
        lines += [f"os.makedirs({tmpdir!r}, exist_ok=True)", f"tempfile.tempdir = {tmpdir!r}"]
    if boot_timeout is not None:
        lines += _WAIT_FOR_BOOT.format(timeout=boot_timeout, failed=BOOT_FAILED).splitlines()
    lines += _CALL_AND_EXIT.splitlines()
    return "\n".join(lines)


# salt-call, then its exit code without the interpreter's tear-down of Salt's modules
# (~0.25 s of every run here). Its atexit handlers (logging's flush among them) still run.
_CALL_AND_EXIT = """\
import atexit
from salt.scripts import salt_call
try:
    salt_call()
    code = 0
except SystemExit as exc:
    code = exc.code
if code is None:
    code = 0
elif not isinstance(code, int):
    sys.stderr.write(str(code) + chr(10))
    code = 1
atexit._run_exitfuncs()
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)"""


_WAIT_FOR_BOOT = """\
import subprocess, time
deadline = time.monotonic() + {timeout}
def boot_probe():
    return subprocess.Popen(["systemctl", "is-system-running", "--wait"], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
probe = boot_probe()
import salt.cli.call, salt.minion, salt.state
while True:
    try:
        state = probe.communicate(timeout=max(deadline - time.monotonic(), 0.1))[0].strip()
    except subprocess.TimeoutExpired:  # a boot that never ends
        probe.kill()
        state = probe.communicate()[0].strip()
    if state in ("running", "degraded"):
        break
    if state not in ("", "offline", "initializing", "starting") or time.monotonic() > deadline:
        sys.stderr.write("sysbake: boot: " + (state or "offline") + chr(10))
        sys.exit({failed})
    time.sleep(0.02)
    probe = boot_probe()"""


@record
class Toolchain:
    """A built toolchain: `python`, `loader`, `library_path` are relative to `path`; `key`
    is `toolchain_key` of what built it (for stage keys)."""

    path: Path
    version: str
    suite: str
    architecture: str
    python: str
    loader: str
    library_path: tuple[str, ...]
    key: str
    ordered_pillar: bool = True  # Salt honours env_order when merging pillar envs

    def argv(self, prefix: str) -> list[str]:
        """The loader invocation of the toolchain's Python, the toolchain mounted at `prefix`."""
        libs = ":".join(f"{prefix}/{d}" for d in self.library_path)
        return [f"{prefix}/{self.loader}", "--library-path", libs, f"{prefix}/{self.python}"]

    @classmethod
    def load(cls, path: Path) -> Toolchain:
        doc = json.loads((path / META).read_text())
        return cls(
            path=path,
            version=doc["version"],
            suite=doc["suite"],
            architecture=doc["architecture"],
            python=doc["python"],
            loader=doc["loader"],
            library_path=tuple(doc["library_path"]),
            key=doc["key"],
            ordered_pillar=_orders_pillar_envs(path),
        )


def _orders_pillar_envs(path: Path) -> bool:
    # Salt merges pillar envs in set order (random per run) unless its pillar compiler
    # knows env_order: 3006.30, 3007.16 and 3008 do, 3007.1 to 3007.10 do not.
    from sysbake.rootfs import Root

    # Through Root: a toolchain fetched from a cache source is read as an image is.
    try:
        with Root(path) as root:
            source = root.read_bytes("opt/salt/lib/salt/pillar/__init__.py")
    except (OSError, SysbakeError):
        return False
    return b"env_order" in source


# -- building a toolchain -----------------------------------------------------------------


def _host_release() -> tuple[str, str]:
    try:
        text = Path("/etc/os-release").read_text()
    except OSError:
        text = ""
    m = re.search(r'^VERSION_CODENAME="?([a-z]+)"?', text, re.M)
    if not m:
        raise BuildError(
            "salt toolchain: /etc/os-release names no VERSION_CODENAME "
            "(the toolchain is built from the host's own suite)"
        )
    return bootstrap.host_distro(), m.group(1)


def _identity(version: str, architecture: str) -> dict[str, Any]:
    version = version or DEFAULT_SALT_VERSION
    if not _VERSION_RE.match(version):
        raise BuildError(
            f'salt_version {version!r}: expected a Salt version like "{DEFAULT_SALT_VERSION}"'
        )
    arch = architecture or bootstrap.host_architecture()
    loader_path(arch)
    distro, suite = _host_release()
    return {
        "recipe": RECIPE,
        "version": version,
        "distro": distro,
        "suite": suite,
        "architecture": arch,
        "packages": list(BUILD_PACKAGES),
    }


def toolchain_key(version: str = "", architecture: str = "") -> str:
    """The key of the toolchain `ensure_toolchain` gives for these arguments, known without
    building it and the same on every host of that suite: stage keys can use it, so a cache
    shared through a registry hits on another machine."""
    return oci.sha256_digest(oci.canonical_json(_identity(version, architecture)))[7:]


def ensure_toolchain(store: Store, version: str = "", *, architecture: str = "") -> Toolchain:
    """The toolchain of Salt `version` ("" = DEFAULT_SALT_VERSION) for the host's suite,
    built on first use and reused afterwards (no download). Idempotent; concurrent callers
    wait for one build; a killed build leaves only staging that `clean_stale` removes."""
    ident = _identity(version, architecture)
    version, arch, distro, suite = (
        ident["version"],
        ident["architecture"],
        ident["distro"],
        ident["suite"],
    )
    key, final = _place(store, ident)
    with _locked(final):
        if (final / META).is_file():
            return Toolchain.load(final)
        with (
            log.step(f"building the Salt {version} toolchain ({suite}, {arch}); once per version"),
            store.staging("toolchain") as stage,
        ):
            from concurrent.futures import ThreadPoolExecutor  # once per Salt version

            tree = stage / "tree"
            if not wheelhouse_path(store, version, arch).is_dir():
                _check_version_exists(store, version)
            with (
                log.step(
                    f"toolchain: bootstrapping python3 ({suite}) and downloading Salt's wheels"
                ),
                ThreadPoolExecutor(max_workers=1) as pool,
            ):
                # The download and the bootstrap take about as long: overlap them.
                wheels = pool.submit(ensure_wheelhouse, store, version, arch)
                _bootstrap(tree, distro, suite, arch, store.debs_dir)
                python = _toolchain_python(tree, suite)
                wheelhouse = wheels.result()
            with log.step(f"toolchain: pip install salt=={version} (offline, in the toolchain)"):
                _install_salt(tree, wheelhouse, version)
            _slim(tree)
            _relativize_symlinks(tree)
            meta = _describe(tree, ident, key, python, wheelhouse)
            _write_wrapper(tree, meta)
            _smoke_test(tree, meta)
            remove_tree(final)  # a leftover without its metadata is not a toolchain
            publish_dir(tree, final)
    return Toolchain.load(final)


def _place(store: Store, ident: dict[str, Any]) -> tuple[str, Path]:
    """The key of the toolchain `ident` describes and its directory in the store."""
    key = oci.sha256_digest(oci.canonical_json(ident))[7:]
    store.ensure()
    top = store.root / "toolchains"
    top.mkdir(exist_ok=True)
    return key, top / f"salt-{ident['version']}-{key[:12]}"


@contextlib.contextmanager
def _locked(final: Path) -> Iterator[None]:
    """Hold the lock of toolchain directory `final`: one builder or fetcher at a time."""
    with open(final.parent / f".{final.name}.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def installed(store: Store, version: str = "", *, architecture: str = "") -> Toolchain | None:
    """The toolchain `ensure_toolchain` would give, when the store already has it."""
    _key, final = _place(store, _identity(version, architecture))
    return Toolchain.load(final) if (final / META).is_file() else None


# -- a toolchain travelling through a registry (sysbake.registry.stagecache) ---------------


def artifact_config(toolchain: Toolchain, diff_id: str) -> dict[str, Any]:
    """What describes a toolchain's layer in a registry: its key and identity, and the
    diff ID its layer must unpack to (pure). Its wheels stay on the machine that built it."""
    return {
        "key": toolchain.key,
        "version": toolchain.version,
        "suite": toolchain.suite,
        "architecture": toolchain.architecture,
        "diff_id": diff_id,
    }


def commit_layer(store: Store, toolchain: Toolchain) -> Layer:
    """The toolchain's tree as a layer blob of the store (zstd: it unpacks several times
    faster than gzip, and a toolchain is most of what a fresh runner fetches)."""
    from sysbake.oci.layers.commit import commit_tree

    return commit_tree(store, toolchain.path, compression="zstd")


def adopt_layer(
    store: Store, layer: Layer, origin: str, version: str = "", *, architecture: str = ""
) -> Toolchain:
    """Install the toolchain of `version` from `layer` (a blob of the store, fetched from
    cache source `origin`) instead of building it: unpacked through the one layer check and
    extractor (sysbake.oci.layers.archive.extract: EntryCheck, content = its diff ID, no
    device nodes), its metadata checked against the key this host computes, then published
    where `ensure_toolchain` finds it. Nothing of it runs on the host. LayerError or
    BuildError (nothing installed) when it is not that toolchain."""
    from sysbake.oci import compress
    from sysbake.oci.layers import archive

    ident = _identity(version, architecture)
    key, final = _place(store, ident)
    with _locked(final):
        if (final / META).is_file():
            return Toolchain.load(final)
        with store.staging("toolchain") as stage:
            tree = stage / "tree"
            tree.mkdir()
            what = f"toolchain layer {layer.blob.digest}"
            try:
                with (
                    store.open_blob(layer.blob.digest) as raw,
                    compress.decompressor(layer.compression, raw) as plain,
                ):
                    archive.extract(
                        plain, tree, overlay=False, allow_devices=False, diff_id=layer.diff_id
                    )
            except LayerError as exc:
                raise LayerError(f"{what}: {exc}") from exc
            except CommandError as exc:
                raise LayerError(f"{what}: not a valid {layer.compression} stream") from exc
            store.mark_checked(layer.diff_id)
            check_metadata(tree, ident, key, what)
            remove_tree(final)  # a leftover without its metadata is not a toolchain
            publish_dir(tree, final)
        atomic_write(_origin_path(store, key), origin.encode())
    return Toolchain.load(final)


def origin_of(store: Store, toolchain: Toolchain) -> str:
    """The cache source the toolchain was fetched from ("": built in this store)."""
    try:
        return _origin_path(store, toolchain.key).read_text().strip()
    except OSError:
        return ""


def _origin_path(store: Store, key: str) -> Path:
    return store.cache_dir / "toolchains" / f"{key}.origin"


_META_PATHS = ("python", "loader")


def check_metadata(tree: Path, ident: dict[str, Any], key: str, what: str) -> None:
    """Refuse (BuildError) a toolchain tree whose metadata is not that of `ident` and `key`,
    or whose python, loader and library paths are not relative paths inside it that lead
    to files (directories) of the tree: read only through rootfs.Root, as an image is."""
    from sysbake.rootfs import Root

    with Root(tree) as root:
        try:
            meta = json.loads(root.read_bytes(META))
        except (OSError, ValueError, SysbakeError) as exc:
            raise BuildError(f"{what}: no readable {META} ({exc})") from None
        if not isinstance(meta, dict):
            raise BuildError(f"{what}: {META} is not a JSON object")
        for name, wanted in (("key", key), *((k, ident[k]) for k in ("version", "suite"))):
            if meta.get(name) != wanted:
                raise BuildError(
                    f"{what}: {META} names {name} {meta.get(name)!r}, expected {wanted!r}"
                )
        paths = meta.get("library_path")
        if not isinstance(paths, list) or not paths:
            raise BuildError(f"{what}: {META} names no library_path")
        for name, value in [
            *((n, meta.get(n)) for n in _META_PATHS),
            *(("library_path", p) for p in paths),
        ]:
            if not _inside(value):
                raise BuildError(f"{what}: {META}: {name} {value!r} is not a path inside it")
            is_there = root.is_dir if name == "library_path" else root.is_file
            if not is_there(str(value)):
                raise BuildError(f"{what}: {META}: {name} {value!r} is missing from it")
        if not root.is_file(PYTHON_WRAPPER):
            raise BuildError(f"{what}: {PYTHON_WRAPPER} is missing from it")


def _inside(value: object) -> bool:
    # Relative, without '..': the toolchain is mounted at a prefix in images.
    return (
        isinstance(value, str)
        and bool(value)
        and not value.startswith("/")
        and ".." not in value.split("/")
        and "\0" not in value
    )


def wheelhouse_path(store: Store, version: str, architecture: str) -> Path:
    """Where the wheelhouse of Salt `version` for this Python and architecture is kept."""
    tag = f"py{sys.version_info.major}.{sys.version_info.minor}-{architecture}"
    return store.root / "toolchains" / "wheels" / f"salt-{version}-{tag}"


def ensure_wheelhouse(store: Store, version: str, architecture: str) -> Path:
    """Salt `version`, its dependencies, their build requirements and pip, downloaded once
    by the host's own pip (its index, proxy and CA settings) for this Python."""
    final = wheelhouse_path(store, version, architecture)
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with store.staging("wheels") as stage:
        dest = stage / "wheels"
        _pip_download(version, [f"salt=={version}"], dest)
        # pip download does not fetch build requirements; the toolchain's pip builds
        # sdists offline, so add them (and pip itself) until no new sdist appears.
        seen: set[str] = set()
        while True:
            sdists = {p.name for p in dest.iterdir() if p.suffix in (".gz", ".zip")} - seen
            if not sdists:
                break
            seen |= sdists
            reqs = sorted({r for s in sdists for r in build_requirements(dest / s)})
            _pip_download(version, [*reqs, "pip"], dest)
        if not any(dest.glob("pip-*.whl")):
            _pip_download(version, ["pip"], dest)
        with contextlib.suppress(OSError):
            publish_dir(dest, final)
    if not final.is_dir():
        raise BuildError(f"salt_version {version!r}: could not store the wheelhouse at {final}")
    return final


def _check_version_exists(store: Store, version: str) -> None:
    # Seconds, where learning it from the full download would come after the bootstrap.
    with store.staging("salt-sdist") as probe:
        _pip_download(version, ["--no-deps", f"salt=={version}"], probe)


def build_requirements(sdist: Path) -> list[str]:
    """The [build-system] requires of an sdist (.tar.gz or .zip); setuptools' defaults when
    it has no pyproject.toml."""
    text = None
    if sdist.name.endswith(".zip"):
        import zipfile

        with zipfile.ZipFile(sdist) as z:
            names = [n for n in z.namelist() if n.count("/") == 1 and n.endswith("/pyproject.toml")]
            text = z.read(names[0]).decode() if names else None
    else:
        import tarfile

        with tarfile.open(sdist) as t:
            members = [
                m
                for m in t.getmembers()
                if m.name.count("/") == 1 and m.name.endswith("/pyproject.toml") and m.isfile()
            ]
            f = t.extractfile(members[0]) if members else None
            text = f.read().decode() if f else None
    default = ["setuptools>=40.8.0", "wheel"]
    if text is None:
        return default
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return default
    reqs = doc.get("build-system", {}).get("requires")
    return [str(r) for r in reqs] if isinstance(reqs, list) else default


def _pip_download(version: str, reqs: list[str], dest: Path) -> None:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(dest),
        *reqs,
    ]
    try:
        proc.run(cmd, what=f"pip download {' '.join(reqs)}")
    except CommandError as exc:
        raise BuildError(explain_pip_failure(version, exc.tail or str(exc))) from exc


def explain_pip_failure(version: str, output: str) -> str:
    """One line saying why `pip download salt==version` failed, from pip's output."""
    m = re.search(r"No matching distribution found for (\S+)", output)
    if m and m.group(1).lower().startswith("salt=="):
        return f"salt_version {version!r}: no such version on the package index"
    if m:
        return (
            f"salt_version {version!r}: its dependency {m.group(1)!r} is not on the package index"
        )
    if "No module named pip" in output:
        return f"salt toolchain: {sys.executable} has no pip (it downloads Salt's wheels)"
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:] or ["no output"]
    return f"salt_version {version!r}: pip download failed: {errors[-1]}"


def _bootstrap(tree: Path, distro: str, suite: str, arch: str, debs: Path) -> None:
    plan = bootstrap.BootstrapPlan(
        suite=suite,
        variant="minbase",
        architecture=arch,
        components=("main",),
        # usr-is-merged satisfies init-system-helpers without usrmerge and its perl.
        packages=("python3", "usr-is-merged", *BUILD_PACKAGES),
        sources=tuple(
            bootstrap.source_lines(
                distro=distro,
                suite=suite,
                components=("main",),
                mirror="",
                snapshot="",
                security=True,
            )
        ),
        keyring="",
        snapshot="",
        hooks=(),
    )
    try:
        bootstrap.run_bootstrap(plan, tree, debs)
    except BuildError as exc:
        raise BuildError(f"salt toolchain: {exc}") from exc


def _chroot_script(script: str, what: str, on_line: Callable[[str], None] | None = None) -> None:
    # A private mount namespace: its mounts vanish with it, even if we are killed; a clean
    # environment: the host's PIP_*, SSL_CERT_FILE... must not reach the chroot.
    proc.run(
        [*proc.ISOLATED, "sh", "-ec", script],
        env=_CLEAN_ENV,
        what=what,
        stream=log.debug_enabled(),
        on_line=None if log.debug_enabled() else on_line,
    )


def _install_salt(tree: Path, wheels: Path, version: str) -> None:
    from sysbake.rootfs import Root

    pips = sorted(wheels.glob("pip-*.whl"))
    inner = "/tmp/sysbake-wheels"
    with Root(tree) as root:
        root.mkdir(inner)
    pip = [
        f"/usr/bin/python3 {inner}/{pips[-1].name}/pip install",
        "--no-index",
        f"--find-links {inner}",
        "--target /opt/salt/lib",
        "--no-cache-dir",
        "--disable-pip-version-check",
        "--no-warn-script-location",
        "--root-user-action=ignore",
        f"salt=={version}",
    ]
    script = (
        f"mount --bind -o ro {shlex.quote(str(wheels))} {shlex.quote(str(tree))}{inner}\n"
        f"mount -t proc proc {shlex.quote(str(tree / 'proc'))}\n"
        f"exec chroot {shlex.quote(str(tree))} {' '.join(pip)}\n"
    )
    from sysbake import progress

    try:
        with progress.PipWatch(len(list(wheels.iterdir()))) as watch:
            _chroot_script(script, f"pip install salt=={version} (toolchain)", watch.line)
    except CommandError as exc:
        lines = [ln for ln in exc.tail.splitlines() if re.search(r"error|ERROR", ln)]
        raise BuildError(
            f"salt_version {version!r}: installing Salt into the toolchain "
            f"failed: {(lines or [str(exc)])[-1].strip()}"
        ) from exc
    with Root(tree) as root:
        root.remove(inner)


def _slim(tree: Path) -> None:
    # Keep python3 and what the base system needs; drop compilers, docs, caches, devices.
    script = (
        "apt-mark auto $(dpkg-query -W -f='${Package}\\n') >/dev/null\n"
        "apt-mark manual python3 $(dpkg-query -W -f='${Package} ${Essential} ${Priority}\\n'"
        ' | awk \'$2=="yes"||$3=="required"{print $1}\') >/dev/null\n'
        # usr-is-merged stands in for usrmerge, which would keep perl.
        "if dpkg -s usr-is-merged >/dev/null 2>&1; then\n"
        "  apt-get purge -y -qq usrmerge >/dev/null\nfi\n"
        "apt-get autoremove --purge -y -qq -o APT::AutoRemove::RecommendsImportant=false"
        " -o APT::AutoRemove::SuggestsImportant=false >/dev/null\n"
        "apt-get clean\n"
        "rm -rf /usr/share/doc/* /usr/share/man/* /usr/share/info/* /usr/share/locale/*"
        " /var/lib/apt/lists/* /var/cache/debconf/*-old /var/lib/dpkg/*-old /var/log/*"
        " /root/.cache /tmp/* /dev/*\n"
    )
    proc.run(
        ["chroot", str(tree), "sh", "-ec", script],
        env=_CLEAN_ENV,
        what="removing the toolchain's build tools",
    )


def _relativize_symlinks(tree: Path) -> None:
    # The toolchain is used at /run/sysbake/salt and /opt/sysbake/salt: an absolute link
    # (/lib/x86_64-linux-gnu/...) would point into the image instead.
    for dirpath, dirs, files in os.walk(tree):
        for name in files + dirs:
            link = Path(dirpath, name)
            if link.is_symlink() and (target := os.readlink(link)).startswith("/"):
                link.unlink()
                link.symlink_to(os.path.relpath(tree / target.lstrip("/"), dirpath))


def _toolchain_python(tree: Path, suite: str) -> str:
    from sysbake.rootfs import Root

    # The host's pip picks wheels for the Python it runs on: they must fit the toolchain's.
    with Root(tree) as root:
        python = root.resolve("usr/bin/python3")
    wanted = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if Path(python).name != wanted:
        raise BuildError(
            f"salt toolchain: the {suite} python is {Path(python).name} but "
            f"sysbake runs on {wanted}, whose pip chooses the wheels: run "
            "sysbake with the host's python3"
        )
    return python


def _describe(
    tree: Path, ident: dict[str, Any], key: str, python: str, wheels: Path
) -> dict[str, Any]:
    from sysbake.rootfs import Root

    arch = str(ident["architecture"])
    triplet = _TRIPLETS[arch]
    with Root(tree) as root:
        libs = [
            d
            for d in dict.fromkeys(
                root.resolve(d) for d in (f"lib/{triplet}", f"usr/lib/{triplet}")
            )
            if root.is_dir(d)
        ]
        loader = root.resolve(loader_path(arch))
    # The exact wheels are recorded for people; they are not in the key: a toolchain
    # rebuilt later (newer dependencies) must not invalidate every cached salt stage.
    return {
        "version": ident["version"],
        "suite": ident["suite"],
        "architecture": arch,
        "python": python,
        "loader": loader,
        "library_path": libs,
        "key": key,
        "identity": ident,
        "wheels": sorted(p.name for p in wheels.iterdir()),
    }


def _write_wrapper(tree: Path, meta: dict[str, Any]) -> None:
    from sysbake.rootfs import Root

    # Relocatable: the toolchain root is two levels above the script, wherever it is mounted.
    libs = ":".join(f'"$root/{d}"' for d in meta["library_path"])
    with Root(tree) as root:
        root.mkdir(os.path.dirname(PYTHON_WRAPPER))
        root.write_bytes(
            PYTHON_WRAPPER,
            (
                "#!/bin/sh\n# sysbake: the toolchain's python, with the toolchain's loader and "
                "libraries\n"
                'root="${0%/*/*}"\n'
                f'exec "$root/{meta["loader"]}" --library-path {libs} "$root/{meta["python"]}" '
                '"$@"\n'
            ).encode(),
            mode=0o755,
        )
    atomic_write(tree / META, json.dumps(meta, indent=1, sort_keys=True).encode())


def _smoke_test(tree: Path, meta: dict[str, Any]) -> None:
    # Run from its build path: proves the loader trick and relocation before it is used.
    toolchain = Toolchain(
        path=tree,
        version=meta["version"],
        suite=meta["suite"],
        architecture=meta["architecture"],
        python=meta["python"],
        loader=meta["loader"],
        library_path=tuple(meta["library_path"]),
        key=meta["key"],
    )
    code = (
        f"import sys; sys.path[:0] = [{str(tree / 'opt/salt/lib')!r}]; "
        "import ssl, ctypes, sqlite3, zlib, salt.version; print(salt.version.__version__)"
    )
    out = (
        proc.run(
            [*toolchain.argv(str(tree)), "-I", "-c", code],
            env=_CLEAN_ENV,
            what="salt toolchain smoke test",
        )
        .stdout.decode()
        .strip()
    )
    if out != meta["version"]:
        raise BuildError(
            f"salt toolchain: built Salt reports version {out!r}, expected {meta['version']!r}"
        )
    prefix = (
        proc.run(
            [str(tree / PYTHON_WRAPPER), "-I", "-c", "import sys; print(sys.prefix)"],
            env=_CLEAN_ENV,
            what="salt toolchain smoke test",
        )
        .stdout.decode()
        .strip()
    )
    if prefix != str(tree / "usr"):
        raise BuildError(
            f"salt toolchain: its python wrapper found the prefix {prefix!r}, "
            f"expected {str(tree / 'usr')!r}"
        )
