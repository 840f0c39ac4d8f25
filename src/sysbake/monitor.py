"""The detached keeper of one container (what conmon is to podman), run as
`python -m sysbake.monitor`.

It outlives the sysbake command that started it: it starts the runtime detached with a
console socket, copies the container's console (systemd's boot output) to console.log,
reaps PID 1 as a child subreaper to learn its exit code, then deletes the runtime state,
unmounts the rootfs and writes exit.json. The launching process waits only until the
container runs (or failed to start) and prints PID 1's host pid.

Files in the container directory: bundle/ (config.json, rootfs), console.log,
monitor.pid, monitor.log, init.pid, exit.json.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

from sysbake import overlay, proc
from sysbake.store import atomic_write

_PR_SET_CHILD_SUBREAPER = 36
_TIOCGPTPEER = 0x5441


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m sysbake.monitor")
    parser.add_argument("--runtime", required=True, help="runc or crun executable")
    parser.add_argument("--root", required=True, help="the runtime's state directory")
    parser.add_argument("--id", required=True, help="the runtime's container ID")
    parser.add_argument("--dir", required=True, type=Path, help="the container directory")
    parser.add_argument("--socket", required=True, type=Path,
                        help="where to listen for the console (at most 107 bytes)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Fork the monitor; exit 0 printing PID 1's pid once it runs, or 1 with the error."""
    args = _parse(argv)
    rfd, wfd = os.pipe()
    if os.fork():
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            verdict = r.read().decode(errors="replace")
        if verdict.startswith("ok "):
            print(verdict[3:].strip())
            return 0
        print(verdict.strip() or "the container monitor died before the container started",
              file=sys.stderr)
        return 1
    os.close(rfd)
    os.setsid()
    args.dir = args.dir.absolute()
    os.chdir("/")  # a long-lived process must not keep the caller's cwd busy
    _detach_stdio(args.dir / "monitor.log")
    try:
        return _monitor(args, wfd)
    except BaseException as exc:
        _report(wfd, f"container monitor failed: {exc}")
        traceback.print_exc()
        return 1
    finally:
        os._exit(0)


def _detach_stdio(logfile: Path) -> None:
    # The launcher's stdout/stderr are pipes its caller reads to EOF: let go of them.
    null = os.open(os.devnull, os.O_RDONLY)
    log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)


def _report(wfd: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(wfd, message.encode())
        os.close(wfd)


def _monitor(args: argparse.Namespace, wfd: int) -> int:
    cdir: Path = args.dir
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # Orphans of our descendants (PID 1 once `runc run -d` exits) become our children,
    # so waitpid gives us PID 1's exit status.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    atomic_write(cdir / "monitor.pid", f"{os.getpid()}\n".encode())
    master = _start(args)
    if master is None:
        _report(wfd, (cdir / "start-error").read_text())
        _finish(args, None)
        return 1
    # Hold a slave end open ourselves: with none open, reads on the master fail with
    # EIO whenever systemd has closed /dev/console, which would end the copy early.
    peer = -1
    with contextlib.suppress(OSError):
        peer = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    init_pid = int((cdir / "init.pid").read_text().strip())
    _report(wfd, f"ok {init_pid}\n")
    status = _copy_until_exit(master, cdir / "console.log", init_pid)
    for fd in (master, peer):
        if fd >= 0:
            os.close(fd)
    _finish(args, status)
    return 0


def _start(args: argparse.Namespace) -> int | None:
    """Run the container detached; the pty master of its console, or None (the reason is
    in start-error)."""
    cdir: Path = args.dir
    sock_path: Path = args.socket
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        sock_path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(sock_path))
        listener.listen(1)
        name = Path(args.runtime).name
        started = proc.run(
            [args.runtime, "--root", args.root, "run", "--detach", "--bundle",
             cdir / "bundle", "--console-socket", sock_path, "--pid-file",
             cdir / "init.pid", args.id],
            check=False, timeout=120, what=f"{name} run")
        if started.returncode != 0:
            (cdir / "start-error").write_text(
                f"{name} run failed (exit {started.returncode}): {_message(started)}")
            return None
        # The runtime connected and sent the pty before it exited: this does not block.
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 64, 1)
        if not fds:
            (cdir / "start-error").write_text(f"{name} sent no console")
            return None
        return fds[0]
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()


def _message(result: subprocess.CompletedProcess[bytes]) -> str:
    # runc logs as `time="..." level=error msg="..."`: keep the message.
    tail = proc.tail_of(result)
    found = re.findall(r'msg="((?:[^"\\]|\\.)*)"', tail)
    return found[-1].replace('\\"', '"') if found else tail


def _copy_until_exit(master: int, logfile: Path, init_pid: int) -> int | None:
    """Copy the console to `logfile` until PID 1 is reaped; its wait status, or None."""
    os.set_blocking(master, False)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    status: int | None = None
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 0.1)
            if ready:
                _drain(master, out)
            reaped, status = _reap(init_pid)
            if reaped:
                _drain(master, out)
                return status
    finally:
        os.close(out)


def _drain(master: int, out: int) -> None:
    while True:
        try:
            data = os.read(master, 65536)
        except (BlockingIOError, OSError):
            return
        if not data:
            return
        os.write(out, data)


def _reap(init_pid: int) -> tuple[bool, int | None]:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            # PID 1 is not our child (no subreaper support): poll for it instead.
            return (not Path(f"/proc/{init_pid}").exists(), None)
        if pid == 0:
            return (False, None)
        if pid == init_pid:
            return (True, status)


def _finish(args: argparse.Namespace, status: int | None) -> None:
    cdir: Path = args.dir
    proc.run([args.runtime, "--root", args.root, "delete", "--force", args.id], check=False,
             what=f"{Path(args.runtime).name} delete")
    overlay.umount(cdir / "bundle" / "rootfs")
    code: int | None = None
    sig: int | None = None
    if status is not None:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            code = 128 + sig
        else:
            code = os.waitstatus_to_exitcode(status)
    record = {"code": code, "signal": sig, "finished": time.time()}
    atomic_write(cdir / "exit.json", json.dumps(record).encode())


if __name__ == "__main__":
    sys.exit(main())
