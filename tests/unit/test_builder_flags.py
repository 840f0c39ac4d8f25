"""The builder container's flags without a host: the capability set, the flags over every
combination of host facts, the seccomp and AppArmor profiles, the `flags --builder` and
`apparmor --builder` command lines, the builder project and its entrypoint, and the CI
examples (parsed as YAML; the Kubernetes securityContext is what the flags say)."""

from __future__ import annotations

import io
import itertools
import json
import subprocess
from collections.abc import Callable
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]

from sysbake import cli
from sysbake import engines as hostint
from sysbake.cgroups import CgroupMode
from sysbake.engines import HostError, HostFacts, select_builder_flags
from sysbake.project.load import ScriptStep, load_project
from sysbake.runtime.bundle import CAPABILITIES

REPO = Path(__file__).resolve().parents[2]
CI = REPO / "examples" / "ci"
PROFILE = Path("/etc/sysbake/builder-seccomp.json")
# What this kind of host (hybrid cgroups, no AppArmor) gets, spelled out once.
CAPS = (
    "AUDIT_WRITE CHOWN DAC_OVERRIDE FOWNER FSETID KILL MKNOD NET_ADMIN NET_BIND_SERVICE "
    "NET_RAW SETFCAP SETGID SETPCAP SETUID SYS_ADMIN SYS_CHROOT"
)
KNOWN_GOOD = {
    "docker": "--cgroupns=private --cap-drop=ALL "
    + " ".join(f"--cap-add={c}" for c in CAPS.split())
    + f" --security-opt seccomp={PROFILE}",
    "podman": "--cgroupns=private --cap-drop=ALL "
    + " ".join(f"--cap-add={c}" for c in CAPS.split())
    + " --runtime=runc",
}


def _pairs(flags: tuple[str, ...], name: str) -> list[str]:
    return [flags[i + 1] for i, f in enumerate(flags[:-1]) if f == name]


