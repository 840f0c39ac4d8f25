"""Issue: daemonless runtime with systemd as PID 1, the container commands and `sysbake test`.

Every test checks that what it started is gone afterwards: no mount, runtime state,
cgroup, monitor or container process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SYSBAKE, sysbake
from runtime_fixtures import ECHO_PORT, RuntimeImages, runtime_images

from sysbake import cgroups
from sysbake import imagetest as checks
from sysbake.oci.store import Store
from sysbake.project.load import TestSpec
from sysbake.runtime import containers as runtime

__all__ = ["runtime_images"]  # the session fixture, imported so pytest finds it

pytestmark = pytest.mark.integration
RUNC_ROOT = "/run/sysbake/runc"


def cli(
    images: RuntimeImages, *args: str, check: bool = True, timeout: float = 180, **kw: object
) -> subprocess.CompletedProcess[str]:
    return sysbake(*args, store=images.store, check=check, timeout=timeout, **kw)


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:6]}"


def runc_ids() -> set[str]:
    out = subprocess.run(
        ["runc", "--root", RUNC_ROOT, "list", "--format", "json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {c["id"] for c in json.loads(out or "null") or []}


def cgroup_dirs(runtime_id: str) -> list[str]:
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        found += [os.path.join(top, d) for d in dirs if d == runtime_id]
    return found


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()):
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has ended: only its parent has yet to collect it)."""
    stat = _read(Path(f"/proc/{pid}/stat"))
    return bool(stat) and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


class Running:
    """What a test records about a running container to check its removal later."""

    def __init__(self, images: RuntimeImages, name: str) -> None:
        state = json.loads((images.containers / name / "state.json").read_text())
        self.name = name
        self.dir = images.containers / name
        self.runtime_id: str = state["runtime_id"]
        self.pid: int = state["pid"]
        self.monitor = int((self.dir / "monitor.pid").read_text())
        assert _alive(self.monitor), "the container has no monitor"
        assert self.runtime_id in runc_ids()
        assert cgroup_dirs(self.runtime_id), "the container has no cgroup of its own"

    def wait_for_process(self, cmdline: str) -> None:
        """Until a process whose command line has `cmdline` runs in the container."""
        deadline = time.monotonic() + 30
        while not [
            p
            for p in processes_mentioning(cmdline)
            if self.runtime_id in _read(Path(f"/proc/{p}/cgroup"))
        ]:
            assert time.monotonic() < deadline, f"{cmdline!r} never started in {self.name}"
            time.sleep(0.1)

    def leftovers(self) -> list[str]:
        problems = []
        if str(self.dir) in Path("/proc/mounts").read_text():
            problems.append("a mount")
        if self.runtime_id in runc_ids():
            problems.append("runc state")
        if cgroup_dirs(self.runtime_id):
            problems.append(f"cgroups {cgroup_dirs(self.runtime_id)}")
        if Path(f"/proc/{self.pid}").exists():
            problems.append(f"PID 1 ({self.pid})")
        if _alive(self.monitor):
            problems.append(f"the monitor ({self.monitor})")
        if processes_mentioning(str(self.dir)):
            problems.append("a process naming the container's directory")
        return problems


def wait_booted(images: RuntimeImages, name: str, *, started: bool = True) -> str:
    """systemd's state once booted. A container that `run -d` returned is `started`:
    systemctl must reach PID 1 at once. A foreground run's may be too young for that (no
    socket yet: systemctl prints nothing), so then this asks again."""
    deadline = time.monotonic() + 90
    while True:
        state = cli(
            images,
            "exec",
            name,
            "systemctl",
            "is-system-running",
            "--wait",
            check=False,
            timeout=90,
        ).stdout.strip()
        if state or started or time.monotonic() > deadline:
            return state
        time.sleep(0.1)


@pytest.fixture()
def images(runtime_images: RuntimeImages) -> Iterator[RuntimeImages]:
    """The test images; containers a test leaves behind are removed (and it fails)."""
    before = {c.name for c in runtime.all_containers(runtime_images.containers)}
    yield runtime_images
    left = [c for c in runtime.all_containers(runtime_images.containers) if c.name not in before]
    for container in left:
        runtime.remove(container, force=True)
    assert not left, f"containers left behind: {[c.name for c in left]}"


