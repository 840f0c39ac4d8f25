"""Nothing orphaned: a build step or `sysbake test` whose sysbake process is killed with
SIGKILL leaves its container running only until the next sysbake command that opens the
store (`ps`, `images`, ...). That command removes it (PID 1 and the monitor ended, runc
state deleted, overlay unmounted, directory gone) and says so; a `run -d` container, which
no process owns, stays."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from helpers import SYSBAKE, sysbake
from provision_fixtures import RUNC_ROOT, runc_ids, write_project
from services import mounts_under

SLEEPY = """\
[images.orp-sleepy]
from = "base:latest"

[[images.orp-sleepy.provision]]
type = "script"
name = "nap"
mode = "boot"
run = "touch /orp-napping; sleep 600"
"""


class Orphaned:
    """A container left running by a sysbake process killed with SIGKILL: its directory,
    runc ID and pidfds of its PID 1 and of its monitor, taken while they ran."""

    def __init__(self, cdir: Path) -> None:
        state = json.loads((cdir / "state.json").read_text())
        self.dir = cdir
        self.name = cdir.name
        self.runtime_id = str(state["runtime_id"])
        self.pidfds = [
            os.pidfd_open(int(state["pid"])),
            os.pidfd_open(int((cdir / "monitor.pid").read_text())),
        ]

    def processes_ended(self) -> bool:
        poller = select.poll()
        for fd in self.pidfds:
            poller.register(fd, select.POLLIN)
        return len(poller.poll(0)) == len(self.pidfds)

    def assert_running(self) -> None:
        assert not self.processes_ended(), "the container died with its owner: nothing to reap"
        assert (Path(RUNC_ROOT) / self.runtime_id).exists()
        assert (self.dir.parent / f"{self.name}.owner").exists()

    def assert_gone(self, store: Path) -> None:
        """PID 1 and the monitor ended, no runc state, no mount, no file left."""
        deadline = time.monotonic() + 10  # a SIGKILLed process is gone once reaped
        while not self.processes_ended():
            assert time.monotonic() < deadline, "a process of the orphan still runs"
            time.sleep(0.05)
        assert self.runtime_id not in runc_ids(store)
        assert not (Path(RUNC_ROOT) / self.runtime_id).exists()
        assert [m for m in mounts_under(store) if self.name in m] == []
        assert not self.dir.exists()
        assert not (self.dir.parent / f"{self.name}.owner").exists()

    def close(self) -> None:
        for fd in self.pidfds:
            os.close(fd)


def _wait_for(
    what: str,
    found: Callable[[], bool],
    process: subprocess.Popen[bytes],
    log: Path,
    timeout: float = 600,
) -> None:
    """Poll `found()` until it is true; fail (killing `process`) on timeout or its end."""
    deadline = time.monotonic() + timeout
    while not found():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            process.wait()
            pytest.fail(f"{what} never happened:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@contextmanager
def _killed(
    args: list[str], store: Path, log: Path, ready: Callable[[], Path | None], cwd: Path
) -> Iterator[tuple[int, Orphaned]]:
    """Start `sysbake ARGS`; once `ready()` gives a container dir, kill the sysbake
    process (by its pid) with SIGKILL. Yields its pid and the orphan it left."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [*SYSBAKE, "--store", str(store), *args], stdout=out, stderr=subprocess.STDOUT, cwd=cwd
        )
    found: list[Path] = []

    def container() -> bool:
        cdir = ready()
        if cdir is not None:
            found.append(cdir)
        return cdir is not None

    _wait_for(f"a container of `sysbake {' '.join(args)}`", container, process, log)
    orphan = Orphaned(found[0])
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    try:
        yield process.pid, orphan
    finally:
        orphan.close()
        sysbake("ps", store=store, check=False)  # reaps it if the test failed first


def _napping_step(store: Path) -> Path | None:
    """The build container whose step runs (its marker in the upper dir), with its pid."""
    for cdir in (store / "containers").glob("build-*"):
        if (
            (cdir / "upper" / "orp-napping").exists()
            and (cdir / "state.json").exists()
            and json.loads((cdir / "state.json").read_text()).get("pid")
        ):
            return cdir
    return None


