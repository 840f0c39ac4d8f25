"""The container monitor's launch protocol, with a stand-in runtime (no root, no runc):
forked ahead, it waits for `start`; `cancel` ends it with nothing started."""

from __future__ import annotations

import fcntl
import json
import os
import stat
import time
from pathlib import Path

import pytest

from sysbake import monitor
from sysbake.errors import RuntimeFailure
from sysbake.runtime import MONITOR_LOCK


def _spec(tmp_path: Path, runtime: str) -> monitor.MonitorSpec:
    cdir = tmp_path / "container"
    (cdir / "bundle" / "rootfs").mkdir(parents=True)
    return monitor.MonitorSpec(runtime=runtime, root=tmp_path / "state", id="c.1234",
                               dir=cdir, socket=tmp_path / "console" / "c.sock")


def _lock_is_free(cdir: Path) -> bool:
    with open(cdir / MONITOR_LOCK, "rb") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_cancel_ends_the_monitor_with_nothing_started(tmp_path: Path) -> None:
    runtime = tmp_path / "runtime"
    runtime.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'calls'}\n")
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
    runtime.write_text("#!/bin/sh\n"
                       "[ \"$3\" = run ] || exit 0\n"
                       "echo 'time=\"x\" level=error msg=\"no such \\\"thing\\\"\"' >&2\n"
                       "exit 3\n")
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