def test_boot_exec_stop_leaves_nothing(images: RuntimeImages) -> None:
    name = unique("boot")
    assert cli(images, "run", "-d", "--name", name, images.systemd).stdout.strip() == name
    running = Running(images, name)
    assert wait_booted(images, name) == "running"
    assert (
        cli(images, "exec", name, "systemctl", "--failed", "--plain", "--no-legend").stdout.strip()
        == ""
    )
    environ = cli(images, "exec", name, "cat", "/proc/1/environ").stdout.split("\0")
    assert "container=oci" in environ
    assert any(e.startswith("container_uuid=") and len(e) == 47 for e in environ)
    assert cli(images, "exec", name, "hostname").stdout.strip() == name
    assert name in cli(images, "exec", name, "cat", "/etc/hosts").stdout
    # --network none: a namespace of its own with only a loopback, up.
    assert cli(images, "exec", name, "ls", "/sys/class/net").stdout.split() == ["lo"]
    assert cli(images, "exec", name, "cat", "/sys/class/net/lo/flags").stdout.strip() == "0x9"
    if cgroups.host_cgroup_mode() != "v2":
        # v1/hybrid: systemd's own hierarchy is writable for it, the controllers are not.
        mountinfo = cli(images, "exec", name, "cat", "/proc/1/mountinfo").stdout
        options = {f[4]: f[5].split(",") for f in map(str.split, mountinfo.splitlines())}
        assert "rw" in options["/sys/fs/cgroup/systemd"]
        assert "ro" in options["/sys/fs/cgroup/memory"]
        units = cli(images, "exec", name, "ls", "/sys/fs/cgroup/systemd/system.slice").stdout
        assert "systemd-journald.service" in units.split()
    # Unprivileged: no CAP_SYS_ADMIN (bit 21) in PID 1's effective set.
    status = cli(images, "exec", name, "cat", "/proc/1/status").stdout
    cap_eff = int(
        next(line for line in status.splitlines() if line.startswith("CapEff:")).split()[1], 16
    )
    assert not cap_eff & (1 << 21)
    exit_code = cli(images, "exec", name, "sh", "-c", "exit 7", check=False).returncode
    assert exit_code == 7
    listed = json.loads(cli(images, "ps", "--json").stdout)
    mine = [c for c in listed if c["name"] == name]
    assert mine and mine[0]["status"] == "running" and mine[0]["pid"] == running.pid
    assert mine[0]["image"] == images.systemd
    table = cli(images, "ps").stdout.splitlines()
    header = "CONTAINER ID IMAGE COMMAND CREATED STATUS PORTS NAMES"
    assert table[0].split() == header.split()
    assert any(line.split()[-1] == name and " Up " in line for line in table[1:])
    journal = cli(images, "logs", name, "-n", "50").stdout
    assert "Startup finished" in journal or "Reached target" in journal

    stopped = cli(images, "stop", name)
    assert f"{name}: stopped (exit code 0)" in stopped.stdout
    assert "killing" not in stopped.stderr
    assert running.leftovers() == []
    console = (running.dir / "console.log").read_bytes()
    assert b"Reached target" in console and b"Exiting container" in console
    after = json.loads(cli(images, "ps", "--all", "--json").stdout)
    assert [c["status"] for c in after if c["name"] == name] == ["exited (0)"]
    assert name not in [c["name"] for c in json.loads(cli(images, "ps", "--json").stdout)]
    assert b"Exiting container" in cli(images, "logs", name).stdout.encode()
    cli(images, "rm", name)
    assert not running.dir.exists()
    assert "no container" in cli(images, "rm", name, check=False).stderr


def test_two_containers_of_one_image(images: RuntimeImages) -> None:
    first, second = unique("twin"), unique("twin")
    cli(images, "run", "-d", "--name", first, images.systemd)
    cli(images, "run", "-d", "--name", second, images.systemd)
    running = [Running(images, first), Running(images, second)]
    assert wait_booted(images, first) == "running"
    assert wait_booted(images, second) == "running"
    cli(images, "exec", first, "sh", "-c", "echo mine > /etc/only-in-first")
    assert (
        cli(images, "exec", second, "test", "-e", "/etc/only-in-first", check=False).returncode == 1
    )
    assert (images.containers / first / "upper/etc/only-in-first").read_text() == "mine\n"
    store = Store(images.store)
    lower = store.layer_tree(store.resolve(images.systemd).layers[-1])
    assert not (lower / "etc/only-in-first").exists()
    cli(images, "rm", "-f", first)
    assert wait_booted(images, second) == "running"  # unaffected by the other's removal
    cli(images, "stop", second)
    cli(images, "rm", second)
    assert [r.leftovers() for r in running] == [[], []]


