import os
import shutil
from pathlib import Path

from sysbake.build import finalize
from sysbake.build.finalize import Cleanup
from sysbake.project.specs import OciConfigSpec
from sysbake.rootfs import Root


def _tree(root: Path) -> Path:
    for d in (
        "etc/ssh",
        "var/lib/apt/lists/partial",
        "var/cache/apt/archives/partial",
        "var/log/apt",
        "tmp",
        "var/tmp",
        "dev",
        "var/lib/dbus",
        "etc/salt/pki",
    ):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {
        "etc/machine-id": "abc\n",
        "var/lib/dbus/machine-id": "abc\n",
        "etc/ssh/ssh_host_rsa_key": "k",
        "etc/ssh/ssh_host_rsa_key.pub": "k",
        "etc/ssh/sshd_config": "cfg",
        "var/lib/apt/lists/deb_Packages": "p",
        "var/lib/apt/lists/lock": "",
        "var/cache/apt/archives/x.deb": "d",
        "var/cache/apt/pkgcache.bin": "b",
        "var/log/apt/history.log": "h",
        "var/log/wtmp": "w",
        "tmp/junk": "j",
        "var/tmp/junk": "j",
        "etc/resolv.conf": "ns 1",
        "etc/hostname": "buildhost",
        "etc/salt/pki/minion.pem": "secret",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_clean_tree_removes_caches_keys_and_identity(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    finalize.clean_tree(Root(root), Cleanup(remove=("/etc/ssh/sshd_config",)))
    assert (root / "etc/machine-id").read_text() == ""
    assert not (root / "var/lib/dbus/machine-id").exists()
    assert list((root / "etc/ssh").iterdir()) == []
    assert sorted(p.name for p in (root / "var/lib/apt/lists").iterdir()) == ["lock", "partial"]
    assert not (root / "var/cache/apt/archives/x.deb").exists()
    assert not (root / "var/cache/apt/pkgcache.bin").exists()
    assert not (root / "var/log/apt/history.log").exists()
    assert (root / "var/log/wtmp").read_text() == ""
    assert list((root / "tmp").iterdir()) == [] and list((root / "var/tmp").iterdir()) == []
    assert not (root / "etc/salt/pki").exists()


def test_clean_tree_respects_switches(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    finalize.clean_tree(Root(root), Cleanup(ssh_host_keys=False, logs=False, machine_id=False))
    assert (root / "etc/ssh/ssh_host_rsa_key").exists()
    assert (root / "var/log/apt/history.log").exists()
    assert (root / "etc/machine-id").read_text() == "abc\n"


def test_container_ready_masks_units_and_neutralises_host_files(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "dev/null").write_text("")  # stands in for a device node
    cleanup = Cleanup(
        mask=("foo.service", "systemd-fstab-generator"),
        unmask=("systemd-logind.service", "systemd-gpt-auto-generator"),
    )
    finalize.make_container_ready(Root(root), cleanup)
    finalize.make_container_ready(Root(root), cleanup)  # idempotent
    units = root / "etc/systemd/system"
    assert os.readlink(units / "systemd-udevd.service") == "/dev/null"
    assert os.readlink(units / "foo.service") == "/dev/null"
    assert not (units / "systemd-logind.service").is_symlink()
    generators = root / "etc/systemd/system-generators"
    assert os.readlink(generators / "systemd-cryptsetup-generator") == "/dev/null"
    assert os.readlink(generators / "systemd-fstab-generator") == "/dev/null"
    assert not (generators / "systemd-gpt-auto-generator").exists()
    assert not (units / "systemd-cryptsetup-generator").exists()
    assert (units / "multi-user.target.wants" / finalize.SSH_KEYGEN_UNIT).is_symlink()
    assert list((root / "dev").iterdir()) == []
    assert (root / "etc/resolv.conf").read_text() == ""
    assert (root / "etc/hostname").read_text() == ""
    assert "localhost" in (root / "etc/hosts").read_text()


def test_image_config_is_the_systemd_container_interface() -> None:
    settings = OciConfigSpec(
        env=(("LANG", "C.UTF-8"),),
        ports=("80/tcp", "53/udp"),
        volumes=("/srv",),
        stop_signal="37",
        container="docker",
    )
    cfg = finalize.image_config(
        settings,
        architecture="amd64",
        diff_ids=["sha256:" + "a" * 64],
        history=[],
        created="2026-01-01T00:00:00Z",
        labels={"io.sysbake.stage.bootstrap": "k"},
    )
    c = cfg["config"]
    assert isinstance(c, dict)
    assert c["Cmd"] == ["/lib/systemd/systemd"]
    assert c["StopSignal"] == "SIGRTMIN+3"
    assert "container=docker" in c["Env"] and "LANG=C.UTF-8" in c["Env"]
    assert any(e.startswith("PATH=") for e in c["Env"])
    assert c["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/srv": {}}
    assert c["Labels"]["io.sysbake.stage.bootstrap"] == "k"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]}


# Every directory that clean_tree and make_container_ready touch, as a hostile image may
# make it: a symlink to a host directory (absolute, or climbing out with ..).
_TOUCHED = (
    "var/log",
    "var/log/journal",
    "var/lib/apt/lists",
    "var/lib/apt/lists/partial",
    "var/cache/apt",
    "var/cache/apt/archives",
    "var/cache/debconf",
    "etc/ssh",
    "tmp",
    "var/tmp",
    "etc/salt",
    "etc/salt/pki",
    "var/cache/salt",
    "var/lib/dbus",
    "root",
    "var/lib/systemd",
    "var/lib/systemd/timers",
    "dev",
    "etc/systemd",
    "etc/systemd/system",
    "etc/systemd/system-generators",
    "etc",
)


def _host_files(host: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(host)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(host.rglob("*"))
    }


def _plant(host: Path) -> None:
    names = (
        "machine-id",
        "hostname",
        "resolv.conf",
        "x.deb",
        "pkgcache.bin",
        "ssh_host_key",
        "wtmp",
        "history.log",
        "random-seed",
        "stamp-x",
        ".bash_history",
        "deb_Packages",
        "minion.pem",
        "hosts",
        "sysbake-ssh-host-keys.service",
        "null",
        "x-old",
    )
    for name in names:
        (host / name).write_bytes(b"host file " + name.encode())
    (host / "journal").mkdir(exist_ok=True)
    (host / "journal" / "0123").mkdir(exist_ok=True)


def test_clean_and_ready_never_touch_host_files_through_image_symlinks(tmp_path: Path) -> None:
    host = tmp_path / "host"
    host.mkdir()
    _plant(host)
    before = _host_files(host)
    for i, touched in enumerate(_TOUCHED):
        root = tmp_path / f"img{i}"
        _tree(root)
        target = root / touched
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        # Absolute for even ones, climbing out for odd ones.
        depth = touched.count("/") + 1 + len(root.parts) + 3
        link = str(host) if i % 2 == 0 else "../" * depth + str(host).lstrip("/")
        target.symlink_to(link)
        with Root(root) as r:
            finalize.make_container_ready(r, Cleanup(remove=("/etc/*", "/var/log/*")))
            finalize.clean_tree(r, Cleanup(remove=("/etc/*", "/var/log/*")))
        assert _host_files(host) == before, touched


def test_clean_tree_never_opens_an_image_device_or_fifo(tmp_path: Path) -> None:
    root = _tree(tmp_path / "img")
    (root / "etc/machine-id").unlink()
    os.mkfifo(root / "etc/machine-id")  # opening it for writing would block
    os.mkfifo(root / "var/log/wtmp.fifo")
    try:
        finalize.clean_tree(Root(root), Cleanup())
    except Exception as exc:  # one clear error naming the path is fine; a hang is not
        assert "etc/machine-id" in str(exc)
    assert (root / "var/log/wtmp.fifo").exists()  # not a log of ours: left alone
