"""Bootstrap stage: a Debian/Ubuntu root filesystem from mmdebstrap (debootstrap fallback).

The default mirror is the host's own apt sources: we read them (one-line and deb822
formats) and hand mmdebstrap explicit source lines, so the stage key records exactly
which archive was used. `bootstrap_stage` is the stage the pipeline runs: the tree made
container-ready, cleaned and committed as the image's base layer.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import math
import os
import re
import shlex
import stat
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sysbake import log, proc
from sysbake.build import finalize
from sysbake.build.cache import hash_tree
from sysbake.build.context import BuildContext, Stage
from sysbake.errors import BuildError, CommandError, SysbakeError
from sysbake.fsutil import no_space_line, raise_disk
from sysbake.oci.layers.commit import source_date_epoch
from sysbake.oci.model import Layer
from sysbake.project.specs import BootstrapSpec, ImageSpec
from sysbake.records import record

if TYPE_CHECKING:
    from sysbake.rootfs import Root

# Packages every system-container base needs to boot systemd as PID 1.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus")
EATMYDATA_HOOKS = Path("/usr/share/mmdebstrap/hooks/eatmydata")
_ROLE_SUFFIXES = {"updates": "-updates", "security": "-security"}


@record
class AptSource:
    """One `deb` entry of the host's apt sources."""

    uri: str
    suite: str
    components: tuple[str, ...]


def _parse_one_line(text: str) -> Iterable[AptSource]:
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        line = re.sub(r"\[[^\]]*\]", " ", line)  # drop [arch=... signed-by=...]
        parts = line.split()
        if len(parts) >= 3:
            yield AptSource(parts[1].rstrip("/"), parts[2], tuple(parts[3:]))


def _parse_deb822(text: str) -> Iterable[AptSource]:
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = ""
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1] in (" ", "\t") and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split():
            continue
        if fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            for suite in fields.get("suites", "").split():
                yield AptSource(uri.rstrip("/"), suite, tuple(fields.get("components", "").split()))


def host_apt_sources(etc: Path = Path("/etc/apt")) -> list[AptSource]:
    """The host's `deb` sources, in apt's reading order."""
    found: list[AptSource] = []
    main = etc / "sources.list"
    if main.is_file():
        found.extend(_parse_one_line(main.read_text(errors="replace")))
    parts = etc / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                found.extend(_parse_one_line(f.read_text(errors="replace")))
            elif f.suffix == ".sources":
                found.extend(_parse_deb822(f.read_text(errors="replace")))
    return found


def _role(suite: str) -> tuple[str, str]:
    """('bookworm', 'security') for 'bookworm-security'; ('bookworm', 'archive') otherwise."""
    for role, suffix in _ROLE_SUFFIXES.items():
        if suite.endswith(suffix):
            return suite[: -len(suffix)], role
    if suite.endswith("/updates"):
        return suite[: -len("/updates")], "security"
    return suite, "archive"


def host_distro(os_release: Path = Path("/etc/os-release")) -> str:
    try:
        text = os_release.read_text()
    except OSError:
        return ""
    m = re.search(r'^ID="?([a-z]+)"?', text, re.M)
    return m.group(1) if m else ""


def source_lines(
    *,
    distro: str,
    suite: str,
    components: tuple[str, ...],
    mirror: str,
    snapshot: str,
    security: bool,
    sources: list[AptSource] | None = None,
    this_distro: str | None = None,
) -> list[str]:
    """The apt source lines for the bootstrap: from `mirror` when given, else from the
    host's apt sources (same archive, the requested suite, plus -updates/-security)."""
    comps = " ".join(components)
    if mirror:
        uri = mirror.replace("{snapshot}", snapshot) if snapshot else mirror
        return [f"deb {uri.rstrip('/')} {suite} {comps}"]
    if (this_distro if this_distro is not None else host_distro()) != distro:
        raise BuildError(
            f"bootstrap.mirror: required for {distro} (the host's apt sources are not {distro}'s)"
        )
    uris: dict[str, str] = {}
    for src in sources if sources is not None else host_apt_sources():
        _, role = _role(src.suite)
        uris.setdefault(role, src.uri)
    if "archive" not in uris:
        raise BuildError("bootstrap.mirror: not set and no usable entry in the host's apt sources")
    lines = [f"deb {uris['archive']} {suite} {comps}"]
    if security and suite not in ("sid", "unstable", "experimental"):
        if "updates" in uris:
            lines.append(f"deb {uris['updates']} {suite}-updates {comps}")
        if "security" in uris:
            lines.append(f"deb {uris['security']} {suite}-security {comps}")
    return lines