def test_harness_passes_a_clean_image(images: RuntimeImages) -> None:
    result = cli(images, "test", "--json", images.systemd)
    report = json.loads(result.stdout)
    assert report["passed"] is True and report["state"] == "running"
    assert report["failed_units"] == []
    assert report["checks"] == [
        {
            "name": "stop",
            "passed": True,
            "detail": "exit 0 after SIGRTMIN+3",
        }
    ]
    assert not (images.containers / report["container"]).exists()
    human = cli(images, "test", images.systemd)
    assert "ok    systemd: running, 0 failed units" in human.stdout
    assert human.stdout.rstrip().endswith("PASSED")


def test_harness_names_failed_units_with_their_journal(images: RuntimeImages) -> None:
    result = cli(images, "test", "--json", images.failing, check=False)
    assert result.returncode == 1
    report = json.loads(result.stdout)
    assert report["passed"] is False and report["state"] == "degraded"
    [failed] = report["failed_units"]
    assert failed["unit"] == "sysbake-fail.service"
    assert any("about to fail" in line for line in failed["journal"])
    assert report["checks"][-1]["name"] == "stop" and report["checks"][-1]["passed"]
    human = cli(images, "test", images.failing, check=False)
    assert "FAIL  unit sysbake-fail.service failed" in human.stdout
    assert human.stdout.rstrip().endswith("FAILED")


def test_harness_runs_the_image_checks(images: RuntimeImages) -> None:
    store = Store(images.store)
    good = TestSpec(
        timeout=30,
        commands=("test -S /run/systemd/notify", "true"),
        units=("sysbake-echo.socket", "dbus.service"),
        ports=(ECHO_PORT,),
    )
    report = checks.run_test(store, images.echo, good, timeout=60)
    assert report.passed, report.summary()
    assert [c.name for c in report.checks] == [
        "command: test -S /run/systemd/notify",
        "command: true",
        "unit sysbake-echo.socket",
        "unit dbus.service",
        f"port {ECHO_PORT}",
        "stop",
    ]
    bad = TestSpec(
        timeout=3,
        commands=("echo nope; exit 4",),
        units=("nosuch.service",),
        ports=(ECHO_PORT + 1,),
    )
    report = checks.run_test(store, images.echo, bad, timeout=60)
    assert not report.passed
    verdicts = {c.name: (c.passed, c.detail) for c in report.checks}
    assert verdicts["command: echo nope; exit 4"] == (False, "exit 4: nope")
    assert verdicts["unit nosuch.service"][0] is False
    assert verdicts["unit nosuch.service"][1].startswith("inactive")
    assert verdicts[f"port {ECHO_PORT + 1}"][0] is False
    assert verdicts["stop"][0] is True
    assert runtime.all_containers(images.containers) == []


def test_image_without_systemd(images: RuntimeImages) -> None:
    result = cli(images, "test", images.nosystemd, check=False)
    assert result.returncode == 1
    assert "has no systemd: neither /lib/systemd/systemd nor /sbin/init" in result.stdout
    assert runtime.all_containers(images.containers) == []
    assert str(images.containers) not in Path("/proc/mounts").read_text()
    ran = cli(images, "run", "-d", images.nosystemd, check=False)
    assert ran.returncode == 1
    assert "/lib/systemd/systemd does not exist in the image" in ran.stderr
    assert list(images.containers.iterdir()) == []


def test_bad_requests_get_one_clear_line(images: RuntimeImages) -> None:
    name = unique("clash")
    cli(images, "run", "-d", "--name", name, images.systemd)
    running = Running(images, name)
    again = cli(images, "run", "-d", "--name", name, images.systemd, check=False)
    assert again.returncode == 1
    assert again.stderr.strip() == (
        f"sysbake: error: a container named '{name}' already "
        f"exists: remove it with `sysbake rm {name}` or choose "
        "another --name"
    )
    assert wait_booted(images, name) == "running"  # the first one is untouched
    missing = cli(images, "run", "-d", "-v", "/nonexistent/src:/data", images.systemd, check=False)
    assert missing.returncode == 1
    assert "the source /nonexistent/src does not exist" in missing.stderr
    unknown = cli(images, "run", "-d", "no-such-image:1", check=False)
    assert unknown.returncode == 1 and "no image 'no-such-image:1'" in unknown.stderr
    busy = cli(images, "rm", name, check=False)
    assert busy.returncode == 1 and "is running" in busy.stderr
    cli(images, "rm", "-f", name)
    assert running.leftovers() == []
    assert list(images.containers.iterdir()) == []


