"""config.json generation and the other pure parts of the runtime (no root, no runc)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from sysbake import imagetest as checks
from sysbake.errors import RuntimeFailure
from sysbake.rootfs import Root
from sysbake.runtime import bundle, overlay
from sysbake.runtime import containers as runtime
from sysbake.runtime.bundle import BindMount, BundleSpec, ProcessSpec

SYSTEMD_IMAGE: dict[str, Any] = {
    "config": {
        "Cmd": ["/lib/systemd/systemd"],
        "StopSignal": "SIGRTMIN+3",
        "Env": ["container=docker", "LANG=C.UTF-8"],
    }
}


def _config(**kw: Any) -> dict[str, Any]:
    process = bundle.process_from_image(SYSTEMD_IMAGE, init=None, container_uuid="ab" * 16)
    spec = BundleSpec(**({"hostname": "web", "process": process} | kw))
    return bundle.runtime_config(spec)


def _mount(config: dict[str, Any], dest: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in config["mounts"] if m["destination"] == dest]
    assert len(found) == 1, dest
    return found[0]


def test_config_follows_the_systemd_container_interface() -> None:
    config = _config()
    assert config["process"]["args"] == ["/lib/systemd/systemd"]
    env = config["process"]["env"]
    assert "container=docker" in env  # the image's value wins over the default
    assert f"container_uuid={'ab' * 16}" in env
    assert "LANG=C.UTF-8" in env and any(e.startswith("PATH=") for e in env)
    for dest in ("/run", "/run/lock", "/tmp"):
        assert _mount(config, dest)["type"] == "tmpfs"
    cgroup = _mount(config, "/sys/fs/cgroup")  # a v2 host: the container's subtree
    assert cgroup["type"] == "cgroup" and "rw" in cgroup["options"]
    assert "/sys/fs/cgroup/systemd" not in [m["destination"] for m in config["mounts"]]
    kinds = [ns["type"] for ns in config["linux"]["namespaces"]]
    assert sorted(kinds) == ["cgroup", "ipc", "mount", "network", "pid", "uts"]
    assert config["hostname"] == "web"
    assert config["process"]["terminal"] is True
    assert config["root"] == {"path": "rootfs", "readonly": False}


def test_config_is_never_privileged_and_has_no_rlimits() -> None:
    config = _config()
    caps = config["process"]["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for kind in caps.values():
        assert "CAP_SYS_ADMIN" not in kind and "CAP_SYS_MODULE" not in kind
        assert "CAP_NET_ADMIN" not in kind and "CAP_SYS_RESOURCE" not in kind
        assert set(kind) == set(bundle.CAPABILITIES)
    assert "rlimits" not in config["process"]
    assert config["linux"]["resources"]["devices"] == [{"allow": False, "access": "rwm"}]
    assert "/proc/kcore" in config["linux"]["maskedPaths"]
    assert "/proc/sys" in config["linux"]["readonlyPaths"]
    sysfs = _mount(config, "/sys")
    assert "ro" in sysfs["options"]


def test_host_network_keeps_the_host_namespace() -> None:
    kinds = [ns["type"] for ns in _config(network="host")["linux"]["namespaces"]]
    assert "network" not in kinds and "uts" in kinds and "cgroup" in kinds
    with pytest.raises(RuntimeFailure, match="unknown network mode 'bridge'"):
        _config(network="bridge")


def test_bind_mounts_and_cgroups_path() -> None:
    config = _config(
        binds=(BindMount("/srv/data", "/data", readonly=True), BindMount("/srv/rw", "/rw")),
        cgroups_path="sysbake/web.1234",
    )
    ro = _mount(config, "/data")
    assert ro["type"] == "bind" and ro["source"] == "/srv/data" and "ro" in ro["options"]
    assert "ro" not in _mount(config, "/rw")["options"]
    assert config["linux"]["cgroupsPath"] == "sysbake/web.1234"
    # Binds come after the tmpfs mounts, so a bind below /run or /tmp stays visible.
    dests = [m["destination"] for m in config["mounts"]]
    assert dests.index("/data") > dests.index("/tmp")


def test_parse_volume() -> None:
    assert bundle.parse_volume("/a:/b") == BindMount("/a", "/b", False)
    assert bundle.parse_volume("/a:/b/:ro") == BindMount("/a", "/b", True)
    assert bundle.parse_volume("/a:/b:rw") == BindMount("/a", "/b", False)
    for bad in ("/a", "/a:/b:rx", "a:/b", "/a:b", "/a:/b/../c", ":/b", "/a:/b:ro:x"):
        with pytest.raises(RuntimeFailure, match="-v"):
            bundle.parse_volume(bad)


def test_process_from_image() -> None:
    image = {
        "config": {
            "Entrypoint": ["/usr/bin/tini", "--"],
            "Cmd": ["app"],
            "WorkingDir": "/srv",
            "User": "1000:1001",
        }
    }
    proc = bundle.process_from_image(
        image, init="/sbin/init", container_uuid="u", env=["A=1", "container=mine"]
    )
    assert proc.args == ("/usr/bin/tini", "--", "app")
    assert (proc.cwd, proc.uid, proc.gid) == ("/srv", 1000, 1001)
    assert "container=mine" in proc.env and "A=1" in proc.env
    replaced = bundle.process_from_image(
        image, init=None, container_uuid="u", command=["sh", "-c", "exit 3"]
    )
    assert replaced.args == ("/usr/bin/tini", "--", "sh", "-c", "exit 3")
    bare = bundle.process_from_image({"config": {}}, init="/sbin/init", container_uuid="u")
    assert bare.args == ("/sbin/init",) and "container=oci" in bare.env
    assert bare == ProcessSpec(bare.args, bare.env, "/", 0, 0)
    with pytest.raises(RuntimeFailure, match="no Entrypoint/Cmd and no init"):
        bundle.process_from_image({}, init=None, container_uuid="u")
    with pytest.raises(RuntimeFailure, match="User 'www-data'"):
        bundle.process_from_image(
            {"config": {"User": "www-data", "Cmd": ["x"]}}, init=None, container_uuid="u"
        )
    with pytest.raises(RuntimeFailure, match="KEY=VALUE"):
        bundle.process_from_image(SYSTEMD_IMAGE, init=None, container_uuid="u", env=["A"])


def test_names() -> None:
    assert bundle.check_name("web-1.a_b") == "web-1.a_b"
    for bad in ("", "-x", "a/b", "a b", "x" * 64, "..", "é"):
        with pytest.raises(RuntimeFailure, match="invalid container name"):
            bundle.check_name(bad)
    assert bundle.hostname_for("web_1") == "web-1"


def test_v1_controllers_are_read_only_and_name_systemd_writable() -> None:
    path = "/sys/fs/cgroup/systemd/user.slice/sysbake/web.1234"
    config = _config(cgroups_path="sysbake/web.1234", systemd_cgroup=path)
    mounts = [m["destination"] for m in config["mounts"]]
    assert "ro" in _mount(config, "/sys/fs/cgroup")["options"]
    writable = _mount(config, "/sys/fs/cgroup/systemd")
    assert writable["type"] == "bind" and writable["source"] == path
    assert "ro" not in writable["options"]
    assert mounts.index("/sys/fs/cgroup/systemd") == mounts.index("/sys/fs/cgroup") + 1


def test_lowerdir_option_puts_the_top_layer_first(tmp_path: Path) -> None:
    assert overlay.lowerdir_option([Path("/l/bottom"), Path("/l/top")]) == "/l/top:/l/bottom"
    with pytest.raises(RuntimeFailure, match="too many"):
        overlay.lowerdir_option([Path(f"/store/trees/{i:064x}") for i in range(60)])
    with pytest.raises(RuntimeFailure, match="contains ':'"):
        overlay.lowerdir_option([Path("/a:b")])
    with pytest.raises(RuntimeFailure, match="at least one"):
        overlay.lowerdir_option([])


def test_find_init_follows_symlinks_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "usr/lib/systemd").mkdir(parents=True)
    (root / "usr/sbin").mkdir(parents=True)
    (root / "usr/lib/systemd/systemd").write_text("")
    os.symlink("usr/lib", root / "lib")
    os.symlink("usr/sbin", root / "sbin")
    os.symlink("/lib/systemd/systemd", root / "usr/sbin/init")
    with Root(root) as r:
        assert r.resolve("/sbin/init") == "usr/lib/systemd/systemd"
        assert runtime.find_init(r) == "/lib/systemd/systemd"
        # An absolute link must not escape to the host's file of the same name.
        os.symlink("/etc/hostname", root / "escape")
        assert not r.exists("/escape")
        os.symlink("loop", root / "loop")
        assert not r.exists("/loop")
        (root / "usr/lib/systemd/systemd").unlink()
        assert runtime.find_init(r) is None
        # Nor does a host file of the name of an init count.
        (root / "usr/lib/systemd").rmdir()
        os.symlink("/bin", root / "usr/lib/systemd")  # the host has /bin/systemd? never asked
        assert runtime.find_init(r) is None


def test_test_report_verdicts() -> None:
    ok = checks.TestReport(
        image="i",
        container="c",
        state="running",
        boot_seconds=1.0,
        checks=(checks.CheckResult("stop", True, "exit 0"),),
    )
    assert ok.passed and ok.summary().endswith("PASSED")
    assert "ok    systemd: running, 0 failed units" in ok.summary()
    degraded = checks.TestReport(
        image="i",
        container="c",
        state="degraded",
        boot_seconds=1.0,
        failed_units=(checks.FailedUnit("x.service", ("line 1", "line 2")),),
    )
    assert not degraded.passed
    text = degraded.summary()
    assert "FAIL  unit x.service failed" in text and "          line 2" in text
    assert degraded.to_json()["failed_units"] == [
        {"unit": "x.service", "journal": ["line 1", "line 2"]}
    ]
    failed_check = checks.TestReport(
        image="i",
        container="c",
        state="running",
        checks=(checks.CheckResult("port 80", False, "no"),),
    )
    assert not failed_check.passed and "FAIL  port 80: no" in failed_check.summary()
    nosd = checks.TestReport(image="i", container="c", state="no-systemd", error="no init")
    assert not nosd.passed and nosd.to_json()["error"] == "no init"


def test_the_journal_is_volatile_only_where_the_image_keeps_one() -> None:
    assert _mount(_config(volatile_journal=True), "/var/log/journal")["type"] == "tmpfs"
    # Without the directory in the image, a mount point would be created in the upper dir.
    assert "/var/log/journal" not in [m["destination"] for m in _config()["mounts"]]


def test_a_layer_given_twice_is_mounted_once_at_its_topmost_place() -> None:
    # Two steps that change nothing give the same layer: overlayfs refuses a dir twice.
    a, b = Path("/store/trees/a"), Path("/store/trees/b")
    assert overlay.lowerdir_option([a, b, a]) == "/store/trees/a:/store/trees/b"
    assert overlay.lowerdir_option([b, a, a]) == "/store/trees/a:/store/trees/b"