# Debian's architecture of each GNU multiarch tuple (CPython's sys.implementation._multiarch).
_DEBIAN_ARCHES = {
    "x86_64-linux-gnu": "amd64",
    "i386-linux-gnu": "i386",
    "aarch64-linux-gnu": "arm64",
    "arm-linux-gnueabihf": "armhf",
    "arm-linux-gnueabi": "armel",
    "powerpc64le-linux-gnu": "ppc64el",
    "s390x-linux-gnu": "s390x",
    "riscv64-linux-gnu": "riscv64",
    "mips64el-linux-gnuabi64": "mips64el",
    "loongarch64-linux-gnu": "loong64",
}


@functools.cache
def host_architecture() -> str:
    """dpkg's architecture of this host: the running Python's, a native program (no process
    spawned on every build); dpkg's own answer for a tuple not in the table."""
    arch = _DEBIAN_ARCHES.get(getattr(sys.implementation, "_multiarch", ""))
    if arch is None:
        arch = proc.run(["dpkg", "--print-architecture"], what="dpkg").stdout.decode().strip()
    return arch


@record
class BootstrapPlan:
    """Everything mmdebstrap is given; `key_inputs` is what the stage key hashes."""

    suite: str
    variant: str
    architecture: str
    components: tuple[str, ...]
    packages: tuple[str, ...]
    sources: tuple[str, ...]
    keyring: str
    snapshot: str
    hooks: tuple[Path, ...]
    distro: str = "debian"  # whose archive key it needs (check_host); the sources say the rest

    def key_inputs(self) -> dict[str, object]:
        return {
            "suite": self.suite,
            "variant": self.variant,
            "architecture": self.architecture,
            "components": list(self.components),
            "packages": list(self.packages),
            "sources": list(self.sources),
            "keyring": self.keyring,
            "snapshot": self.snapshot,
        }


def plan_for(spec: BootstrapSpec) -> BootstrapPlan:
    """Resolve a [bootstrap] section against this host: architecture and apt sources."""
    packages = tuple(dict.fromkeys((*BASE_PACKAGES, *spec.packages)))
    return BootstrapPlan(
        suite=spec.suite,
        variant=spec.variant,
        architecture=spec.architecture or host_architecture(),
        components=tuple(spec.components),
        packages=packages,
        sources=tuple(
            source_lines(
                distro=spec.distro,
                suite=spec.suite,
                components=tuple(spec.components),
                mirror=spec.mirror,
                snapshot=spec.snapshot,
                security=spec.security,
            )
        ),
        keyring=str(spec.keyring or ""),
        snapshot=spec.snapshot,
        hooks=tuple(Path(h) for h in spec.hooks),
        distro=spec.distro,
    )


def bootstrap_stage(
    ctx: BuildContext, image: str, plan: BootstrapPlan, cleanup: finalize.Cleanup
) -> Stage:
    """The base stage of image `image`: `plan` bootstrapped, made container-ready and
    cleaned by `cleanup`, committed as one layer whose tree the store keeps."""
    compression = ctx.options.compression
    inputs: dict[str, object] = {
        "stage": "bootstrap",
        "bootstrap": plan.key_inputs(),
        "hooks": [hash_tree(h) for h in plan.hooks],
        "cleanup": cleanup.key_inputs(),
        "container_ready": finalize.container_ready_inputs(cleanup),
        "compression": compression,
        "epoch": epoch_rule(plan),
    }
    store = ctx.store
    found: list[int] = []  # the epoch produce() chose, for the layer's history

    def produce() -> Layer:
        # Only a cache miss makes a layer: a no-op build never loads these (start-up cost).
        from sysbake.oci.layers.commit import commit_tree
        from sysbake.rootfs import Root

        with store.staging("bootstrap") as staging:
            tree = staging / "rootfs"
            check_host(plan, image)  # a missing key or suite: seconds, not mmdebstrap's minutes
            with log.step(
                f"{image}: mmdebstrap {plan.suite} ({plan.variant}, {plan.architecture})"
            ):
                run_bootstrap(plan, tree, store.debs_dir)
            with Root(tree) as root:
                epoch = choose_epoch(plan, root, image)  # before clean_tree drops the lists
                finalize.make_container_ready(root, cleanup)
                finalize.clean_tree(root, cleanup, epoch=epoch)
            with log.step(f"{image}: committing the base layer"):
                layer = commit_tree(store, tree, compression=compression, mtime=epoch)
            # The tree we just tarred is this layer unpacked: keep it for containers.
            store.adopt_tree(layer.diff_id, tree)
        found.append(epoch)
        return layer

    created_by = f"sysbake bootstrap {plan.suite} {plan.variant}"
    return Stage(
        "bootstrap", inputs, created_by, produce, epoch=lambda: found[-1] if found else None
    )