def test_crun_on_this_host(images: RuntimeImages) -> None:
    result = cli(images, "run", "-d", "--runtime", "crun", images.systemd, check=False)
    if cgroups.host_cgroup_mode() == "hybrid":
        assert result.returncode == 1
        assert "crun does not support hybrid cgroups" in result.stderr
        assert list(images.containers.iterdir()) == []
    else:
        name = result.stdout.strip()
        assert result.returncode == 0 and wait_booted(images, name) == "running"
        cli(images, "rm", "-f", name)


def test_bind_mounts(images: RuntimeImages, tmp_path: Path) -> None:
    (tmp_path / "hello").write_text("from the host\n")
    name = unique("bind")
    cli(
        images,
        "run",
        "-d",
        "--name",
        name,
        "-v",
        f"{tmp_path}:/mnt/ro:ro",
        "-v",
        f"{tmp_path}:/mnt/rw",
        images.systemd,
    )
    running = Running(images, name)
    assert cli(images, "exec", name, "cat", "/mnt/ro/hello").stdout == "from the host\n"
    denied = cli(images, "exec", name, "touch", "/mnt/ro/x", check=False)
    assert denied.returncode != 0 and "Read-only file system" in denied.stderr
    cli(images, "exec", name, "touch", "/mnt/rw/y")
    assert (tmp_path / "y").exists()
    cli(images, "rm", "-f", name)
    assert running.leftovers() == []
    assert (tmp_path / "hello").exists()


def test_pid1_exiting_at_once_is_an_error_with_full_cleanup(images: RuntimeImages) -> None:
    name = unique("quick")
    result = cli(
        images, "run", "--name", name, images.systemd, "sh", "-c", "echo boom; exit 3", check=False
    )
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        == f"sysbake: error: container {name} exited immediately with code 3: boom"
    )
    assert not (images.containers / name).exists()
    assert not [i for i in runc_ids() if i.startswith(f"{name}.")]
    assert str(images.containers) not in Path("/proc/mounts").read_text()
    assert processes_mentioning(str(images.containers / name)) == []
    notfound = cli(images, "run", "--name", name, images.systemd, "no-such-command", check=False)
    assert notfound.returncode == 1
    assert 'exec: "no-such-command": executable file not found' in notfound.stderr
    assert not (images.containers / name).exists()


