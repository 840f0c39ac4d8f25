"""The container directory's contract (sysbake.runtime.container_dir): the monitor's
liveness is its lock, the exit record is written from a wait status and read back by the
runtime, the console's tail; the monitor gets all of it without importing the runtime."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from sysbake.runtime import container_dir as cd
from sysbake.runtime import containers


def _holder(cdir: Path) -> tuple[int, int]:
    """A forked process that took the monitor lock of `cdir` and wrote its pid, as the
    monitor does, and waits: (pid, the write end of the pipe that ends it when closed)."""
    ready_r, ready_w = os.pipe()
    wait_r, wait_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.close(ready_r)
            os.close(wait_w)
            cd.lock_monitor(cdir)
            (cdir / cd.MONITOR_PID).write_text(f"{os.getpid()}\n")
            os.write(ready_w, b"1")
            os.read(wait_r, 1)
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(wait_r)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, wait_w


def test_the_monitor_lives_as_long_as_its_lock(tmp_path: Path) -> None:
    assert not cd.monitor_alive(tmp_path) and cd.monitor_pid(tmp_path) is None  # no lock
    pid, pipe = _holder(tmp_path)
    try:
        assert cd.monitor_alive(tmp_path)
        assert cd.monitor_pid(tmp_path) == pid
        assert cd.monitor_alive(tmp_path)  # asking does not take the lock
    finally:
        os.kill(pid, signal.SIGKILL)  # however it dies, the kernel drops the lock
        os.waitpid(pid, 0)
        os.close(pipe)
    assert (tmp_path / cd.MONITOR_LOCK).exists() and (tmp_path / cd.MONITOR_PID).exists()
    assert not cd.monitor_alive(tmp_path)
    assert cd.monitor_pid(tmp_path) is None  # a pid file without a lock is stale


def _wait_status(code: str) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        if code == "killed":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(code))
    return os.waitpid(pid, 0)[1]


@pytest.mark.parametrize(
    ("status", "code", "sig"),
    [
        ("0", 0, None),
        ("3", 3, None),
        ("killed", 128 + signal.SIGKILL, signal.SIGKILL),
        (None, None, None),
    ],
)
def test_the_exit_record_round_trips(
    tmp_path: Path, status: str | None, code: int | None, sig: int | None
) -> None:
    assert cd.read_exit(tmp_path) is None
    written = cd.write_exit(tmp_path, None if status is None else _wait_status(status))
    assert (written.code, written.signal) == (code, sig) and written.finished > 0
    assert cd.read_exit(tmp_path) == written
    assert json.loads((tmp_path / cd.EXIT).read_text()) == {
        "code": code,
        "signal": sig,
        "finished": written.finished,
    }
    assert os.listdir(tmp_path) == [cd.EXIT]  # written atomically: no temp file left
    # The runtime reads the same record.
    container = containers.Container(
        name="c",
        dir=tmp_path,
        runtime="runc",
        runtime_id="c.1",
        image="i",
        image_id="",
        created=0.0,
        args=("sh",),
        stop_signal=15,
        network="none",
    )
    assert containers.status(container) == containers.Status("exited", exit_code=code)
    assert containers.exit_code(container) == code


@pytest.mark.parametrize("text", ["", "{", "[1]", "null", '"x"'])
def test_an_unreadable_exit_record_is_no_record(tmp_path: Path, text: str) -> None:
    (tmp_path / cd.EXIT).write_text(text)
    assert cd.read_exit(tmp_path) is None


def test_junk_in_an_exit_record_is_unknown(tmp_path: Path) -> None:
    (tmp_path / cd.EXIT).write_text('{"code": true, "signal": "9", "finished": "x"}')
    assert cd.read_exit(tmp_path) == cd.ExitRecord(None, None, 0.0)


def test_the_console_tail_strips_terminal_codes(tmp_path: Path) -> None:
    assert cd.console_tail(tmp_path) == "no console output"
    console = tmp_path / cd.CONSOLE
    console.write_bytes(b"\x1b[2J\r\n\r\n")
    assert cd.console_tail(tmp_path) == "no console output"
    console.write_bytes(b"[\x1b[0;32m  OK  \x1b[0m] Started x.\r\r\n\r\nboom\r\n")
    assert cd.console_tail(tmp_path) == "[  OK  ] Started x. | boom"
    console.write_bytes(b"".join(b"line %d\n" % i for i in range(20000)))
    assert cd.console_tail(tmp_path, 3) == "line 19997 | line 19998 | line 19999"


def test_the_monitor_does_not_import_the_runtime() -> None:
    code = (
        "import sys; import sysbake.runtime.monitor; "
        "print(sorted(m for m in sys.modules if m.startswith('sysbake')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert "sysbake.runtime.container_dir" in result.stdout
    assert "sysbake.runtime.containers" not in result.stdout