# Where apt keeps the Release file of each source it read (InRelease when signed inline).
_RELEASE_FILES = ("var/lib/apt/lists/*_InRelease", "var/lib/apt/lists/*_Release")
_RELEASE_MAX = 16 << 20  # far beyond any archive's Release file: larger ones are not read
_RELEASE_DATE = re.compile(rb"^Date:[ \t]*(.+?)[ \t\r]*$", re.M)
# What the key says of an epoch known only once the bootstrap has read the mirror.
RELEASE_RULE = "newest Release Date"


def epoch_rule(plan: BootstrapPlan) -> int | str:
    """The bootstrap's epoch as its stage key knows it: SOURCE_DATE_EPOCH, else the
    snapshot's time, else the rule that choose_epoch applies to the mirror's Release files."""
    epoch = source_date_epoch()
    if epoch is None:
        epoch = snapshot_epoch(plan.snapshot)
    return RELEASE_RULE if epoch is None else epoch


def choose_epoch(plan: BootstrapPlan, root: Root, image: str) -> int:
    """The epoch of a bootstrap just made in `root` (README, "Reproducible builds"):
    epoch_rule's number, else the newest Date of the Release files apt left in the tree,
    else 0 (with a warning: the tree then says nothing of the mirror's state)."""
    rule = epoch_rule(plan)
    if isinstance(rule, int):
        return rule
    epoch = release_epoch(root)
    if epoch is None:
        log.warn(
            f"{image}: no Release file with a Date in the bootstrap's apt lists: its epoch "
            "is 0 (1970-01-01); set SOURCE_DATE_EPOCH or a snapshot to choose one"
        )
        return 0
    return epoch


def snapshot_epoch(snapshot: str) -> int | None:
    """The time a snapshot id names ("20250520T000000Z", UTC); None for "" or another form."""
    import calendar
    import time

    try:
        return calendar.timegm(time.strptime(snapshot, "%Y%m%dT%H%M%SZ"))
    except ValueError:
        return None


def release_epoch(root: Root) -> int | None:
    """The newest `Date` of the apt Release files in the image tree `root` (each source's
    state when the tree was made); None when none has one. Only regular files are read,
    never through a symlink, and none larger than 16 MiB."""
    dates = []
    for pattern in _RELEASE_FILES:
        for path in root.glob(pattern):
            st = root.lstat(path)
            if st is None or not stat.S_ISREG(st.st_mode) or st.st_size > _RELEASE_MAX:
                continue
            try:
                data = root.read_bytes(path)
            except (OSError, SysbakeError):
                continue  # swapped meanwhile for something that is not a regular file
            date = release_date(data)
            if date is not None:
                dates.append(date)
    return max(dates, default=None)


def release_date(text: bytes) -> int | None:
    """The `Date` field of a Release or InRelease file, as seconds since 1970; None when
    it has none or it is not an RFC 2822 date (as apt writes: "Sat, 17 May 2025 09:12:41
    UTC")."""
    from datetime import UTC
    from email.utils import parsedate_to_datetime

    match = _RELEASE_DATE.search(text)
    if match is None:
        return None
    try:
        when = parsedate_to_datetime(match.group(1).decode("ascii"))
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, its offset unknown to the writer
        when = when.replace(tzinfo=UTC)
    return math.floor(when.timestamp())


def mmdebstrap_command(plan: BootstrapPlan, target: Path, debs: Path) -> list[str]:
    """The mmdebstrap command line, isolated (proc.ISOLATED) so that the .deb cache bind
    mount, mmdebstrap's own mounts and apt's processes vanish if we are killed."""
    cache = shlex.quote(str(debs))
    cmd = [
        "mmdebstrap",
        # apt's and dpkg's lines, which sysbake.progress counts packages by.
        "--verbose",
        "--mode=root",
        f"--variant={plan.variant}",
        f"--architectures={plan.architecture}",
        f"--components={','.join(plan.components)}",
        f"--include={','.join(plan.packages)}",
        # The persistent .deb cache: apt downloads into it and mmdebstrap must not empty it.
        "--skip=download/empty",
        "--skip=essential/unlink",
        # The lists stay for choose_epoch (their Release files' dates); clean_tree drops them.
        "--skip=cleanup/apt/lists",
        f'--setup-hook=mkdir -p "$1"/var/cache/apt/archives && '
        f'mount -o bind {cache} "$1"/var/cache/apt/archives',
        '--customize-hook=umount "$1"/var/cache/apt/archives',
    ]
    # The hook runs dpkg-architecture (dpkg-dev), which a slim host (the builder) lacks.
    if EATMYDATA_HOOKS.is_dir() and proc.which("dpkg-architecture"):
        cmd.append(f"--hook-dir={EATMYDATA_HOOKS}")
    if plan.snapshot:
        cmd.append('--aptopt=Acquire::Check-Valid-Until "false"')
    if plan.keyring:
        cmd.append(f"--keyring={plan.keyring}")
    for hook in plan.hooks:
        cmd.append(f'--customize-hook={shlex.quote(str(hook))} "$1"')
    cmd += [plan.suite, str(target), *plan.sources]
    return [*proc.ISOLATED, *cmd]