def test_killed_sysbake_leaves_a_manageable_container(images: RuntimeImages) -> None:
    name = unique("kill9")
    cli(images, "run", "-d", "--name", name, images.systemd)
    running = Running(images, name)
    assert wait_booted(images, name) == "running"
    exec_proc = subprocess.Popen(
        [*SYSBAKE, "--store", str(images.store), "exec", name, "sleep", "100"],
        stdin=subprocess.DEVNULL,
    )
    running.wait_for_process("sleep\0" + "100")
    exec_proc.kill()
    exec_proc.wait()
    listed = json.loads(cli(images, "ps", "--json").stdout)
    assert [c["status"] for c in listed if c["name"] == name] == ["running"]
    assert "exit code 0" in cli(images, "stop", name).stdout
    assert running.leftovers() == []
    # `runc exec` (orphaned when sysbake died) ends with its command, a moment later.
    deadline = time.monotonic() + 30  # a bound on liveness, generous for a loaded machine
    while processes_mentioning("sleep\0" + "100"):
        assert time.monotonic() < deadline, "the exec'd command outlived the container"
        time.sleep(0.1)
    cli(images, "rm", name)

    # kill -9 of a foreground `sysbake run`: the container lives on, detached.
    name = unique("fg9")
    fg = subprocess.Popen(
        [*SYSBAKE, "--store", str(images.store), "run", "--name", name, images.systemd],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not (images.containers / name / "init.pid").exists():
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert wait_booted(images, name, started=False) == "running"
    fg.kill()
    fg.wait()
    running = Running(images, name)
    assert wait_booted(images, name, started=False) == "running"
    cli(images, "rm", "-f", name)
    assert running.leftovers() == []


def test_stop_does_not_wait_on_an_exec_process_that_has_ended(images: RuntimeImages) -> None:
    """An exec'd process is not PID 1's child: its end sends PID 1 no SIGCHLD, and
    systemd-shutdown, having sent it SIGTERM, slept ~10 s before looking again."""
    name = unique("execstop")
    cli(images, "run", "-d", "--name", name, images.systemd)
    running = Running(images, name)
    assert wait_booted(images, name) == "running"
    script = 'trap "sleep 2; exit 0" TERM HUP; while :; do sleep 0.1; done'
    exec_proc = subprocess.Popen(
        [*SYSBAKE, "--store", str(images.store), "exec", name, "sh", "-c", script],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    running.wait_for_process("trap ")
    stopped = cli(images, "stop", "--timeout", "8", name)
    assert f"{name}: stopped (exit code 0)" in stopped.stdout, stopped.stderr
    assert exec_proc.wait(timeout=30) == 0  # its trap ran: SIGTERM, then exit 0
    assert running.leftovers() == []
    cli(images, "rm", name)


def test_stop_kills_a_pid1_that_ignores_the_stop_signal(images: RuntimeImages) -> None:
    name = unique("trap")
    cli(images, "run", "-d", "--name", name, images.trap)
    running = Running(images, name)
    start = time.monotonic()
    result = cli(images, "stop", "--timeout", "2", name)
    elapsed = time.monotonic() - start
    assert f"{name}: stopped (killed)" in result.stdout
    assert "did not stop within 2s" in result.stderr
    assert 2.0 <= elapsed < 20
    assert running.leftovers() == []
    listed = json.loads(cli(images, "ps", "-a", "--json").stdout)
    assert [c["exit_code"] for c in listed if c["name"] == name] == [128 + signal.SIGKILL]
    assert "trapping" in cli(images, "logs", name).stdout
    cli(images, "rm", name)


def test_foreground_run_shows_the_boot_and_ctrl_c_stops_it(images: RuntimeImages) -> None:
    name = unique("fg")
    fg = subprocess.Popen(
        [*SYSBAKE, "--store", str(images.store), "run", "--name", name, images.systemd],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 60
        while not (images.containers / name / "init.pid").exists():
            assert time.monotonic() < deadline and fg.poll() is None
            time.sleep(0.1)
        running = Running(images, name)
        assert wait_booted(images, name, started=False) == "running"
        fg.send_signal(signal.SIGINT)
        out, err = fg.communicate(timeout=60)
    finally:
        if fg.poll() is None:
            fg.kill()
    assert fg.returncode == 0, err
    assert b"Reached target" in out and b"Exiting container" in out
    assert f"stopping {name}".encode() in err
    assert not (images.containers / name).exists()
    assert running.leftovers() == []


def test_shell_runs_a_login_shell_then_removes_the_container(images: RuntimeImages) -> None:
    name = unique("shell")
    result = cli(
        images,
        "shell",
        "--name",
        name,
        images.systemd,
        check=False,
        input="echo host=$(hostname) state=$(systemctl is-system-running); exit 5\n",
    )
    assert result.returncode == 5
    assert f"host={name} state=running" in result.stdout
    assert not (images.containers / name).exists()
    assert str(images.containers) not in Path("/proc/mounts").read_text()


def test_host_network_and_env(images: RuntimeImages) -> None:
    name = unique("hostnet")
    cli(
        images,
        "run",
        "-d",
        "--name",
        name,
        "--network",
        "host",
        "-e",
        "GREETING=hi there",
        images.systemd,
    )
    running = Running(images, name)
    assert wait_booted(images, name) == "running"
    inside = set(cli(images, "exec", name, "ls", "/sys/class/net").stdout.split())
    assert inside == {p.name for p in Path("/sys/class/net").iterdir()}
    assert (
        cli(images, "exec", name, "cat", "/etc/resolv.conf").stdout
        == Path("/etc/resolv.conf").read_text()
    )
    assert cli(images, "exec", name, "hostname").stdout.strip() == name
    environ = cli(images, "exec", name, "cat", "/proc/1/environ").stdout.split("\0")
    assert "GREETING=hi there" in environ
    assert "exit code 0" in cli(images, "stop", name).stdout
    cli(images, "rm", name)
    assert running.leftovers() == []
