"""Rootless (sysbake.userns and its call sites): subordinate ids and the maps made of them,
the user's store and runtime directory, the cgroup checks of booting, what changes inside
a user namespace (overlay's userxattr and user.overlay.* marks, /sys of a host-network
container, the auth file's uid), and the up-front errors. The namespace itself, builds,
exports, push/pull and boots as a real user are in tests/integration/test_rootless.py."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sysbake import cli, userns
from sysbake.commands import STORELESS, touches_store
from sysbake.oci.layers import archive as layers
from sysbake.runtime import bundle, overlay
from sysbake.userns import IdRange, Missing, User
from tests.unit.conftest import crafted_tar

ANN = User("ann", 4321, 4321)
NEEDS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="changes owners, sets uids")

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
50 23 0:40 / /proc rw,relatime - proc proc rw
"""
V2_MOUNTINFO = "31 23 0:28 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"


def own(path: str) -> str:
    """/proc/self/cgroup of a process at `path` in every hierarchy of HYBRID_MOUNTINFO."""
    return (
        f"12:cpu,cpuacct:{path}\n11:cpuset:{path}\n10:memory:{path}\n1:name=systemd:{path}\n0::/\n"
    )


@pytest.fixture
def in_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """As if this process ran as root of a user namespace of host uid 4321."""
    monkeypatch.setattr(userns, "inside", lambda: True)
    monkeypatch.setattr(userns, "host_uid", lambda uid_map=None: 4321)


# -- subordinate ids -----------------------------------------------------------------------


def test_subids_are_read_by_name_or_uid_and_malformed_lines_skipped() -> None:
    text = (
        "bob:100000:65536\n"
        "ann:165536:1000\n"
        "# a comment\n"
        "ann:oops:10\n"
        "4321:300000:64536\n"
        "ann:400000:0\n"
        "annie:500000:65536\n"
    )
    assert userns.parse_subids(text, ANN) == [IdRange(165536, 1000), IdRange(300000, 64536)]
    # A uid without a passwd name is found by number only, never by an empty name.
    assert userns.parse_subids(":1:2\n4321:7:8\n", User("", 4321, 4321)) == [IdRange(7, 8)]


def test_ids_are_taken_in_order_and_too_few_is_none() -> None:
    ranges = [IdRange(165536, 1000), IdRange(300000, 64536)]
    assert userns.take_ids(ranges, 4321) == ranges  # exactly 65536
    assert userns.take_ids([IdRange(100000, 70000)], 4321) == [IdRange(100000, 65536)]
    assert userns.take_ids([IdRange(100000, 65535)], 4321) is None
    assert userns.take_ids([], 4321) is None
    # The user's own id, mapped to 0 already, is never mapped twice.
    taken = userns.take_ids([IdRange(4000, 70000)], 4321)
    assert taken == [IdRange(4000, 321), IdRange(4322, 65215)]


def test_the_map_puts_the_user_at_0_and_the_ranges_at_1_and_on() -> None:
    assert userns.map_args(1001, [IdRange(100000, 65536)]) == [
        *("0", "1001", "1"),
        *("1", "100000", "65536"),
    ]
    assert userns.map_args(7, [IdRange(200, 10), IdRange(500, 65526)]) == [
        *("0", "7", "1"),
        *("1", "200", "10"),
        *("11", "500", "65526"),
    ]


def test_a_free_range_lies_past_every_range_of_both_files() -> None:
    assert userns.free_range(["", ""]) == IdRange(131072, 65536)  # aligned past 100000
    uids = "bob:100000:65536\nann:165536:65536\n"
    gids = "carol:300000:10\nbad line\n"
    assert userns.free_range([uids, gids]) == IdRange(327680, 65536)