def _explain_failure(tail: str) -> str:
    """The most telling line of mmdebstrap's output for the one-line error."""
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    for pattern in (
        r"Unable to locate package",
        r"does not have a Release file",
        r"Failed to fetch",
        r"Could not resolve",
        r"Connection refused",
        r"^E:",
    ):
        for line in lines:
            if re.search(pattern, line):
                return re.sub(r"^(E|W|I): ", "", line)
    return lines[-1] if lines else "no output"


APT_ARCHIVES = "/var/cache/apt/archives"  # where the .deb cache is mounted in the root


def failure_message(suite: str, output: str, target: Path, debs: Path) -> str:
    """The one-line error of a failed bootstrap of `suite` into `target`, from the
    output of mmdebstrap (or debootstrap): a full disk names the directory it filled
    (the .deb cache when apt's download hit it, else the root being made) and the line
    of tar, dpkg or apt that met it."""
    full = no_space_line(output)
    if full is None:
        return f"bootstrap {suite}: {_explain_failure(output)}"
    where = debs if APT_ARCHIVES in full else target
    return f"bootstrap {suite}: no space left on device writing {where}: {full}"


def run_bootstrap(plan: BootstrapPlan, target: Path, debs: Path) -> None:
    """Bootstrap `plan` into the (non-existing or empty) directory `target`."""
    try:
        debs.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise_disk(exc, f"bootstrap {plan.suite}: creating the .deb cache {debs}")
    if proc.which("mmdebstrap") is None:
        _debootstrap(plan, target, debs)
        return
    cmd = mmdebstrap_command(plan, target, debs)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("APT_", "DEBIAN_"))}
    from sysbake import progress

    with _cache_lock(debs), progress.AptWatch() as watch:
        try:
            # Not checked by proc: the whole output is searched, not only its tail.
            result = proc.run(cmd, what="mmdebstrap", on_line=watch.line, env=env, check=False)
        except CommandError as exc:
            raise BuildError(f"bootstrap {plan.suite}: {exc}") from exc
    if result.returncode != 0:
        output = (result.stdout + b"\n" + result.stderr).decode(errors="replace")
        raise BuildError(failure_message(plan.suite, output, target, debs))


@contextlib.contextmanager
def _cache_lock(debs: Path) -> Iterator[None]:
    # apt inside each bootstrap locks the shared .deb cache and fails at once when another
    # holds it: concurrent builds wait for each other here instead.
    with open(debs / ".sysbake-lock", "a+b") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("    waiting for another bootstrap using the same .deb cache")
            fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _debootstrap(plan: BootstrapPlan, target: Path, debs: Path) -> None:
    # Fallback only: debootstrap knows one mirror, no hooks, and its own variants.
    proc.require("debootstrap", "debootstrap")
    if not plan.sources:
        raise BuildError("bootstrap: no apt source")
    uri = plan.sources[0].split()[1]
    variant = plan.variant if plan.variant in ("minbase", "buildd") else "minbase"
    cmd = [
        "debootstrap",
        f"--variant={variant}",
        f"--arch={plan.architecture}",
        f"--components={','.join(plan.components)}",
        f"--include={','.join(plan.packages)}",
        f"--cache-dir={debs}",
    ]
    if plan.keyring:
        cmd.append(f"--keyring={plan.keyring}")
    result = proc.run([*cmd, plan.suite, str(target), uri], what="debootstrap", check=False)
    if result.returncode != 0:
        output = (result.stdout + b"\n" + result.stderr).decode(errors="replace")
        raise BuildError(failure_message(plan.suite, output, target, debs))
    proc.run(["chroot", str(target), "apt-get", "clean"], what="apt-get clean", check=False)


# -- what the host and the mirror must offer, checked before mmdebstrap runs -------------------