def _cli(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = cli.main(list(argv))
    return code, out.getvalue()


# -- capabilities and flags ------------------------------------------------------------------


def test_capabilities_are_the_booted_images_set_plus_two() -> None:
    booted = {c.removeprefix("CAP_") for c in CAPABILITIES}
    caps = hostint.builder_capabilities()
    assert list(caps) == sorted(caps)
    assert set(caps) - booted == {"SYS_ADMIN", "NET_ADMIN"}
    assert booted <= set(caps)
    assert " ".join(caps) == CAPS


@pytest.mark.parametrize("engine", hostint.ENGINES)
def test_known_good_set_for_this_kind_of_host(engine: hostint.Engine) -> None:
    host = HostFacts(cgroup_mode="hybrid", cap_sys_resource=False)
    assert select_builder_flags(engine, host).line() == KNOWN_GOOD[engine]


def _check(engine: hostint.Engine, host: HostFacts) -> None:
    chosen = select_builder_flags(engine, host, Path("/x/seccomp.json"))
    flags, notes = chosen.flags, " ".join(chosen.notes)
    assert flags[:2] == ("--cgroupns=private", "--cap-drop=ALL")
    adds = [f.removeprefix("--cap-add=") for f in flags if f.startswith("--cap-add=")]
    assert adds == list(hostint.builder_capabilities())
    assert not any(f.startswith(("--privileged", "--device", "-v", "--network")) for f in flags)
    opts = _pairs(flags, "--security-opt")
    seccomp = ["seccomp=/x/seccomp.json"] if engine == "docker" else []
    apparmor = ["apparmor=sysbake-builder"] if host.apparmor else []
    assert opts == seccomp + apparmor
    assert ("--runtime=runc" in flags) == (engine == "podman" and host.cgroup_mode == "hybrid")
    assert ("sysbake apparmor --builder --install" in notes) == (
        host.apparmor and not host.builder_profile_loaded
    )
    assert ("rootful engine" in notes) == host.rootless
    assert ("default_ulimits" in notes) == (engine == "podman" and not host.cap_sys_resource)


@pytest.mark.parametrize("engine", hostint.ENGINES)
@pytest.mark.parametrize("mode", ["v1", "hybrid", "v2"])
def test_builder_flags_for_every_host(engine: hostint.Engine, mode: CgroupMode) -> None:
    for rootless, apparmor, loaded, capres in itertools.product((False, True), repeat=4):
        host = HostFacts(
            cgroup_mode=mode,
            rootless=rootless,
            apparmor=apparmor,
            builder_profile_loaded=loaded,
            cap_sys_resource=capres,
        )
        try:
            _check(engine, host)
        except AssertionError as exc:
            raise AssertionError(f"{engine} {host}: {exc}") from exc


def test_unknown_engine() -> None:
    with pytest.raises(HostError, match="unknown engine 'lxc'"):
        select_builder_flags("lxc", HostFacts(cgroup_mode="v2"))  # type: ignore[arg-type]


def test_loaded_builder_profile_is_detected(tmp_path: Path) -> None:
    params = tmp_path / "sys/module/apparmor/parameters"
    params.mkdir(parents=True)
    (params / "enabled").write_text("Y\n")
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(
        "35 25 0:30 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n"
    )
    (tmp_path / "proc/self/status").write_text("CapEff:\t0\n")
    # No securityfs (as inside a container): whether it is loaded cannot be known.
    assert hostint.detect_host(tmp_path, euid=0).builder_profile_loaded
    listing = tmp_path / "sys/kernel/security/apparmor/profiles"
    listing.parent.mkdir(parents=True)
    listing.write_text("sysbake-systemd (enforce)\n")
    assert not hostint.detect_host(tmp_path, euid=0).builder_profile_loaded
    listing.write_text("sysbake-systemd (enforce)\nsysbake-builder (enforce)\n")
    facts = hostint.detect_host(tmp_path, euid=0)
    assert facts.builder_profile_loaded and facts.apparmor_profile_loaded


# -- the seccomp profile ---------------------------------------------------------------------

# What the builder does: mmdebstrap, overlay mounts, runc (namespaces, pivot_root).
NEEDED = (
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "mknod",
    "mknodat",
    "setns",
    "sethostname",
    "unshare",
    "clone",
    "fsopen",
    "open_tree",
    "move_mount",
)


def _rules() -> list[dict[str, Any]]:
    profile = hostint.builder_seccomp_profile()
    assert profile["defaultAction"] == "SCMP_ACT_ALLOW"
    return list(profile["syscalls"])


def test_seccomp_refuses_what_no_build_needs() -> None:
    refused = {n for rule in _rules() if "args" not in rule for n in rule["names"]}
    for name in ("kexec_load", "init_module", "finit_module", "bpf", "keyctl", "swapon"):
        assert name in refused
    assert "open_by_handle_at" in refused  # reading host files by handle
    assert not refused & set(NEEDED)


def test_seccomp_refuses_user_namespaces_only() -> None:
    (rule,) = [r for r in _rules() if "args" in r]
    assert set(rule["names"]) == {"clone", "unshare"}
    assert rule["args"] == [
        {"index": 0, "value": 0x10000000, "valueTwo": 0x10000000, "op": "SCMP_CMP_MASKED_EQ"}
    ]
    assert rule["action"] == "SCMP_ACT_ERRNO" and rule["errnoRet"] == 1


def test_seccomp_clone3_looks_missing() -> None:
    # ENOSYS makes the C library fall back to clone, whose flags a filter can read.
    (rule,) = [r for r in _rules() if "clone3" in r["names"]]
    assert rule == {"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}


def test_seccomp_json_is_the_profile() -> None:
    assert json.loads(hostint.builder_seccomp_json()) == hostint.builder_seccomp_profile()
    code, out = _cli("flags", "--builder", "docker", "--seccomp-json")
    assert code == 0 and json.loads(out) == hostint.builder_seccomp_profile()


# -- the command lines -----------------------------------------------------------------------


def test_cli_builder_flags_name_the_profile(tmp_path: Path) -> None:
    profile = tmp_path / "seccomp.json"
    code, out = _cli("flags", "--builder", "docker", "--seccomp-profile", str(profile), "--json")
    assert code == 0
    expected = select_builder_flags("docker", hostint.detect_host(), profile)
    assert json.loads(out) == list(expected.flags)
    code, out = _cli("flags", "--builder", "podman")
    assert code == 0 and out.split() == list(
        select_builder_flags("podman", hostint.detect_host()).flags
    )


def test_cli_builder_flags_refuse_an_image(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["flags", "--builder", "docker", "web:1"]) == 2
    assert capsys.readouterr().err.strip() == (
        "sysbake: error: flags --builder: the builder's flags do not depend on an image "
        "(got 'web:1')"
    )
    assert cli.main(["flags", "docker", "--seccomp-json"]) == 2
    assert "--seccomp-json goes with --builder" in capsys.readouterr().err


def test_builder_apparmor_profile(tmp_path: Path) -> None:
    text = hostint.apparmor_profile(builder=True)
    assert "profile sysbake-builder flags=(attach_disconnected,mediate_deleted) {" in text
    assert text.count("{") == text.count("}")
    for rule in ("  mount,", "  pivot_root,", "  remount,", "  umount,"):
        assert rule in text.splitlines()
    assert "deny /sys/firmware/** rwklx," in text  # the systemd profile's denies, shared
    assert "deny mount fstype=(debugfs," in text
    code, out = _cli("apparmor", "--builder")
    assert code == 0 and out == text
    assert cli.main(["apparmor", "--builder", "-o", str(tmp_path / "p")]) == 0
    assert (tmp_path / "p").read_text() == text
    assert hostint.apparmor_profile() != text


def test_builder_apparmor_install_refuses_without_apparmor(tmp_path: Path) -> None:
    target = tmp_path / "sysbake-builder"
    with pytest.raises(HostError, match="cannot load profile sysbake-builder"):
        hostint.install_profile(HostFacts(cgroup_mode="v2"), target, builder=True)
    assert not target.exists()


# -- the builder project and its entrypoint ---------------------------------------------------


def test_builder_project_shares_the_example_base() -> None:
    (builder,) = load_project(REPO / "builder").images
    base = next(i for i in load_project(REPO / "examples" / "web").images if i.name == "base")
    assert builder.bootstrap is not None and base.bootstrap is not None
    # Same bootstrap stage key inputs: a store or cache holding one reuses it for the other.
    assert builder.bootstrap.key_inputs() == base.bootstrap.key_inputs()
    assert builder.finalize.key_inputs() == base.finalize.key_inputs()
    config = builder.config
    assert config.entrypoint == ("/usr/bin/tini", "--", "/usr/local/bin/sysbake")
    assert (config.workdir, config.volumes, config.container) == (
        "/src",
        ("/var/lib/sysbake",),
        "oci",
    )


def test_entrypoint_is_valid_shell() -> None:
    entrypoint = REPO / "builder" / "entrypoint"
    assert entrypoint.stat().st_mode & 0o111
    assert subprocess.run(["sh", "-n", str(entrypoint)], check=False).returncode == 0


# -- the CI examples ---------------------------------------------------------------------------


def _yaml(name: str) -> dict[Any, Any]:
    doc = yaml.safe_load((CI / name).read_text())
    assert isinstance(doc, dict)
    return doc


def _docker_security_context(host: HostFacts) -> dict[str, Any]:
    """What the docker flags of `host` say, in a Kubernetes securityContext's terms."""
    flags = select_builder_flags("docker", host).flags
    caps = [f.removeprefix("--cap-add=") for f in flags if f.startswith("--cap-add=")]
    opts = dict(o.split("=", 1) for o in _pairs(flags, "--security-opt"))
    return {"drop": ["ALL"] if "--cap-drop=ALL" in flags else [], "add": caps, **opts}


def test_k8s_job_security_context_is_the_flags() -> None:
    job = _yaml("k8s-job.yaml")
    assert (job["apiVersion"], job["kind"]) == ("batch/v1", "Job")
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    (builder,) = pod["containers"]
    context = builder["securityContext"]
    # Kubernetes nodes: cgroup v2, AppArmor with the builder's profile loaded.
    flags = _docker_security_context(
        HostFacts(cgroup_mode="v2", apparmor=True, builder_profile_loaded=True)
    )
    assert context["capabilities"] == {"drop": flags["drop"], "add": flags["add"]}
    assert flags["apparmor"] == context["appArmorProfile"]["localhostProfile"]
    assert context["appArmorProfile"]["type"] == "Localhost"
    assert context["seccompProfile"] == {
        "type": "Localhost",
        "localhostProfile": "sysbake-builder.json",
    }
    assert context["privileged"] is False and context["runAsUser"] == 0
    assert context["allowPrivilegeEscalation"] is True  # required with CAP_SYS_ADMIN
    mounts = {m["mountPath"]: m["name"] for m in builder["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    store = volumes[mounts["/var/lib/sysbake"]]
    assert "emptyDir" in store or "persistentVolumeClaim" in store
    assert builder["workingDir"] == "/src" and "/src" in mounts
    assert builder["command"][:2] == ["/usr/bin/tini", "--"]
    _valid_shell(builder["args"][-1])


def _valid_shell(script: str) -> None:
    checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert checked.returncode == 0, checked.stderr


def _uses_the_printed_flags(script: str) -> None:
    """The script writes the builder's seccomp profile, has the builder print its flags
    naming that file, and runs the builder with them."""
    script = " ".join(script.replace("\\\n", " ").split())
    assert "flags --builder docker --seccomp-json >" in script
    assert "flags --builder docker" in script and "--seccomp-profile" in script
    assert "apparmor --builder | sudo apparmor_parser -r" in script
    assert "-v sysbake-store" in script or '-v "sysbake-store' in script


def test_github_actions_workflow() -> None:
    workflow = _yaml("github-actions.yml")
    assert workflow.get(True) or workflow.get("on")  # YAML 1.1 reads the `on` key as true
    (job,) = workflow["jobs"].values()
    scripts = [step["run"] for step in job["steps"] if "run" in step]
    for script in scripts:
        _valid_shell(script)
    _uses_the_printed_flags("\n".join(scripts))
    assert any("docker run --rm $BUILDER_FLAGS" in s for s in scripts)


def test_gitlab_ci_job() -> None:
    pipeline = _yaml("gitlab-ci.yml")
    script = "\n".join(pipeline["images"]["script"])
    _valid_shell(script)
    _uses_the_printed_flags(script)
    assert "docker run --rm $flags" in script


# Debian's name of a PyPI distribution, where it is not python3-<name in lower case>.
DEBIAN_NAMES = {"pynacl": "python3-nacl"}


def test_builder_installs_every_dependency_from_debian() -> None:
    # The builder installs sysbake offline: each dependency must come from Debian.
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (builder,) = load_project(REPO / "builder").images
    (tools,) = [s for s in builder.provision if isinstance(s, ScriptStep) and s.name == "tools"]
    packages = set(tools.body().decode().split())
    for requirement in project.get("dependencies", []):
        name = re.split(r"[^A-Za-z0-9._-]", requirement, maxsplit=1)[0].lower()
        assert DEBIAN_NAMES.get(name, f"python3-{name}") in packages, requirement


def test_no_eatmydata_hooks_without_dpkg_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # mmdebstrap's eatmydata hooks run dpkg-architecture (dpkg-dev), which the builder lacks.
    from sysbake import proc
    from sysbake.build import bootstrap

    hooks = tmp_path / "hooks"
    hooks.mkdir()
    monkeypatch.setattr(bootstrap, "EATMYDATA_HOOKS", hooks)
    plan = bootstrap.BootstrapPlan(
        suite="bookworm",
        variant="minbase",
        architecture="amd64",
        components=("main",),
        packages=("systemd",),
        sources=("deb http://m.invalid/debian bookworm main",),
        keyring="",
        snapshot="",
        hooks=(),
    )

    def without(tool: str) -> Callable[[str], str | None]:
        return lambda program: None if program == tool else f"/usr/bin/{program}"

    for missing, used in (("nothing", True), ("dpkg-architecture", False)):
        monkeypatch.setattr(proc, "which", without(missing))
        cmd = bootstrap.mmdebstrap_command(plan, tmp_path / "root", tmp_path / "debs")
        assert (f"--hook-dir={hooks}" in cmd) == used, missing


def test_runc_joins_no_new_keyring_in_a_container(monkeypatch: pytest.MonkeyPatch) -> None:
    # docker's seccomp profile (and the builder's) refuses keyctl: runc in the builder must
    # not make a session keyring per image.
    from sysbake.runtime import monitor

    monkeypatch.delenv("container", raising=False)
    assert monitor._keyring_flags() == []
    monkeypatch.setenv("container", "oci")
    assert monitor._keyring_flags() == ["--no-new-keyring"]
