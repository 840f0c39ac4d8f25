"""Rootless, for real (README, "Rootless"): a user made for this module (useradd, removed
afterwards with its subordinate ids, cgroups, namespace holder and files) runs sysbake from
a venv on /usr/bin/python3: the up-front errors (no subordinate ids, root's store, no cgroup
to boot in), `sysbake setup-rootless`, `init`, a chroot-mode build (bootstrap, script,
files and Salt steps) whose images and exports (every format) are a root build's byte for
byte, push/pull to docker-registry on loopback, and booting (`run`, `exec`, `test`, a
boot-mode step) in the cgroups that setup-rootless delegates on v1 and hybrid hosts."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import pytest
from helpers import REPO, TEST_ROOT, new_store, sysbake
from services import RegistryService

from sysbake import cgroups, userns
from sysbake.oci.store import Store

pytestmark = pytest.mark.integration

VENVS = TEST_ROOT / "rootless-venv"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NO_IDS = ["-K", "SUB_UID_COUNT=0", "-K", "SUB_GID_COUNT=0"]  # useradd: no subordinate ids

PROJECT = """\
[images.rlbase.bootstrap]
distro = "debian"
suite = "bookworm"
variant = "minbase"
packages = ["procps", "iproute2"]

[images.rlapp]
from = "rlbase"

# Owners beyond the user's own id, a setgid dir, setuid, a FIFO, links, a whiteout.
[[images.rlapp.provision]]
type = "script"
name = "users"
mode = "chroot"
run = \"\"\"
useradd -u 1234 -m alice
mkdir -p /srv/data && chown alice:staff /srv/data && chmod 2750 /srv/data
echo hello > /srv/data/hello && chown 1234:50 /srv/data/hello
ln /srv/data/hello /srv/data/hardlink && ln -s hello /srv/data/symlink
mkfifo -m 0620 /srv/data/fifo && chown 4000:4001 /srv/data/fifo
chown 65535:65535 /srv/data/symlink -h
rm -rf /usr/share/doc/procps
chmod u+s /usr/bin/id
\"\"\"

[[images.rlapp.provision]]
type = "files"
name = "site"
source = "files"
dest = "/srv/site"
owner = "alice"
group = "staff"
mode = "0640"

[[images.rlapp.provision]]
type = "salt"
name = "states"
mode = "chroot"
state_tree = "salt"
"""
BOOT_PROJECT = """\
[images.rlboot]
from = "rlapp:latest"

[[images.rlboot.provision]]
type = "script"
name = "booted"
run = \"\"\"
systemctl is-system-running --wait || true
useradd -u 2000 bob
systemctl mask systemd-timesyncd.service
\"\"\"
"""
STATES = {
    "top.sls": "base:\n  '*':\n    - site\n",
    "site.sls": (
        "/etc/motd:\n  file.managed:\n    - contents: salted\n    - mode: '0644'\n"
        "carol:\n  user.present:\n    - uid: 3000\n"
    ),
}


# -- the user -----------------------------------------------------------------------------


@dataclass
class User:
    """The module's user: its ids, home, a work dir it owns, and its sysbake."""

    name: str
    uid: int
    gid: int
    home: Path
    work: Path
    program: Path

    @property
    def store(self) -> Path:
        """Its default store: XDG_DATA_HOME is set to work/xdg."""
        return self.work / "xdg" / "sysbake"

    def sysbake(
        self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 1200
    ) -> subprocess.CompletedProcess[str]:
        """`sysbake ARGS` as this user, in a clean environment, from its work dir."""
        env = {
            "HOME": str(self.home),
            "PATH": PATH,
            "LANG": "C.UTF-8",
            "XDG_DATA_HOME": str(self.work / "xdg"),
            "REGISTRY_AUTH_FILE": str(self.work / "auth.json"),
        }
        cmd = [
            *("runuser", "-u", self.name, "--", "env", "-i"),
            *(f"{k}={v}" for k, v in env.items()),
            str(self.program),
            *map(str, args),
        ]
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=self.work, check=False
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"{' '.join(cmd)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
            )
        return done

    def subids(self) -> tuple[int, int]:
        """The first subordinate uid and gid of the user."""
        me = userns.User(self.name, self.uid, self.gid)
        uids = userns.parse_subids(userns.SUBUID.read_text(), me)
        gids = userns.parse_subids(userns.SUBGID.read_text(), me)
        return uids[0].start, gids[0].start