# The archive key of each distro where mmdebstrap looks for it, and the Debian package
# that installs it there.
ARCHIVE_KEYS = {
    "debian": ("/usr/share/keyrings/debian-archive-keyring.gpg", "debian-archive-keyring"),
    "ubuntu": (
        "/usr/share/keyrings/ubuntu-archive-keyring.gpg",
        "ubuntu-archive-keyring (Debian 13 on; Ubuntu's ubuntu-keyring)",
    ),
}
MIRROR_TIMEOUT = 5.0  # seconds a mirror has to answer for one Release file


def check_host(plan: BootstrapPlan, image: str) -> None:
    """Refuse, in one line naming the image, a bootstrap that cannot work here: its
    distro's archive key is missing (see `keyring_problem`), or a mirror answers that it
    has no such suite. A mirror that does not answer is left to mmdebstrap (apt may reach
    it through its own proxy settings)."""
    problem = keyring_problem(plan, image)
    if problem is None:
        problem = next(iter(mirror_problems(plan, strict=False)), None)
    if problem is not None:
        raise BuildError(f"{image}: {problem}")


def keyring_problem(plan: BootstrapPlan, image: str, this_distro: str | None = None) -> str | None:
    """What keeps apt from trusting `plan`'s archive, or None. With no `keyring` set and
    a distro other than the host's (whose apt trusts its own archive), mmdebstrap needs
    the distro's archive key file (ARCHIVE_KEYS)."""
    host = this_distro if this_distro is not None else host_distro()
    if plan.keyring or plan.distro == host or plan.distro not in ARCHIVE_KEYS:
        return None
    path, package = ARCHIVE_KEYS[plan.distro]
    if os.path.exists(path):
        return None
    return (
        f"bootstrap.keyring: distro {plan.distro!r} needs its archive key {path}, which "
        f"this host lacks: install the Debian package {package}, or set keyring = "
        f'"FILE" in [images.{image}.bootstrap] to a keyring holding that key'
    )


def mirror_problems(plan: BootstrapPlan, *, strict: bool) -> list[str]:
    """For each apt source of `plan` whose mirror lacks the suite (no dists/SUITE/InRelease
    nor Release), a line saying so; with `strict`, also for a mirror that cannot be asked
    (no answer in MIRROR_TIMEOUT, an error status)."""
    problems = []
    for line in plan.sources:
        parts = line.split()
        if len(parts) < 3:
            continue
        uri, suite = parts[1], parts[2]
        verdict, detail = suite_status(uri, suite)
        if verdict == "missing":
            problems.append(
                f"bootstrap.mirror: {uri} has no suite {suite!r} "
                f"(dists/{suite}/InRelease and Release: {detail})"
            )
        elif verdict == "unknown" and strict:
            problems.append(f"bootstrap.mirror: {uri}: cannot tell if it has {suite!r}: {detail}")
    return problems


def suite_status(uri: str, suite: str, timeout: float = MIRROR_TIMEOUT) -> tuple[str, str]:
    """("present", ""), ("missing", why) or ("unknown", why): whether the apt mirror `uri`
    has the suite, by a HEAD of dists/SUITE/InRelease, then Release (file:// mirrors: the
    files themselves). Other schemes are not asked ("present")."""
    names = [f"dists/{suite}/{name}" for name in ("InRelease", "Release")]
    if uri.startswith("file://"):
        base = uri.removeprefix("file://")
        if any(os.path.isfile(os.path.join(base, name)) for name in names):
            return "present", ""
        return "missing", "no such file"
    if not uri.startswith(("http://", "https://")):
        return "present", ""
    import urllib.error
    import urllib.request

    detail = ""
    for name in names:
        request = urllib.request.Request(f"{uri.rstrip('/')}/{name}", method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                return "present", ""
        except urllib.error.HTTPError as exc:
            if exc.code not in (404, 410):
                return "unknown", f"{name}: HTTP {exc.code} {exc.reason}"
            detail = f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            return "unknown", f"no answer ({reason})"
    return "missing", detail


def online_problems(images: Iterable[ImageSpec]) -> list[str]:
    """`validate --online`: for each bootstrapped image of `images`, what the build's
    check_host would refuse, and a mirror that cannot be asked; one line each, named by
    the image's key (`images.NAME.bootstrap.mirror: ...`)."""
    from sysbake.project.reader import join_key

    problems = []
    for spec in images:
        if spec.bootstrap is None:
            continue
        key = join_key("images", spec.name)
        try:
            plan = plan_for(spec.bootstrap)
        except BuildError as exc:  # no mirror and no usable apt source of the host
            problems.append(f"{key}.{exc}")
            continue
        keyring = keyring_problem(plan, spec.name)
        found = [keyring] if keyring else []
        problems += [f"{key}.{p}" for p in found + mirror_problems(plan, strict=True)]
    return problems
