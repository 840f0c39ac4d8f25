"""Rootless: the user namespace a non-root user's commands run in, and the up-front checks
of what they need (README, "Rootless").

Every store command of a user other than root runs inside the user's one user namespace,
in which the user is root and the user's subordinate ids (/etc/subuid, /etc/subgid) are
1..65536, and in its mount namespace. The first command makes them: it forks a child that
unshares both, maps the child's ids with newuidmap/newgidmap, and leaves a holder process
(`sysbake-userns`, a sleep) in them; every command then joins the holder's namespaces
(setns) and carries on as root there. Every code path (mmdebstrap, overlay mounts, chroot
steps, layer writers and readers, runc, the registry client) runs as it does for root, so
the files of layers get the image's own owners (0..65535) and the image is a root build's.
One namespace for all commands, as for root one host: a container started by one command
(its overlay mount, its runc state, its processes) is seen and reached by the next.

On the host the store's files belong to the user and to the user's subordinate ids; the
user reaches them through the namespace. Inside it, overlayfs keeps its marks in
`user.overlay.*` xattrs (the mount's `userxattr` option): `trusted.*` needs the initial
namespace's CAP_SYS_ADMIN.

Booting an image (systemd as PID 1 under runc) also needs cgroups the user may write. On
v1 and hybrid hosts a cgroup in every v1 hierarchy, `/sysbake-rootless/UID`, that root
prepares (`delegate_cgroups`, `sysbake setup-rootless USER`, again after each reboot): each
command joins them, and runc nests its containers there. On v2 hosts, the parent of the
user's own cgroup (a systemd user session's delegated subtree). `boot_blocker` says what
is missing; `mode = "chroot"` steps need none of it.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from sysbake.errors import SysbakeError

SUBUID = Path("/etc/subuid")
SUBGID = Path("/etc/subgid")
IDS = 65536  # subordinate ids mapped to 1..IDS: the image's ids 0..65535 and one spare
UID_MAP = Path("/proc/self/uid_map")
HOLDER = "sysbake-userns"  # the holder's argv[0]
DELEGATED = "sysbake-rootless"  # v1 hierarchies: /sysbake-rootless/UID is the user's
_IDENTITY = ("0", "0", "4294967295")  # the initial namespace's map

# Commands that boot an image: checked up front for a cgroup to boot in (boot_blocker).
BOOTING = frozenset({"run", "shell", "start", "restart", "test"})

_CLONE_NEWNS = 0x00020000
_CLONE_NEWUSER = 0x10000000


class Missing(SysbakeError):
    """What a non-root user lacks for a command: root, subordinate ids, newuidmap, a
    writable cgroup, or a store of their own. One line; said before the command starts."""

    exit_code = 2


class IdRange(NamedTuple):
    """A range of subordinate ids: `size` ids from `start`."""

    start: int
    size: int


class User(NamedTuple):
    """Who runs sysbake: name ("" for a uid without a passwd entry), uid, gid."""

    name: str
    uid: int
    gid: int

    def describe(self) -> str:
        return f"{self.name} (uid {self.uid})" if self.name else f"uid {self.uid}"

    def handle(self) -> str:
        """How commands name the user: the name, else the uid."""
        return self.name or str(self.uid)


def current_user() -> User:
    """The user running this process (real ids; the name from the passwd database)."""
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = ""
    return User(name, uid, os.getgid())


def named_user(name: str) -> User:
    """The user `name` (or a numeric uid) of the passwd database; Missing when unknown."""
    import pwd

    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise Missing(f"no user {name!r} in the passwd database") from None
    return User(entry.pw_name, entry.pw_uid, entry.pw_gid)


# -- where a user's things live ---------------------------------------------------------


def user_store(environ: dict[str, str] | None = None) -> Path:
    """A non-root user's default store: $XDG_DATA_HOME/sysbake, else
    ~/.local/share/sysbake (XDG's rule: a relative XDG_DATA_HOME is ignored)."""
    env = os.environ if environ is None else environ
    data = env.get("XDG_DATA_HOME", "")
    if data and os.path.isabs(data):
        return Path(data) / "sysbake"
    home = env.get("HOME") or os.path.expanduser("~")
    return Path(home) / ".local" / "share" / "sysbake"


_OWN_STORE = (
    "use a store of your own (--store DIR or $SYSBAKE_STORE; without either, "
    "$XDG_DATA_HOME/sysbake or ~/.local/share/sysbake)"
)


def check_store(path: Path, user: User) -> None:
    """Missing unless `user` may use the store at `path`: it is theirs, or it does not
    exist yet and they may create it (its nearest existing ancestor is writable)."""
    probe = path
    while True:
        try:
            st = os.stat(probe)
            break
        except FileNotFoundError:
            if probe == probe.parent:
                raise
            probe = probe.parent
        except OSError as exc:  # a directory on the way the user may not enter
            raise Missing(
                f"the store {path} cannot be reached by {user.describe()} ({exc.strerror}): "
                f"run sysbake as its owner, or {_OWN_STORE}"
            ) from None
    if probe == path:
        if st.st_uid != user.uid:
            owner = "root (uid 0)" if st.st_uid == 0 else f"uid {st.st_uid}"
            raise Missing(
                f"the store {path} belongs to {owner}, not to {user.describe()}: run "
                f"sysbake as its owner, or {_OWN_STORE}"
            )
    elif not os.access(probe, os.W_OK | os.X_OK):
        raise Missing(
            f"the store {path} cannot be created by {user.describe()} ({probe} is not "
            f"writable): {_OWN_STORE}"
        )


def runtime_base(uid: int) -> Path:
    """The host directory of `uid`'s runtime state (the holder's pid, runc's state, console
    sockets): /run/user/UID/sysbake when the user has /run/user/UID, else /tmp/sysbake-UID.
    The same path from the host and from the user's namespace."""
    user_run = Path(f"/run/user/{uid}")
    with contextlib.suppress(OSError):
        st = user_run.stat()
        # Seen from the namespace, the user's own directory belongs to root.
        if user_run.is_dir() and st.st_uid in (uid, 0 if inside() else uid):
            return user_run / "sysbake"
    return Path(f"/tmp/sysbake-{uid}")


def private_dir(path: Path, owner: int) -> Path:
    """`path`, made 0700 when missing; Missing when it is not a directory of `owner` that
    only `owner` may enter (/tmp/sysbake-UID may have been made first by anyone)."""
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    st = path.lstat()
    if not path.is_dir() or path.is_symlink() or st.st_uid != owner or st.st_mode & 0o077:
        raise Missing(
            f"rootless: {path} is not a private directory of its user (mode 0700): remove it"
        )
    return path


def runtime_dir(default: Path) -> Path:
    """The directory of runc's state and console sockets: `default` (root's, /run/sysbake)
    outside a user namespace; inside, the user's runtime_base."""
    if not inside():
        return default
    return private_dir(runtime_base(host_uid()), 0)


# -- subordinate ids ----------------------------------------------------------------------


def parse_subids(text: str, user: User) -> list[IdRange]:
    """The ranges that the text of /etc/subuid or /etc/subgid gives `user` (lines
    NAME:START:COUNT or UID:START:COUNT), in file order; malformed lines are skipped."""
    found = []
    for line in text.splitlines():
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (user.name or "\0", str(user.uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start >= 0 and count > 0:
            found.append(IdRange(start, count))
    return found


def take_ids(ranges: Sequence[IdRange], own: int, need: int = IDS) -> list[IdRange] | None:
    """`need` ids from `ranges`, in order (`own`, the user's own id, left out: it is mapped
    to 0 already); None when they hold fewer."""
    taken: list[IdRange] = []
    left = need
    for span in ranges:
        for piece in _without(span, own):
            size = min(piece.size, left)
            if size:
                taken.append(IdRange(piece.start, size))
                left -= size
    return taken if left == 0 else None


def _without(span: IdRange, own: int) -> list[IdRange]:
    if not span.start <= own < span.start + span.size:
        return [span]
    below = IdRange(span.start, own - span.start)
    above = IdRange(own + 1, span.start + span.size - own - 1)
    return [p for p in (below, above) if p.size > 0]


def map_args(own: int, ranges: Sequence[IdRange]) -> list[str]:
    """newuidmap's (or newgidmap's) triples after the pid: `own` as 0, `ranges` as 1..N."""
    args = ["0", str(own), "1"]
    inner = 1
    for start, size in ranges:
        args += [str(inner), str(start), str(size)]
        inner += size
    return args


def free_range(texts: Sequence[str], need: int = IDS, floor: int = 100000) -> IdRange:
    """A range of `need` ids past every range of the subuid/subgid file texts `texts` (and
    not below `floor`, where login.defs starts them), aligned to `need`."""
    end = floor
    for text in texts:
        for line in text.splitlines():
            fields = line.strip().split(":")
            with contextlib.suppress(ValueError, IndexError):
                end = max(end, int(fields[1]) + int(fields[2]))
    start = -(-end // need) * need
    return IdRange(start, need)


class Plan(NamedTuple):
    """How the namespace is mapped: newuidmap's and newgidmap's paths and id ranges."""

    newuidmap: str
    newgidmap: str
    uids: list[IdRange]
    gids: list[IdRange]


def plan(user: User, subuid: Path = SUBUID, subgid: Path = SUBGID) -> Plan:
    """What a new namespace for `user` needs, or Missing naming the first thing lacking."""
    import shutil

    helpers = []
    for helper in ("newuidmap", "newgidmap"):
        path = shutil.which(helper) or shutil.which(helper, path="/usr/bin:/bin")
        if path is None:
            raise Missing(
                f"rootless: {helper} not found: install the Debian package 'uidmap' "
                "(or run sysbake as root)"
            )
        helpers.append(path)
    maps = []
    for table, own in ((subuid, user.uid), (subgid, user.gid)):
        ranges = take_ids(parse_subids(_read(table), user), own)
        if ranges is None:
            raise Missing(
                f"rootless: {user.describe()} has no range of {IDS} subordinate ids in "
                f"{table}: ask root to run `sysbake setup-rootless {user.handle()}` (or "
                f"`usermod --add-subuids` and `--add-subgids`), or run sysbake as root"
            )
        maps.append(ranges)
    return Plan(helpers[0], helpers[1], maps[0], maps[1])


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as exc:
        raise Missing(f"rootless: cannot read {path}: {exc.strerror}") from None


# -- the namespace --------------------------------------------------------------------


@functools.cache
def inside() -> bool:
    """Whether this process runs in a user namespace other than the initial one."""
    try:
        return tuple(UID_MAP.read_text().split()) != _IDENTITY
    except OSError:
        return False


def host_uid(uid_map: str | None = None) -> int:
    """The host uid that is root here (the text of /proc/self/uid_map; 0 outside a user
    namespace or when root is not mapped)."""
    text = UID_MAP.read_text() if uid_map is None else uid_map
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0] == "0":
            return int(fields[1])
    return 0


def login_uid() -> int:
    """The uid of the user on the host: outside a user namespace the real uid, inside it
    the host uid that is root here."""
    return host_uid() if inside() else os.getuid()


def overlay_xattr(name: str) -> str:
    """The xattr overlayfs reads for its mark `name` ("opaque") in this namespace."""
    return f"{'user' if inside() else 'trusted'}.overlay.{name}"


def prepare(command: str, store: Path) -> None:
    """Make this process of a non-root user rootless for `command`: the up-front checks
    (the store is the user's, subordinate ids, newuidmap), then `enter`. Afterwards it runs
    as root in the user's namespaces, in the delegated cgroups when there are some."""
    user = current_user()
    check_store(store, user)
    how = plan(user)
    runtime = private_dir(runtime_base(user.uid), user.uid)
    join_cgroups(user.uid)  # before the namespace: the host's view of cgroup.procs
    enter(user, how, runtime)
    if command in BOOTING:
        require_boot(f"`sysbake {command}`")


def enter(user: User, how: Plan, runtime: Path) -> None:
    """Join the namespaces of `user`'s holder process, made first (mapped by `how`) when
    there is none; its pid is kept in `runtime`/userns.pid, made under the flock of
    userns.lock."""
    import fcntl

    with open(runtime / "userns.lock", "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        pid = holder(runtime / "userns.pid", user.uid)
        if pid is None:
            pid = _spawn_holder(how)
            tmp = runtime / f"userns.pid.{os.getpid()}"
            tmp.write_text(f"{pid}\n")
            tmp.rename(runtime / "userns.pid")
    _join(pid)


def holder(pidfile: Path, uid: int) -> int | None:
    """The pid in `pidfile` when it is a live holder of `uid`'s namespace (its argv[0] is
    HOLDER, it runs as `uid`, its namespace maps `uid` to root); else None."""
    try:
        pid = int(pidfile.read_text().strip())
        proc = Path(f"/proc/{pid}")
        if proc.stat().st_uid != uid:
            return None
        if proc.joinpath("cmdline").read_bytes().split(b"\0")[0] != HOLDER.encode():
            return None
        if host_uid(proc.joinpath("uid_map").read_text()) != uid:
            return None
    except (OSError, ValueError):
        return None
    return pid


def _spawn_holder(how: Plan) -> int:  # pragma: no cover - forks; tested end to end
    """A new holder process: a child unshares its user and mount namespaces, this process
    maps its ids, and the child's own child (in both, in a session of its own) becomes
    the long-lived `sysbake-userns` sleep. Its pid; Missing when the map cannot be made."""
    ready_r, ready_w = os.pipe()  # child -> parent: unshared (or why not), then the pid
    go_r, go_w = os.pipe()  # parent -> child: mapped
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        code = 1
        try:
            code = _holder_child(ready_w, go_r)
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(go_r)
    try:
        said = os.read(ready_r, 4096)
        if said != b"unshared":
            raise Missing(f"rootless: cannot create a user namespace: {said.decode()}")
        _map(pid, how)
        os.write(go_w, b"go")
        os.close(go_w)
        go_w = -1
        said = _read_all(ready_r)
        if not said.isdigit():
            raise Missing("rootless: the namespace's holder process did not start")
        return int(said)
    finally:
        if go_w >= 0:
            os.close(go_w)  # the child reads nothing and exits
        with contextlib.suppress(OSError):
            os.close(ready_r)
        os.waitpid(pid, 0)


def _holder_child(ready: int, go: int) -> int:  # pragma: no cover - the forked child
    """The child's part: unshare, wait for the map, fork the holder; its exit code."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(_CLONE_NEWUSER | _CLONE_NEWNS) != 0:
        why = os.strerror(ctypes.get_errno())
        if "permitted" in why:
            why += " (the kernel refuses unprivileged user namespaces here)"
        os.write(ready, why.encode())
        return 1
    os.write(ready, b"unshared")
    if os.read(go, 16) != b"go":
        return 1  # the parent said why
    os.setsid()
    pid = os.fork()
    if pid:
        os.write(ready, str(pid).encode())
        return 0
    # The holder: nothing open but /dev/null, nothing held (no cwd in the store).
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, 1 << 16)
    sleep = next((p for p in ("/usr/bin/sleep", "/bin/sleep") if os.access(p, os.X_OK)), "sleep")
    os.execv(sleep, [HOLDER, "infinity"])


def _map(pid: int, how: Plan) -> None:
    import subprocess

    for helper, ranges, own in (
        (how.newuidmap, how.uids, os.getuid()),
        (how.newgidmap, how.gids, os.getgid()),
    ):
        done = subprocess.run(
            [helper, str(pid), *map_args(own, ranges)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            said = " ".join(done.stderr.split()) or f"exit {done.returncode}"
            raise Missing(f"rootless: {os.path.basename(helper)} refused the map: {said}")


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    return b"".join(chunks)


def _join(pid: int) -> None:
    """Enter the user and mount namespaces of `pid` as root there, in the same working
    directory (setns moves it to the namespace's root)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    for kind, flag in (("user", _CLONE_NEWUSER), ("mnt", _CLONE_NEWNS)):
        fd = os.open(f"/proc/{pid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, flag) != 0:
                why = os.strerror(ctypes.get_errno())
                raise Missing(f"rootless: cannot join the user namespace of pid {pid}: {why}")
        finally:
            os.close(fd)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    with contextlib.suppress(OSError):
        os.chdir(cwd)
    inside.cache_clear()


# -- cgroups for booting --------------------------------------------------------------------


class Hierarchy(NamedTuple):
    """A mounted cgroup hierarchy: where, its type (cgroup or cgroup2), its name in
    /proc/self/cgroup ("cpu,cpuacct", "name=systemd", "" for cgroup2)."""

    point: str
    fstype: str
    name: str


def hierarchies(mountinfo: str) -> list[Hierarchy]:
    """The cgroup hierarchies mounted under /sys/fs/cgroup, from the text of mountinfo."""
    from sysbake.cgroups import mounts

    found = []
    for m in mounts(mountinfo):
        if m.fstype not in ("cgroup", "cgroup2") or not m.point.startswith("/sys/fs/cgroup"):
            continue
        opts = m.options.split(",")
        names = [o for o in opts if o.startswith("name=")]
        controllers = [o for o in opts if o not in _NOT_CONTROLLERS and "=" not in o]
        name = "" if m.fstype == "cgroup2" else ",".join(names or sorted(controllers))
        found.append(Hierarchy(m.point, m.fstype, name))
    return found


_NOT_CONTROLLERS = frozenset(
    {"rw", "ro", "nosuid", "nodev", "noexec", "relatime", "noatime", "xattr", "clone_children"}
    | {"nsdelegate", "memory_recursiveprot", "memory_localevents", "favordynmods"}
    | {"cpuset_v2_mode", "noprefix"}
)


def own_cgroups(text: str) -> dict[str, str]:
    """Hierarchy name ("" for cgroup2) to this process's cgroup, from /proc/self/cgroup."""
    found = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            found[",".join(sorted(parts[1].split(","))) if parts[1] else ""] = parts[2]
    return found


def _sorted_name(name: str) -> str:
    return ",".join(sorted(name.split(","))) if name else ""


def join_cgroups(uid: int) -> bool:
    """Move this process into `uid`'s delegated cgroup of every v1 hierarchy
    (/sysbake-rootless/UID, prepared by delegate_cgroups) when all of them are there and
    writable; whether it did. Runc then nests the containers of the user there."""
    from sysbake.cgroups import MOUNTINFO

    v1 = [h for h in hierarchies(MOUNTINFO.read_text()) if h.fstype == "cgroup"]
    procs = [Path(h.point, DELEGATED, str(uid), "cgroup.procs") for h in v1]
    if not v1 or not all(os.access(p, os.W_OK) for p in procs):
        return False
    for path in procs:
        try:
            path.write_text(f"{os.getpid()}\n")
        except OSError:
            return False
    return True


def boot_blocker(
    mode: str | None = None, mountinfo: str | None = None, cgroup: str | None = None
) -> str | None:
    """Why this process, in a user namespace, cannot boot an image under runc: no cgroup
    it may write (see the module docstring); None when it can, or outside a namespace.
    `mode`, `mountinfo` and `cgroup` (the texts of /proc/self/...) default to this host's."""
    if mode is None and not inside():
        return None
    from sysbake import cgroups

    mode = mode or cgroups.host_cgroup_mode()
    mountinfo = mountinfo if mountinfo is not None else cgroups.MOUNTINFO.read_text()
    own = own_cgroups(cgroup if cgroup is not None else Path("/proc/self/cgroup").read_text())
    found = hierarchies(mountinfo)
    if mode == "v2":
        unified = next((h for h in found if h.fstype == "cgroup2"), None)
        path = own.get("", "")
        parent = os.path.dirname(path.rstrip("/")) or "/"
        if unified is not None and path and os.access(unified.point + parent, os.W_OK):
            return None
        return (
            f"this cgroup v2 host gives the user no cgroup to write (runc nests containers "
            f"beside the user's cgroup {path or '?'}): start sysbake in a delegated one "
            "(a systemd user session: `systemd-run --user --scope -p Delegate=yes sysbake ...`)"
        )
    mine = f"/{DELEGATED}/{host_uid()}"
    lacking = [
        h.name
        for h in found
        if h.fstype == "cgroup" and not _below(own.get(_sorted_name(h.name), ""), mine)
    ]
    if not lacking:
        return None
    return (
        f"systemd needs a cgroup of the user's own in every cgroup v1 hierarchy of this "
        f"{mode} host, and the user has none in {', '.join(lacking)}: ask root to run "
        f"`sysbake setup-rootless USER` (again after each reboot)"
    )


def _below(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


BOOT_HINT = 'run sysbake as root, or use mode = "chroot" for build steps'


def require_boot(what: str) -> None:
    """Missing, before anything starts, when `what` (a command, a step) would boot an image
    in a user namespace that cannot; nothing outside one."""
    why = boot_blocker()
    if why is not None:
        raise Missing(
            f"rootless: {what} needs to boot an image with systemd under runc, but {why}; "
            f"{BOOT_HINT}"
        )


# -- setup-rootless (root) ------------------------------------------------------------------


def setup(name: str) -> list[str]:
    """As root: give user `name` what rootless sysbake needs: IDS subordinate uids and gids
    (usermod, when lacking) and, on v1 and hybrid hosts, a delegated cgroup in every v1
    hierarchy; what was done, a line each. Missing when not root."""
    if os.geteuid() != 0 or inside():
        raise Missing("setup-rootless: must run as root")
    user = named_user(name)
    said = _setup_ids(user)
    said += delegate_cgroups(user)
    return said


def _setup_ids(user: User) -> list[str]:
    from sysbake import proc

    lacking = [
        flag
        for table, own, flag in ((SUBUID, user.uid, "uids"), (SUBGID, user.gid, "gids"))
        if take_ids(parse_subids(_read(table), user), own) is None
    ]
    if not lacking:
        return [f"subordinate ids: {user.describe()} has {IDS} in {SUBUID} and {SUBGID}"]
    span = free_range([_read(SUBUID), _read(SUBGID)])
    ids = f"{span.start}-{span.start + span.size - 1}"
    usermod = proc.require("usermod", "passwd")
    proc.run(
        [usermod, *(a for f in lacking for a in (f"--add-sub{f}", ids)), user.name],
        what="usermod",
    )
    return [f"subordinate {' and '.join(lacking)} {ids}: added for {user.describe()}"]


def delegate_cgroups(user: User, mountinfo: str | None = None) -> list[str]:
    """As root, on a v1 or hybrid host: `user`'s cgroup /sysbake-rootless/UID in every v1
    hierarchy, theirs to write (cpuset's cpus and mems filled in, as a task needs them).
    Lines saying what was done; on a v2 host what the user needs instead."""
    from sysbake import cgroups

    text = mountinfo if mountinfo is not None else cgroups.MOUNTINFO.read_text()
    if cgroups.cgroup_mode(text) == "v2":
        return [
            "cgroups: on this cgroup v2 host, booting needs the user's systemd session "
            "(a delegated subtree: `systemd-run --user --scope -p Delegate=yes sysbake ...`)"
        ]
    done = []
    for h in hierarchies(text):
        if h.fstype != "cgroup":
            continue
        top = Path(h.point, DELEGATED)
        leaf = top / str(user.uid)
        leaf.mkdir(parents=True, exist_ok=True)
        if "cpuset" in h.name.split(","):
            for cg in (top, leaf):
                for knob in ("cpuset.cpus", "cpuset.mems"):
                    if not (cg / knob).read_text().strip():
                        (cg / knob).write_text((cg.parent / knob).read_text())
        for path in (leaf, *_files(leaf)):
            os.chown(path, user.uid, user.gid)
        done.append(str(leaf))
    return [f"cgroups: {user.describe()} may write {', '.join(done)} (until the next reboot)"]


def _files(directory: Path) -> Iterator[Path]:
    return (p for p in directory.iterdir() if p.is_file())