def _run(*cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{cmd} exited {done.returncode}: {done.stderr}"
    return done


def _source_digest() -> str:
    """What the user's venv installs: pyproject.toml, README.md and src/, hashed."""
    digest = hashlib.sha256()
    files = [REPO / "pyproject.toml", REPO / "README.md"]
    files += sorted(
        p
        for p in (REPO / "src").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in str(p)
    )
    for path in files:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _venv() -> Path:
    """A venv on /usr/bin/python3 with this checkout's sysbake, which any user may run
    (the suite's own python is root's, under /root); cached per source digest."""
    dest = VENVS / _source_digest()
    program = dest / "bin" / "sysbake"
    VENVS.mkdir(parents=True, exist_ok=True)
    with open(VENVS / ".lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if program.exists():
            return program
        for stale in VENVS.iterdir():
            if stale.is_dir():
                shutil.rmtree(stale)
        source = dest.with_name(dest.name + ".src")
        source.mkdir(parents=True)
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / name, source / name)
        shutil.copytree(
            REPO / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
        )
        _run("/usr/bin/python3", "-m", "venv", dest)
        _run(
            dest / "bin" / "pip",
            "install",
            "-q",
            "--no-deps",
            "--disable-pip-version-check",
            source,
        )
        shutil.rmtree(source)
        _run("chmod", "-R", "a+rX", VENVS)
    return program


def _can_run(name: str, python: str) -> bool:
    done = subprocess.run(
        ["runuser", "-u", name, "--", python, "-c", "import sysbake"],
        capture_output=True,
        check=False,
        cwd="/",
    )
    return done.returncode == 0


@pytest.fixture(scope="module")
def user() -> Iterator[User]:
    """A fresh user without subordinate ids, its work dir under the test root."""
    name = f"sbroot{secrets.token_hex(3)}"
    _run("useradd", "-m", "-s", "/bin/sh", *NO_IDS, name)
    try:
        import pwd

        entry = pwd.getpwnam(name)
        work = TEST_ROOT / f"rootless-{name}"
        work.mkdir(parents=True)
        os.chown(work, entry.pw_uid, entry.pw_gid)
        # The suite's python lives under /root, which other users cannot enter.
        assert not _can_run(name, sys.executable)
        program = _venv()
        yield User(name, entry.pw_uid, entry.pw_gid, Path(entry.pw_dir), work, program)
    finally:
        _remove_user(name)


def _remove_user(name: str) -> None:
    """Everything the module's user left: its processes (the namespace holder, container
    monitors: all started by this module's commands), files, cgroups and ids."""
    import pwd

    uid = pwd.getpwnam(name).pw_uid
    _stop_processes_of(uid)
    for path in (TEST_ROOT / f"rootless-{name}", Path(f"/tmp/sysbake-{uid}")):
        shutil.rmtree(path, ignore_errors=True)
    for hierarchy in userns.hierarchies(cgroups.MOUNTINFO.read_text()):
        leaf = Path(hierarchy.point, userns.DELEGATED, str(uid))
        if leaf.is_dir():
            for cgroup in sorted((p for p in leaf.rglob("*") if p.is_dir()), reverse=True):
                cgroup.rmdir()
            leaf.rmdir()
        with contextlib.suppress(OSError):  # another user's may remain
            leaf.parent.rmdir()
    _run("userdel", *(["-r"] if _has_home(name) else []), name)
    for table in (userns.SUBUID, userns.SUBGID):
        assert f"{name}:" not in table.read_text()


def _has_home(name: str) -> bool:
    import pwd

    return Path(pwd.getpwnam(name).pw_dir).is_dir()


def _stop_processes_of(uid: int) -> None:
    for pid in _processes_of(uid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.1)


def _processes_of(uid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if entry.name.isdigit() and entry.stat().st_uid == uid:
                status = (entry / "status").read_text()
                if "\nState:\tZ" not in status:
                    found.append(int(entry.name))
    return found


def _error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The one line a command said on stderr (the test fails on more or fewer)."""
    assert done.returncode == 2, done
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


# -- without what it needs ---------------------------------------------------------------


def test_without_subordinate_ids_one_line(user: User) -> None:
    line = _error_line(user.sysbake("images", check=False))
    assert line == (
        f"sysbake: error: rootless: {user.name} (uid {user.uid}) has no range of 65536 "
        f"subordinate ids in /etc/subuid: ask root to run `sysbake setup-rootless {user.name}` "
        "(or `usermod --add-subuids` and `--add-subgids`), or run sysbake as root"
    )
    # Said before anything was made: no store, no runtime directory, no namespace.
    assert not user.store.exists()
    assert not userns.runtime_base(user.uid).exists()
    assert not _processes_of(user.uid)


def test_roots_store_one_line(user: User) -> None:
    roots = user.work / "root-store"
    Store(roots).ensure()  # root's store: 0700, root's
    assert roots.stat().st_uid == 0
    for args in (("--store", roots, "run", "-d", "rlapp"), ("--store", roots, "images")):
        line = _error_line(user.sysbake(*args, check=False))
        assert line == (
            f"sysbake: error: the store {roots} belongs to root (uid 0), not to {user.name} "
            f"(uid {user.uid}): run sysbake as its owner, or use a store of your own (--store "
            "DIR or $SYSBAKE_STORE; without either, $XDG_DATA_HOME/sysbake or "
            "~/.local/share/sysbake)"
        )


def test_booting_without_a_cgroup_is_refused_up_front(user: User) -> None:
    span = userns.free_range([userns.SUBUID.read_text(), userns.SUBGID.read_text()])
    ids = f"{span.start}-{span.start + span.size - 1}"
    _run("usermod", "--add-subuids", ids, "--add-subgids", ids, user.name)
    project = user.work / "boot-project"
    project.mkdir()
    (project / "sysbake.toml").write_text(BOOT_PROJECT)
    _run("chown", "-R", f"{user.uid}:{user.gid}", project)
    mode = cgroups.host_cgroup_mode()
    if mode == "v2":
        why = "this cgroup v2 host gives the user no cgroup to write"
    else:
        why = (
            "systemd needs a cgroup of the user's own in every cgroup v1 hierarchy of this "
            f"{mode} host"
        )
    line = _error_line(user.sysbake("run", "-d", "--name", "rl-none", "rlapp", check=False))
    assert line.startswith(
        "sysbake: error: rootless: `sysbake run` needs to boot an image with systemd under "
        f"runc, but {why}"
    )
    assert line.endswith('; run sysbake as root, or use mode = "chroot" for build steps')
    line = _error_line(user.sysbake("build", project, check=False))
    assert line.startswith(
        'sysbake: error: rootless: the steps rlboot: booted boot their image (mode = "boot", '
        f"the default), but {why}"
    )
    assert not (user.store / "containers").exists() or not any(
        (user.store / "containers").iterdir()
    )


def test_setup_rootless_gives_ids_and_cgroups(user: User) -> None:
    # A second fresh user shows the ids being added; the module's user already has them.
    other = f"sbroot{secrets.token_hex(3)}"
    _run("useradd", "-M", *NO_IDS, other)
    try:
        done = sysbake("setup-rootless", other, store=user.work / "unused")
        me = userns.named_user(other)
        for table in (userns.SUBUID, userns.SUBGID):
            [span] = userns.parse_subids(table.read_text(), me)
            assert span.size == 65536 and span.start >= 100000
        assert f"for {other} (uid {me.uid})" in done.stdout.splitlines()[0]
    finally:
        _remove_user(other)
    done = sysbake("setup-rootless", user.name, store=user.work / "unused")
    lines = done.stdout.splitlines()
    assert lines[0].endswith(
        f"{user.name} (uid {user.uid}) has 65536 in /etc/subuid and /etc/subgid"
    )
    if cgroups.host_cgroup_mode() != "v2":
        for h in userns.hierarchies(cgroups.MOUNTINFO.read_text()):
            if h.fstype == "cgroup":
                leaf = Path(h.point, userns.DELEGATED, str(user.uid))
                assert (leaf / "cgroup.procs").stat().st_uid == user.uid
    # Only root may do it, in one line.
    assert _error_line(user.sysbake("setup-rootless", user.name, check=False)) == (
        "sysbake: error: setup-rootless: must run as root"
    )


# -- building, exporting, publishing -----------------------------------------------------


@dataclass
class Built:
    """The same project built by root (in `root_store`) and by the user."""

    project: Path
    root_store: Path
    root_ids: dict[str, str]
    user_ids: dict[str, str]


def _write_project(path: Path, uid: int, gid: int) -> None:
    (path / "files").mkdir(parents=True)
    (path / "files" / "index.html").write_text("<h1>rootless</h1>\n")
    (path / "files" / "link.html").symlink_to("index.html")
    (path / "salt").mkdir()
    for name, text in STATES.items():
        (path / "salt" / name).write_text(text)
    (path / "sysbake.toml").write_text(PROJECT)
    _run("chown", "-R", f"{uid}:{gid}", path)


def _ids(out: str) -> dict[str, str]:
    return {i["ref"]: i["id"] for i in json.loads(out)["images"]}


def _seed(user: User, root_store: Path) -> None:
    """The user's store gets what a fresh machine would download or compile: the .deb
    cache and the Salt toolchain (its owners shifted into the user's id map)."""
    from sysbake.build.salt import toolchain

    debs = user.store / "debs"
    debs.mkdir(parents=True)
    for deb in (TEST_ROOT / "debs").glob("*.deb"):
        shutil.copy(deb, debs / deb.name)
    name = f"salt-{toolchain.DEFAULT_SALT_VERSION}-{toolchain.toolchain_key()[:12]}"
    source = (root_store / "toolchains").resolve() / name
    subuid, subgid = user.subids()
    _shifted_copy(source, user.store / "toolchains" / name, user, subuid, subgid)
    _run("chown", "-R", f"{user.uid}:{user.gid}", user.work / "xdg", debs)
    _run("chown", f"{user.uid}:{user.gid}", user.store / "toolchains")


def _shifted_copy(source: Path, dest: Path, user: User, subuid: int, subgid: int) -> None:
    """`source` copied to `dest` with every owner as the user's namespace maps it (0 is the
    user, N the Nth subordinate id)."""
    shutil.copytree(source, dest, symlinks=True)
    for path in [dest, *dest.rglob("*")]:
        st = (source / path.relative_to(dest)).lstat()
        uid = user.uid if st.st_uid == 0 else subuid + st.st_uid - 1
        gid = user.gid if st.st_gid == 0 else subgid + st.st_gid - 1
        os.lchown(path, uid, gid)
        if not path.is_symlink():
            os.chmod(path, st.st_mode & 0o7777)


@pytest.fixture(scope="module")
def built(user: User, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The project built by root in a store of its own, then by the user in its default
    store (the .deb cache and Salt toolchain seeded)."""
    project = user.work / "project"
    _write_project(project, user.uid, user.gid)
    root_store = new_store(tmp_path_factory.mktemp("rootless-root-store"))
    root = sysbake("build", "--json", project, store=root_store)
    _seed(user, root_store)
    mine = user.sysbake("build", "--json", project)
    return Built(project, root_store, _ids(root.stdout), _ids(mine.stdout))


def test_init_as_the_user(user: User) -> None:
    user.sysbake("init", "starter")
    starter = user.work / "starter"
    assert (starter / "sysbake.toml").stat().st_uid == user.uid
    user.sysbake("validate", starter)


def test_the_users_build_is_a_root_build(user: User, built: Built) -> None:
    assert set(built.user_ids) == {"rlbase:latest", "rlapp:latest"}
    assert built.user_ids == built.root_ids  # the same digests: the same images
    # On the host, the image's owners are the user (0) and its subordinate ids (N).
    subuid, subgid = user.subids()
    hellos = list((user.store / "trees").glob("*/srv/data/hello"))
    assert len(hellos) == 1
    st = hellos[0].lstat()
    assert (st.st_uid, st.st_gid) == (subuid + 1234 - 1, subgid + 50 - 1)
    assert user.store.stat().st_uid == user.uid and user.store.stat().st_mode & 0o777 == 0o700
    images = user.sysbake("images").stdout
    assert "rlapp" in images and "rlbase" in images


class Member(NamedTuple):
    """What a rootfs tar says of one file."""

    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    link: str
    sha256: str


def _members(path: Path) -> dict[str, Member]:
    """Every entry of a rootfs tar: type, mode, owners, size, mtime, link, content hash."""
    found = {}
    with tarfile.open(path) as tar:
        for m in tar:
            data = tar.extractfile(m) if m.isfile() else None
            digest = hashlib.sha256(data.read()).hexdigest() if data else ""
            found[m.name] = Member(
                m.type, m.mode, m.uid, m.gid, m.size, m.mtime, m.linkname, digest
            )
    return found


def test_exports_in_every_format_equal_a_root_builds(user: User, built: Built) -> None:
    out_user, out_root = user.work / "out-user", user.work / "out-root"
    out_user.mkdir()
    out_root.mkdir()
    os.chown(out_user, user.uid, user.gid)
    files = {"oci-archive": "app.oci.tar", "docker-archive": "app.docker.tar", "rootfs": "app.tar"}
    for fmt, name in [*files.items(), ("oci", "layout")]:
        user.sysbake("export", "rlapp:latest", "--format", fmt, "-o", out_user / name)
        sysbake(
            "export", "rlapp:latest", "--format", fmt, "-o", out_root / name, store=built.root_store
        )
    assert (out_user / "app.tar").stat().st_uid == user.uid
    entries = _members(out_user / "app.tar")
    assert entries == _members(out_root / "app.tar")  # file by file
    for name in files.values():
        assert (out_user / name).read_bytes() == (out_root / name).read_bytes(), name
    assert _tree_bytes(out_user / "layout") == _tree_bytes(out_root / "layout")
    # The owners, modes and kinds a root build gives, in the user's image.
    assert entries["srv/data/hello"][2:4] == (1234, 50)
    assert entries["srv/data/fifo"][:4] == (tarfile.FIFOTYPE, 0o620, 4000, 4001)
    assert entries["srv/data/symlink"][2:4] == (65535, 65535)
    assert entries["srv/data/hardlink"].type == tarfile.REGTYPE  # first in name order
    assert entries["srv/data/hello"][:1] + entries["srv/data/hello"][6:7] == (
        tarfile.LNKTYPE,
        "srv/data/hardlink",
    )
    assert entries["srv/data"].mode == 0o2750
    assert entries["usr/bin/id"].mode & 0o4000
    assert entries["srv/site/index.html"][1:4] == (0o640, 1234, 50)
    assert entries["srv/site/link.html"].type == tarfile.SYMTYPE
    assert entries["etc/shadow"].gid == 42  # group shadow
    assert "usr/share/doc/procps" not in entries
    assert "carol:x:3000:" in (out_user / "app.tar").read_bytes().decode(errors="replace")


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_push_and_pull_as_the_user(user: User, built: Built, registry: RegistryService) -> None:
    ref = f"{registry.address}/rootless/app:1"
    pushed = json.loads(user.sysbake("push", "--json", "rlapp:latest", ref).stdout)
    theirs = sysbake(
        "push", "--json", "rlapp:latest", f"{registry.address}/root/app:1", store=built.root_store
    )
    assert pushed["digest"] == json.loads(theirs.stdout)["digest"]
    user.sysbake("rmi", "rlapp:latest")
    pulled = json.loads(user.sysbake("pull", "--json", ref, "-t", "rlapp:pulled").stdout)
    assert pulled["id"] == built.root_ids["rlapp:latest"]
    user.sysbake("tag", "rlapp:pulled", "rlapp:latest")


# -- booting, where the host allows it -------------------------------------------------------


def _boots() -> None:
    if cgroups.host_cgroup_mode() == "v2":
        pytest.skip(
            "booting rootless on cgroup v2 needs a systemd user session's delegated "
            "cgroup; test_booting_without_a_cgroup_is_refused_up_front checks the error"
        )


def test_run_exec_and_test_boot_as_the_user(
    user: User, built: Built, registry: RegistryService
) -> None:
    _boots()
    # Pulled into a second store of the user's: its layers are unpacked in the namespace.
    other = ("--store", user.work / "store2")
    user.sysbake(*other, "pull", f"{registry.address}/rootless/app:1", "-t", "app:pulled")
    name = "rl-boot"
    user.sysbake(*other, "run", "-d", "--name", name, "app:pulled")
    try:
        state = user.sysbake(
            *other, "exec", name, "systemctl", "is-system-running", "--wait", check=False
        )
        assert state.stdout.strip() in ("running", "degraded"), state
        said = user.sysbake(*other, "exec", name, "stat", "-c", "%u:%g %a", "/srv/data/hello")
        assert said.stdout.split() == ["1234:50", "644"]
        assert user.sysbake(*other, "ps", "-q").stdout.strip()
        user.sysbake(*other, "stop", name)
    finally:
        user.sysbake(*other, "rm", "-f", name, check=False)
    assert user.sysbake(*other, "ps", "-a", "-q").stdout.strip() == ""
    tested = user.sysbake("test", "rlbase:latest")
    assert "PASSED" in tested.stdout + tested.stderr


def test_a_boot_mode_step_as_the_user_is_a_root_build(user: User, built: Built) -> None:
    _boots()
    project = user.work / "boot-project"
    mine = _ids(user.sysbake("build", "--json", project).stdout)
    root = _ids(sysbake("build", "--json", project, store=built.root_store).stdout)
    assert mine == root and set(mine) == {"rlboot:latest"}
