"""The container monitor's launch protocol, with a stand-in runtime (no root, no runc):
forked ahead, it waits for `start`; `cancel` ends it with nothing started. And the owner
locks of containers that live only as long as a process (sysbake.runtime.owners): a killed
owner's container is found and removed by the next command."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sysbake import cli
from sysbake.errors import RuntimeFailure
from sysbake.runtime import containers as runtime
from sysbake.runtime import monitor, owners
from sysbake.runtime.container_dir import MONITOR_LOCK


def _spec(tmp_path: Path, runtime: str) -> monitor.MonitorSpec:
    cdir = tmp_path / "container"
    (cdir / "bundle" / "rootfs").mkdir(parents=True)
    return monitor.MonitorSpec(
        runtime=runtime,
        root=tmp_path / "state",
        id="c.1234",
        dir=cdir,
        socket=tmp_path / "console" / "c.sock",
    )


def _lock_is_free(cdir: Path) -> bool:
    with open(cdir / MONITOR_LOCK, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_cancel_ends_the_monitor_with_nothing_started(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "calls"}\n')
    runtime.chmod(0o755)
    spec = _spec(tmp_path, str(runtime))
    launch = monitor.prepare(spec)
    deadline = time.monotonic() + 30
    while not spec.socket.exists():  # ready: locked, pid written, listening
        assert time.monotonic() < deadline, "the monitor never got ready"
        time.sleep(0.01)
    assert not _lock_is_free(spec.dir)
    assert (spec.dir / "monitor.pid").read_text().strip().isdigit()
    assert launch.cancel() is None  # returns once the monitor has ended
    assert _lock_is_free(spec.dir)
    assert not (spec.dir / "monitor.pid").exists()
    assert not spec.socket.exists()
    assert (spec.dir / "monitor.log").read_text() == ""  # no traceback
    assert not (tmp_path / "calls").exists()  # the runtime was never run
    assert launch.cancel() is None  # idempotent


def test_a_failing_runtime_is_the_verdict_of_start(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text(
        "#!/bin/sh\n"
        '[ "$3" = run ] || exit 0\n'
        'echo \'time="x" level=error msg="no such \\"thing\\""\' >&2\n'
        "exit 3\n"
    )
    runtime.chmod(runtime.stat().st_mode | stat.S_IXUSR)
    spec = _spec(tmp_path, str(runtime))
    launch = monitor.prepare(spec)
    with pytest.raises(RuntimeFailure, match=r'runtime run failed \(exit 3\): no such "thing"'):
        launch.start()
    assert launch.cancel() is None  # after start: nothing left to let go of
    # Then the monitor finishes its work: it writes the exit record, its lock goes.
    deadline = time.monotonic() + 30
    while not _lock_is_free(spec.dir):
        assert time.monotonic() < deadline, "the monitor did not end"
        time.sleep(0.01)
    assert json.loads((spec.dir / "exit.json").read_text())["code"] is None
    assert not spec.socket.exists()
    assert os.listdir(spec.socket.parent) == []


# -- owner locks: containers that live only as long as their sysbake process ---------------


def _owner(containers: Path, name: str) -> tuple[int, int]:
    """A forked process holding the owner lock of `name` until killed: (pid, write end
    of a pipe it waits on; closing it ends the process)."""
    ready_r, ready_w = os.pipe()
    wait_r, wait_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.close(wait_w)
            owners.owned(containers, name)
            os.write(ready_w, b"1")
            os.read(wait_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(wait_r)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, wait_w


def _kill_9(pid: int, pipe: int) -> None:
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(pipe)


def test_a_live_owner_keeps_its_container_and_a_killed_one_leaves_an_orphan(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    pid, pipe = _owner(containers, "build-1")
    assert owners.owner_pid(containers, "build-1") == pid
    assert not owners.any_orphan(containers)
    assert list(owners.claim_orphans(containers)) == []
    _kill_9(pid, pipe)
    assert owners.any_orphan(containers)
    claimed = []
    for orphan in owners.claim_orphans(containers):
        claimed.append(orphan)
        # Ours while it is handled: another command looking now sees no orphan to take.
        assert not owners.any_orphan(containers)
        owners.forget(containers, orphan.name)
    assert claimed == [owners.Orphan("build-1", pid)]
    assert claimed[0].describe() == f"orphaned: owner pid {pid} gone"
    assert os.listdir(containers) == []
    assert not owners.any_orphan(containers)


def test_an_orphan_not_forgotten_is_found_again(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    _kill_9(*_owner(containers, "test-a"))
    assert [o.name for o in owners.claim_orphans(containers)] == ["test-a"]
    assert [o.name for o in owners.claim_orphans(containers)] == ["test-a"]


def test_a_released_owner_leaves_nothing_to_reap(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    with owners.owned(containers, "test-b") as lock:
        assert owners.owner_pid(containers, "test-b") == os.getpid()
        lock.release()
        lock.release()  # idempotent
    assert os.listdir(containers) == []
    assert not owners.any_orphan(containers)
    assert owners.owner_pid(containers, "test-b") is None


def test_an_owner_file_is_never_shared(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    with (
        owners.owned(containers, "build-2"),
        pytest.raises(RuntimeFailure, match="already has an owner"),
    ):
        owners.owned(containers, "build-2")
    assert os.listdir(containers) == []


def test_a_half_made_owner_file_of_a_dead_process_is_removed(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    containers.mkdir()
    (containers / ".build-3.owner-99999").write_text("")  # killed before it linked it
    assert owners.any_orphan(containers)
    assert list(owners.claim_orphans(containers)) == []
    assert os.listdir(containers) == []


def test_no_store_means_no_orphans(tmp_path: Path) -> None:
    assert not owners.any_orphan(tmp_path / "nothing" / "containers")
    assert list(owners.claim_orphans(tmp_path / "nothing" / "containers")) == []


def test_reaping_removes_a_container_its_owner_never_finished_making(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    pid, pipe = _owner(containers, "build-4")
    (containers / "build-4" / "upper" / "etc").mkdir(parents=True)  # no state.json yet
    _kill_9(pid, pipe)
    reaped = runtime.reap_orphans(containers)
    assert reaped == [owners.Orphan("build-4", pid)]
    assert os.listdir(containers) == []
    assert runtime.reap_orphans(containers) == []


def test_the_cli_reaps_before_a_store_command_and_ps_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    containers = store / "containers"
    store.mkdir()
    pid, pipe = _owner(containers, "build-5")
    (containers / "build-5").mkdir()
    _kill_9(pid, pipe)
    # Commands that never open the store leave it alone.
    ctx = cli.Context(store_path=store, json=True, debug=False)
    assert cli.reap_orphans(ctx, "validate") == ctx
    assert (containers / "build-5.owner").exists()
    assert cli.main(["--store", str(store), "--json", "ps"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows == [
        {
            "name": "build-5",
            "image": "",
            "image_id": "",
            "status": f"reaped (orphaned: owner pid {pid} gone)",
            "exit_code": None,
            "created": None,
            "pid": None,
            "runtime": None,
            "owner_pid": pid,
            "orphaned": True,
        }
    ]
    assert os.listdir(containers) == []
    assert cli.main(["--store", str(store), "ps"]) == 0
    header = ["CONTAINER", "ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    assert capsys.readouterr().out.split() == header


def test_every_store_command_reaps_first(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    containers = store / "containers"
    pid, pipe = _owner(containers, "test-c")
    (containers / "test-c").mkdir()
    _kill_9(pid, pipe)
    # exec's own `command` argument must not hide which command this is.
    assert cli.main(["--store", str(store), "exec", "test-c", "true"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == [
        f"removed container test-c (orphaned: owner pid {pid} gone)",
        f"sysbake: error: no container 'test-c' in {containers}",
    ]
    assert os.listdir(containers) == []


def test_the_reap_check_imports_nothing_when_there_is_nothing_to_reap(tmp_path: Path) -> None:
    containers = tmp_path / "containers"
    with owners.owned(containers, "build-6"):  # alive: nothing to reap
        code = (
            "import sys; from pathlib import Path; from sysbake import cli; "
            f"ctx = cli.Context(Path({str(tmp_path)!r}), False, False); "
            "assert cli.reap_orphans(ctx, 'images') is ctx; "
            "print(sorted(m for m in sys.modules if m.startswith('sysbake')))"
        )
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        )
    assert "sysbake.runtime.containers" not in result.stdout
    assert "sysbake.runtime.owners" in result.stdout