def _booted_test(store: Path) -> Path | None:
    """The container of `sysbake test orp-base` once its systemd runs, if there is one."""
    for cdir in (store / "containers").glob("test-orp-base-*"):
        try:
            pid = json.loads((cdir / "state.json").read_text()).get("pid")
        except (OSError, ValueError):
            continue
        if pid and os.path.exists(f"/proc/{pid}/root/run/systemd/system"):
            return cdir
    return None


def _reaped_row(rows: list[dict[str, object]], name: str, owner: int) -> dict[str, object]:
    mine = [r for r in rows if r["name"] == name]
    assert len(mine) == 1, rows
    assert mine[0]["status"] == f"reaped (orphaned: owner pid {owner} gone)"
    assert mine[0]["orphaned"] is True and mine[0]["owner_pid"] == owner
    return mine[0]


def test_a_killed_build_step_is_reaped_by_ps(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "sleepy", {"sysbake.toml": SLEEPY})
    with _killed(
        ["build", str(project)],
        shared_store,
        tmp_path / "build.log",
        lambda: _napping_step(shared_store),
        tmp_path,
    ) as (owner, orphan):
        orphan.assert_running()
        listed = sysbake("ps", "--json", store=shared_store)
        row = _reaped_row(json.loads(listed.stdout), orphan.name, owner)
        assert row["image"] == "orp-sleepy: nap"
        orphan.assert_gone(shared_store)
        # Reaped once: the next listing has nothing of it.
        again = json.loads(sysbake("ps", "--all", "--json", store=shared_store).stdout)
        assert orphan.name not in [r["name"] for r in again]
        table = sysbake("ps", store=shared_store).stdout
        assert orphan.name not in table


def test_a_killed_build_step_is_reaped_by_images(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    project = write_project(tmp_path / "sleepy", {"sysbake.toml": SLEEPY})
    with _killed(
        ["build", str(project)],
        shared_store,
        tmp_path / "build.log",
        lambda: _napping_step(shared_store),
        tmp_path,
    ) as (owner, orphan):
        orphan.assert_running()
        listed = sysbake("images", store=shared_store)
        assert "base" in listed.stdout
        assert (
            f"removed container {orphan.name} (orphaned: owner pid {owner} gone)"
            in listed.stderr.splitlines()
        )
        orphan.assert_gone(shared_store)
        assert "orp-sleepy" not in listed.stdout


def test_a_killed_sysbake_test_is_reaped_and_run_d_containers_stay(
    shared_store: Path, base_image: str, tmp_path: Path
) -> None:
    sysbake("tag", base_image, "orp-base:latest", store=shared_store)
    keep = f"orp-keep-{os.urandom(3).hex()}"
    sysbake("run", "-d", "--name", keep, base_image, store=shared_store, timeout=300)
    try:
        with _killed(
            ["test", "orp-base:latest"],
            shared_store,
            tmp_path / "test.log",
            lambda: _booted_test(shared_store),
            tmp_path,
        ) as (owner, orphan):
            orphan.assert_running()
            rows = json.loads(sysbake("ps", "--json", store=shared_store).stdout)
            _reaped_row(rows, orphan.name, owner)
            orphan.assert_gone(shared_store)
            kept = [r for r in rows if r["name"] == keep]
            assert kept and kept[0]["status"] == "running", rows
            assert kept[0]["orphaned"] is False and kept[0]["owner_pid"] is None
            # Still there for every later command, too.
            later = json.loads(sysbake("ps", "--json", store=shared_store).stdout)
            assert [r["status"] for r in later if r["name"] == keep] == ["running"]
            assert sysbake("exec", "-T", keep, "true", store=shared_store).returncode == 0
    finally:
        sysbake("rm", "-f", keep, store=shared_store, check=False, timeout=120)
        sysbake("rmi", "orp-base:latest", store=shared_store, check=False)
    assert not (shared_store / "containers" / keep).exists()