def test_the_plan_or_what_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    subuid, subgid = tmp_path / "subuid", tmp_path / "subgid"
    subuid.write_text("ann:100000:65536\n")
    subgid.write_text("bob:100000:65536\n")
    with pytest.raises(Missing) as err:
        userns.plan(ANN, subuid, subgid)
    line = str(err.value)
    assert line == (
        f"rootless: ann (uid 4321) has no range of 65536 subordinate ids in {subgid}: ask "
        "root to run `sysbake setup-rootless ann` (or `usermod --add-subuids` and "
        "`--add-subgids`), or run sysbake as root"
    )
    assert err.value.exit_code == 2
    subgid.write_text("ann:200000:65536\n")
    how = userns.plan(ANN, subuid, subgid)
    assert (how.uids, how.gids) == ([IdRange(100000, 65536)], [IdRange(200000, 65536)])
    assert os.path.basename(how.newuidmap) == "newuidmap"
    # Without the uidmap package: one line naming it.
    monkeypatch.setattr("shutil.which", lambda name, path=None: None)
    with pytest.raises(Missing, match=r"^rootless: newuidmap not found: install the Debian "):
        userns.plan(ANN, subuid, subgid)


# -- the user's store and runtime directory ------------------------------------------------


def test_a_users_store_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    home = {"HOME": "/home/ann"}
    assert userns.user_store(home) == Path("/home/ann/.local/share/sysbake")
    assert userns.user_store({**home, "XDG_DATA_HOME": "/data/ann"}) == Path("/data/ann/sysbake")
    # A relative XDG_DATA_HOME is ignored, as the XDG spec says.
    assert userns.user_store({**home, "XDG_DATA_HOME": "rel"}) == Path(
        "/home/ann/.local/share/sysbake"
    )
    assert cli.default_store() == (cli.DEFAULT_STORE if os.geteuid() == 0 else userns.user_store())
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    monkeypatch.setenv("XDG_DATA_HOME", "/data/ann")
    assert cli.default_store() == Path("/data/ann/sysbake")


