"""The container directory, `<store>/containers/<name>/`: the one place that names its
files, says whether the container's monitor lives, and reads and writes its exit record.
The runtime (sysbake.runtime.containers), the monitor it forks (sysbake.runtime.monitor)
and the commands use it; it imports nothing heavier than they already do.

  state.json     the container as sysbake.runtime.containers records it
  bundle/        the OCI bundle: config.json and rootfs/ (the overlay mount point)
  upper/ work/   the overlay's upper and work dirs (a build step commits upper/)
  etc/           hosts, hostname and resolv.conf, bind-mounted over the image's
  monitor.lock   flocked by the monitor for its whole life: held means it lives,
                 whatever its pid became
  monitor.pid    the monitor's pid (meaningful while the lock is held)
  monitor.log    the monitor's stdout and stderr
  init.pid       PID 1's host pid, written by the runtime
  start-error    why the runtime failed to start the container
  console.log    the container's console: systemd's boot output
  exit.json      the exit record (`ExitRecord`), written by the monitor once PID 1 is
                 reaped and the rootfs unmounted; its presence means the container ended
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import time
from pathlib import Path
from typing import NamedTuple

from sysbake import proc
from sysbake.fsutil import atomic_write, lock_held

STATE = "state.json"
BUNDLE = "bundle"
CONFIG = "bundle/config.json"
ROOTFS = "bundle/rootfs"
UPPER = "upper"
WORK = "work"
ETC = "etc"
MONITOR_LOCK = "monitor.lock"
MONITOR_PID = "monitor.pid"
MONITOR_LOG = "monitor.log"
INIT_PID = "init.pid"
START_ERROR = "start-error"
CONSOLE = "console.log"
EXIT = "exit.json"

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[()][0-9A-Za-z]|\r")
_CONSOLE_TAIL_BYTES = 65536


class ExitRecord(NamedTuple):
    """How PID 1 ended: its exit code (128+N when killed by signal N; None when unknown,
    as when the runtime never started it), the signal, and when (seconds since the epoch)."""

    code: int | None
    signal: int | None = None
    finished: float = 0.0


def lock_monitor(cdir: Path) -> int:
    """Take MONITOR_LOCK for the calling monitor's whole life (the kernel releases it when
    the process ends, however it ends); the lock's fd."""
    fd = os.open(cdir / MONITOR_LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def monitor_alive(cdir: Path) -> bool:
    """Whether the monitor of the container in `cdir` still runs (holds MONITOR_LOCK)."""
    return lock_held(cdir / MONITOR_LOCK)


def monitor_pid(cdir: Path) -> int | None:
    """The pid of the container's monitor if it still runs."""
    if not monitor_alive(cdir):
        return None
    try:
        return int((cdir / MONITOR_PID).read_text().strip())
    except (OSError, ValueError):
        return None


def read_exit(cdir: Path) -> ExitRecord | None:
    """The exit record; None while there is none (or it is unreadable)."""
    try:
        doc = json.loads((cdir / EXIT).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict):
        return None
    code, sig, finished = doc.get("code"), doc.get("signal"), doc.get("finished")
    return ExitRecord(
        code if _is_int(code) else None,
        sig if _is_int(sig) else None,
        float(finished) if isinstance(finished, int | float) else 0.0,
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_exit(cdir: Path, wait_status: int | None) -> ExitRecord:
    """Record PID 1's end from its wait status (None: unknown); the record written."""
    code = sig = None
    if wait_status is not None:
        if os.WIFSIGNALED(wait_status):
            sig = os.WTERMSIG(wait_status)
            code = 128 + sig
        else:
            code = os.waitstatus_to_exitcode(wait_status)
    record = ExitRecord(code, sig, time.time())
    # Not durable: the record describes a process, which a reboot ends anyway.
    atomic_write(cdir / EXIT, json.dumps(record._asdict()).encode(), durable=False)
    return record


def console_tail(cdir: Path, lines: int = 10) -> str:
    """The console log's last lines without terminal escapes, joined by ' | '."""
    try:
        with open(cdir / CONSOLE, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - _CONSOLE_TAIL_BYTES))
            raw = f.read()
    except OSError:
        return "no console output"
    return proc.tail(_ANSI.sub(b"", raw), lines, empty="no console output")
