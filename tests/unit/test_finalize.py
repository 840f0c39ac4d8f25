import os
from pathlib import Path

from sysbake import finalize
from sysbake.finalize import Cleanup, OciSettings


def _tree(root: Path) -> Path:
    for d in ("etc/ssh", "var/lib/apt/lists/partial", "var/cache/apt/archives/partial",
              "var/log/apt", "tmp", "var/tmp", "dev", "var/lib/dbus", "etc/salt/pki"):
        (root / d).mkdir(parents=True, exist_ok=True)
    files = {
        "etc/machine-id": "abc\n", "var/lib/dbus/machine-id": "abc\n",
        "etc/ssh/ssh_host_rsa_key": "k", "etc/ssh/ssh_host_rsa_key.pub": "k",
        "etc/ssh/sshd_config": "cfg", "var/lib/apt/lists/deb_Packages": "p",
        "var/lib/apt/lists/lock": "", "var/cache/apt/archives/x.deb": "d",
        "var/cache/apt/pkgcache.bin": "b", "var/log/apt/history.log": "h",
        "var/log/wtmp": "w", "tmp/junk": "j", "var/tmp/junk": "j", "etc/resolv.conf": "ns 1",
        "etc/hostname": "buildhost", "etc/salt/pki/minion.pem": "secret",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    return root


def test_clean_tree_removes_caches_keys_and_identity(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    finalize.clean_tree(root, Cleanup(remove=("/etc/ssh/sshd_config",)))
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
    finalize.clean_tree(root, Cleanup(ssh_host_keys=False, logs=False, machine_id=False))
    assert (root / "etc/ssh/ssh_host_rsa_key").exists()
    assert (root / "var/log/apt/history.log").exists()
    assert (root / "etc/machine-id").read_text() == "abc\n"


def test_container_ready_masks_units_and_neutralises_host_files(tmp_path: Path) -> None:
    root = _tree(tmp_path)
    (root / "dev/null").write_text("")  # stands in for a device node
    cleanup = Cleanup(mask=("foo.service", "systemd-fstab-generator"),
                      unmask=("systemd-logind.service", "systemd-gpt-auto-generator"))
    finalize.make_container_ready(root, cleanup)
    finalize.make_container_ready(root, cleanup)  # idempotent
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
    settings = OciSettings(env=(("LANG", "C.UTF-8"),), ports=("80", "53/udp"),
                           volumes=("/srv",), stop_signal="37", container="docker")
    cfg = finalize.image_config(settings, architecture="amd64", diff_ids=["sha256:" + "a" * 64],
                                history=[], created="2026-01-01T00:00:00Z",
                                labels={"io.sysbake.stage.bootstrap": "k"})
    c = cfg["config"]
    assert c["Cmd"] == ["/lib/systemd/systemd"]
    assert c["StopSignal"] == "SIGRTMIN+3"
    assert "container=docker" in c["Env"] and "LANG=C.UTF-8" in c["Env"]
    assert any(e.startswith("PATH=") for e in c["Env"])
    assert c["ExposedPorts"] == {"80/tcp": {}, "53/udp": {}}
    assert c["Volumes"] == {"/srv": {}}
    assert c["Labels"]["io.sysbake.stage.bootstrap"] == "k"
    assert cfg["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]}


def test_signal_names() -> None:
    assert finalize.signal_name("SIGRTMIN+3") == "SIGRTMIN+3"
    assert finalize.signal_name("term") == "SIGTERM"
    assert finalize.signal_name(15) == "SIGTERM"