def as_user(uid: int, fn: Callable[[], None]) -> str:
    """Run `fn` in a forked child with real and effective ids `uid`; what it raised, as
    "ExceptionName: message" ("" when nothing)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read)
        said = b""
        try:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            fn()
        except BaseException as exc:
            said = f"{type(exc).__name__}: {exc}".encode()
        os.write(write, said)
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said.decode()


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A new directory every user may enter (pytest's own are root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="sysbake-rootless-units-", dir="/var/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path)


@NEEDS_ROOT
def test_a_store_must_be_the_users_own(open_dir: Path) -> None:
    tmp_path = open_dir
    roots = tmp_path / "root-store"
    roots.mkdir(mode=0o700)
    said = as_user(ANN.uid, lambda: userns.check_store(roots, ANN))
    assert said == (
        f"Missing: the store {roots} belongs to root (uid 0), not to ann (uid 4321): run "
        "sysbake as its owner, or use a store of your own (--store DIR or $SYSBAKE_STORE; "
        "without either, $XDG_DATA_HOME/sysbake or ~/.local/share/sysbake)"
    )
    # Below a directory the user may not enter: cannot be reached.
    inner = roots / "inner"
    assert as_user(ANN.uid, lambda: userns.check_store(inner, ANN)).startswith(
        f"Missing: the store {inner} cannot be reached by ann (uid 4321) (Permission denied)"
    )
    # Not there yet, and its parent is not the user's to write: cannot be created.
    fresh = tmp_path / "a" / "b"
    assert as_user(ANN.uid, lambda: userns.check_store(fresh, ANN)).startswith(
        f"Missing: the store {fresh} cannot be created by ann (uid 4321) ({tmp_path} is not "
        "writable)"
    )
    mine = tmp_path / "ann-store"
    mine.mkdir()
    os.chown(mine, ANN.uid, ANN.gid)
    assert as_user(ANN.uid, lambda: userns.check_store(mine, ANN)) == ""
    assert as_user(ANN.uid, lambda: userns.check_store(mine / "new", ANN)) == ""


def test_the_runtime_directory_is_private_and_the_users(tmp_path: Path) -> None:
    me = os.geteuid()
    made = userns.private_dir(tmp_path / "run", me)
    assert made.is_dir() and made.stat().st_mode & 0o777 == 0o700
    assert userns.private_dir(made, me) == made  # again: the same, untouched
    made.chmod(0o755)  # someone's open directory in /tmp
    with pytest.raises(Missing, match="is not a private directory of its user"):
        userns.private_dir(made, me)
    made.chmod(0o700)
    with pytest.raises(Missing, match="is not a private directory"):
        userns.private_dir(made, me + 1)
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(Missing, match="is not a private directory"):
        userns.private_dir(tmp_path / "link", me)
    # Outside a namespace the runtime keeps root's directory.
    assert userns.runtime_dir(Path("/run/sysbake")) == Path("/run/sysbake")
    assert userns.runtime_base(4321) in (
        Path("/run/user/4321/sysbake"),
        Path("/tmp/sysbake-4321"),
    )


def test_the_host_uid_is_read_from_the_uid_map() -> None:
    assert userns.host_uid("         0       1001          1\n  1 100000 65536\n") == 1001
    assert userns.host_uid("0 0 4294967295\n") == 0
    assert userns.host_uid("1 100000 65536\n") == 0  # root not mapped
    assert userns.inside() is (
        Path("/proc/self/uid_map").read_text().split() != ["0", "0", "4294967295"]
    )


def test_overlay_marks_and_the_auth_file_inside_a_namespace(
    in_namespace: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sysbake.registry import auth

    assert userns.overlay_xattr("opaque") == "user.overlay.opaque"
    assert userns.login_uid() == 4321
    env = {"HOME": "/home/ann"}
    assert auth.default_auth_file(env) == Path("/run/containers/4321/auth.json")
    monkeypatch.setattr(userns, "inside", lambda: False)
    assert userns.overlay_xattr("opaque") == "trusted.overlay.opaque"
    assert auth.default_auth_file(env) == Path(f"/run/containers/{os.getuid()}/auth.json")


# -- holder processes -----------------------------------------------------------------------


def test_only_a_live_holder_of_the_user_counts(tmp_path: Path) -> None:
    pidfile = tmp_path / "userns.pid"
    assert userns.holder(pidfile, os.getuid()) is None  # no file
    pidfile.write_text("garbage\n")
    assert userns.holder(pidfile, os.getuid()) is None
    pidfile.write_text(f"{os.getpid()}\n")  # alive, ours, but not a holder
    assert userns.holder(pidfile, os.getuid()) is None
    sleeper = subprocess.Popen([userns.HOLDER, "30"], executable="sleep")
    try:
        pidfile.write_text(f"{sleeper.pid}\n")
        # Outside any user namespace its map makes 0 root: it holds uid 0's namespace only.
        expected = sleeper.pid if os.getuid() == 0 else None
        assert userns.holder(pidfile, os.getuid()) == expected
        assert userns.holder(pidfile, os.getuid() + 1) is None
    finally:
        sleeper.kill()
        sleeper.wait()
    assert userns.holder(pidfile, os.getuid()) is None  # gone: a stale file


# -- cgroups for booting ---------------------------------------------------------------------


def test_hierarchies_and_own_cgroups_are_read() -> None:
    found = userns.hierarchies(HYBRID_MOUNTINFO)
    assert [(h.point, h.fstype, h.name) for h in found] == [
        ("/sys/fs/cgroup/cpu,cpuacct", "cgroup", "cpu,cpuacct"),
        ("/sys/fs/cgroup/cpuset", "cgroup", "cpuset"),
        ("/sys/fs/cgroup/memory", "cgroup", "memory"),
        ("/sys/fs/cgroup/systemd", "cgroup", "name=systemd"),
        ("/sys/fs/cgroup/unified", "cgroup2", ""),
    ]
    assert userns.own_cgroups(own("/x")) == {
        "cpu,cpuacct": "/x",
        "cpuset": "/x",
        "memory": "/x",
        "name=systemd": "/x",
        "": "/",
    }


def test_booting_needs_the_delegated_cgroup_in_every_v1_hierarchy(in_namespace: None) -> None:
    mine = "/sysbake-rootless/4321"
    assert userns.boot_blocker("hybrid", HYBRID_MOUNTINFO, own(mine)) is None
    assert userns.boot_blocker("hybrid", HYBRID_MOUNTINFO, own(mine + "/sysbake/c1")) is None
    why = userns.boot_blocker("hybrid", HYBRID_MOUNTINFO, own("/"))
    assert why == (
        "systemd needs a cgroup of the user's own in every cgroup v1 hierarchy of this "
        "hybrid host, and the user has none in cpu,cpuacct, cpuset, memory, name=systemd: "
        "ask root to run `sysbake setup-rootless USER` (again after each reboot)"
    )
    # Another user's delegated cgroup is not this user's.
    partly = own(mine).replace(f"cpuset:{mine}", "cpuset:/sysbake-rootless/1234")
    why = userns.boot_blocker("v1", HYBRID_MOUNTINFO, partly)
    assert why is not None and "has none in cpuset:" in why and "v1 host" in why


@NEEDS_ROOT
def test_booting_on_v2_needs_a_writable_parent_of_the_own_cgroup(in_namespace: None) -> None:
    # Root may write /sys/fs/cgroup itself: a cgroup directly below it is enough.
    assert userns.boot_blocker("v2", V2_MOUNTINFO, "0::/ann.scope\n") is None
    why = userns.boot_blocker("v2", V2_MOUNTINFO, "0::/no-such.slice/ann.scope\n")
    assert why is not None and why.startswith(
        "this cgroup v2 host gives the user no cgroup to write (runc nests containers "
        "beside the user's cgroup /no-such.slice/ann.scope): start sysbake in a delegated one"
    )


def test_outside_a_namespace_nothing_blocks_booting() -> None:
    assert userns.boot_blocker() is None
    userns.require_boot("anything")  # no error


def test_a_blocked_boot_is_one_line_with_the_hint(
    in_namespace: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(userns, "boot_blocker", lambda *a: "it cannot")
    with pytest.raises(Missing) as err:
        userns.require_boot("`sysbake run`")
    assert str(err.value) == (
        "rootless: `sysbake run` needs to boot an image with systemd under runc, but it "
        'cannot; run sysbake as root, or use mode = "chroot" for build steps'
    )


def test_a_rootless_build_names_its_boot_mode_steps_up_front(
    tmp_path: Path, in_namespace: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sysbake.commands.build import _check_rootless_boot
    from sysbake.project.load import load_project

    (tmp_path / "sysbake.toml").write_text(
        "[images.base.bootstrap]\n"
        'suite = "bookworm"\n'
        "[images.app]\n"
        'from = "base"\n'
        "[[images.app.provision]]\n"
        'type = "script"\nname = "fast"\nmode = "chroot"\nrun = "true"\n'
        "[[images.app.provision]]\n"
        'type = "script"\nname = "services"\nrun = "true"\n'
    )
    project = load_project(tmp_path)
    monkeypatch.setattr(userns, "boot_blocker", lambda *a: "no cgroup")
    with pytest.raises(Missing) as err:
        _check_rootless_boot(project, [], test=False)
    assert str(err.value) == (
        'rootless: the steps app: services boot their image (mode = "boot", the default), '
        'but no cgroup; run sysbake as root, or give those steps mode = "chroot"'
    )
    _check_rootless_boot(project, ["base"], test=False)  # no step boots
    with pytest.raises(Missing, match=r"^rootless: `build --test` needs to boot"):
        _check_rootless_boot(project, ["base"], test=True)
    monkeypatch.setattr(userns, "boot_blocker", lambda *a: None)
    _check_rootless_boot(project, [], test=True)  # booting works: nothing to say


def test_setup_needs_root_and_says_what_v2_hosts_need(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "setup-rootless" in STORELESS and not touches_store("setup-rootless")
    lines = userns.delegate_cgroups(ANN, V2_MOUNTINFO)
    assert len(lines) == 1 and "systemd-run --user --scope -p Delegate=yes" in lines[0]
    monkeypatch.setattr(os, "geteuid", lambda: 4321)
    with pytest.raises(Missing, match=r"^setup-rootless: must run as root$"):
        userns.setup("ann")


# -- what changes inside a namespace ---------------------------------------------------------


def test_overlay_mounts_use_userxattr_inside_a_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stack = ["/s/trees/b", "/s/trees/a"]
    upper, work = Path("/s/upper"), Path("/s/work")
    assert overlay.features() == overlay.FEATURES
    assert ("userxattr", "") not in overlay.fsconfig_plan(stack, upper, work)
    monkeypatch.setattr(userns, "inside", lambda: True)
    plan = overlay.fsconfig_plan(stack, upper, work)
    # userxattr allows no redirect_dir=off: nofollow makes and follows none, the same.
    assert plan[-3:] == [("redirect_dir", "nofollow"), ("metacopy", "off"), ("userxattr", "")]
    options = overlay.legacy_options(stack, upper, work)
    assert options.endswith(",redirect_dir=nofollow,metacopy=off,userxattr")


def test_sys_of_a_host_network_container_is_bound_inside_a_namespace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    process = bundle.process_from_image({"config": {}}, init="/sbin/init", container_uuid="ab" * 16)

    def sys_mount(network: str) -> dict[str, Any]:
        config = bundle.runtime_config(
            bundle.BundleSpec(hostname="h", process=process, network=network)
        )
        [found] = [m for m in config["mounts"] if m["destination"] == "/sys"]
        return dict(found)

    assert sys_mount("host")["type"] == "sysfs"
    monkeypatch.setattr(userns, "inside", lambda: True)
    bound = sys_mount("host")
    assert bound["type"] == "bind" and bound["source"] == "/sys"
    assert {"rbind", "ro", "nosuid", "nodev", "noexec"} <= set(bound["options"])
    assert sys_mount("none")["type"] == "sysfs"  # its own network namespace: sysfs mounts


def test_copy_ups_with_user_overlay_marks_are_pruned(tmp_path: Path) -> None:
    from sysbake.build.steps import prune_copy_ups

    lower, upper = tmp_path / "lower", tmp_path / "upper"
    for d in (lower / "etc", upper / "etc"):
        d.mkdir(parents=True)
    for d in (lower, upper):
        (d / "etc" / ".pwd.lock").write_bytes(b"")
        (d / "etc" / "changed").write_bytes(b"old" if d == lower else b"new")
    # What overlayfs with userxattr leaves on copied-up files: bookkeeping, no change.
    for path in (upper / "etc", upper / "etc" / ".pwd.lock", upper / "etc" / "changed"):
        os.setxattr(path, "user.overlay.origin", b"")
    os.setxattr(upper / "etc", "user.overlay.impure", b"y")
    prune_copy_ups(upper, [lower])
    assert sorted(p.name for p in (upper / "etc").iterdir()) == ["changed"]


def test_an_opaque_dir_is_unpacked_with_the_namespaces_mark(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = crafted_tar(
        ("d/", tarfile.DIRTYPE, {}),
        ("d/.wh..wh..opq", tarfile.REGTYPE, {}),
        ("d/kept", tarfile.REGTYPE, {"data": b"k"}),
    )
    monkeypatch.setattr(userns, "inside", lambda: True)
    dest = tmp_path / "tree"
    dest.mkdir()
    layers.extract(io.BytesIO(data), dest, overlay=True)
    names = os.listxattr(dest / "d")
    assert os.getxattr(dest / "d", "user.overlay.opaque") == b"y"
    assert "trusted.overlay.opaque" not in names
    assert (dest / "d" / "kept").read_bytes() == b"k"


def test_the_cli_enters_the_namespace_for_store_commands_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import argparse

    entered: list[tuple[str, Path]] = []
    monkeypatch.setattr(userns, "prepare", lambda command, store: entered.append((command, store)))
    ctx = cli.Context(store_path=tmp_path, json=False, debug=False)
    # `flags` without an image reads no store: no namespace, no subordinate ids needed.
    assert cli._rootless(ctx, "flags", argparse.Namespace(image=None)) is ctx
    assert entered == []
    after = cli._rootless(ctx, "flags", argparse.Namespace(image="web:latest"))
    assert after.rootless and entered == [("flags", tmp_path)]
    assert cli._rootless(ctx, "build", argparse.Namespace()).rootless
    assert entered[-1] == ("build", tmp_path)
