"""The detached keeper of one container (what conmon is to podman), forked from the
sysbake process that starts the container (no second interpreter to start).

It is forked before the container's rootfs is mounted and gets ready meanwhile (its
session, lock and console socket: off the launching process's path); once the bundle is
written it is told to go. It outlives the launching process: it starts the runtime
detached with a console socket, copies the container's console (systemd's boot output) to
console.log, reaps PID 1 as a child subreaper to learn its exit code, then unmounts the
rootfs, writes the exit record and deletes the runtime state. The launching process waits
only until the container runs (or failed to start) and gets PID 1's host pid. The files it
reads and writes are those of sysbake.runtime.container_dir.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import signal
import subprocess
from pathlib import Path
from typing import Any, NamedTuple

from sysbake import proc
from sysbake.errors import RuntimeFailure
from sysbake.fsutil import atomic_write, remove_tree
from sysbake.runtime import container_dir as cd
from sysbake.runtime import overlay

_PR_SET_CHILD_SUBREAPER = 36
_TIOCGPTPEER = 0x5441


class MonitorSpec(NamedTuple):
    """What the monitor runs: the runtime executable, its state root, the container's
    runtime ID, its directory and the console socket path (at most 107 bytes); `remove`:
    remove the directory once PID 1 has ended (`run -d --rm`)."""

    runtime: str
    root: Path
    id: str
    dir: Path
    socket: Path
    remove: bool = False


class Launch:
    """A monitor forked ahead of its container's start (`prepare`): it gets ready (its
    session, lock, console socket) while the caller mounts the rootfs and writes
    the bundle. Then `start` has it run the container, or `cancel` lets it go. Each pipe
    end is -1 once closed."""

    def __init__(self, go: int, verdict: int) -> None:
        self._go = go
        self._verdict = verdict

    def start(self) -> int:
        """PID 1's host pid once the container runs, or RuntimeFailure with the runtime's
        error."""
        with contextlib.suppress(BrokenPipeError):  # it died: its verdict says why
            os.write(self._go, b"go")
        verdict = self._close()
        if verdict.startswith("ok "):
            return int(verdict[3:].strip())
        raise RuntimeFailure(
            verdict.strip() or "the container monitor died before the container started"
        )

    def cancel(self) -> int | None:
        """Let go of the monitor; returns once it has ended, or has started the container
        after all (an interrupted `start`): then PID 1's host pid, for the caller to stop."""
        verdict = self._close()
        return int(verdict[3:].strip()) if verdict.startswith("ok ") else None

    def _close(self) -> str:
        # Closing `go` unsent makes the monitor end; its verdict (or EOF) then tells us
        # what it did. Idempotent.
        go, self._go = self._go, -1
        if go >= 0:
            os.close(go)
        verdict, self._verdict = self._verdict, -1
        if verdict < 0:
            return ""
        with os.fdopen(verdict, "rb") as r:
            return r.read().decode(errors="replace")


def prepare(spec: MonitorSpec) -> Launch:
    """Fork the monitor of `spec`'s container, detached (double fork, own session), to be
    started with `Launch.start` once the bundle is written."""
    go_r, go_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(go_w)
            os.close(verdict_r)
            os.setsid()
            if os.fork() == 0:
                _run_detached(spec, go_r, verdict_w)
        finally:
            os._exit(0)
    os.close(go_r)
    os.close(verdict_w)
    launch = Launch(go_w, verdict_r)
    try:
        os.waitpid(child, 0)  # the intermediate child, which exits at once
    except BaseException:
        launch.cancel()
        raise
    return launch


def _run_detached(spec: MonitorSpec, go: int, wfd: int) -> None:  # pragma: no cover - child
    # Nothing of the launching process may stay open here: its flocks (a build's owner
    # lock) would live as long as the container, its pipes would never reach EOF.
    low, high = sorted((go, wfd))
    os.closerange(3, low)
    os.closerange(low + 1, high)
    os.closerange(high + 1, max(os.sysconf("SC_OPEN_MAX"), high + 1))
    for sig in (signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    for sig in (signal.SIGHUP, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    os.chdir("/")  # a long-lived process must not keep the caller's cwd busy
    _detach_stdio(spec.dir / cd.MONITOR_LOG)
    try:
        _monitor(spec, go, wfd)
    except BaseException as exc:
        _report(wfd, f"container monitor failed: {exc}")
        import traceback

        traceback.print_exc()


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


def _monitor(spec: MonitorSpec, go: int, wfd: int) -> None:
    cdir = spec.dir
    lock = cd.lock_monitor(cdir)
    # Orphans of our descendants (PID 1 once `runc run -d` exits) become our children,
    # so waitpid gives us PID 1's exit status.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    atomic_write(cdir / cd.MONITOR_PID, f"{os.getpid()}\n".encode(), durable=False)
    listener = _listen(spec.socket)
    if os.read(go, 2) != b"go":  # cancelled, or the launching process died
        _close_listener(listener, spec.socket)
        (cdir / cd.MONITOR_PID).unlink(missing_ok=True)
        # Now, not at exit, where the kernel may drop it after the verdict pipe's EOF:
        # `cancel` returns to a free lock.
        os.close(lock)
        return
    os.close(go)
    master = _start(spec, listener)
    if master is None:
        _report(wfd, (cdir / cd.START_ERROR).read_text())
        _finish(spec, None)
        return
    # Hold a slave end open ourselves: with none open, reads on the master fail with
    # EIO whenever systemd has closed /dev/console, which would end the copy early.
    peer = -1
    with contextlib.suppress(OSError):
        peer = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    init_pid = int((cdir / cd.INIT_PID).read_text().strip())
    _report(wfd, f"ok {init_pid}\n")
    status = _copy_until_exit(master, cdir / cd.CONSOLE, init_pid)
    for fd in (master, peer):
        if fd >= 0:
            os.close(fd)
    _finish(spec, status)


def _listen(path: Path) -> Any:
    """The console socket the runtime will send the pty's master to."""
    import socket

    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
    except BaseException:
        listener.close()
        raise
    return listener


def _close_listener(listener: Any, path: Path) -> None:
    listener.close()
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _start(spec: MonitorSpec, listener: Any) -> int | None:
    """Run the container detached; the pty master of its console, or None (the reason is
    in start-error)."""
    import socket

    cdir = spec.dir
    try:
        name = Path(spec.runtime).name
        started = proc.run(
            [
                spec.runtime,
                "--root",
                spec.root,
                "run",
                *_keyring_flags(),
                "--detach",
                "--bundle",
                cdir / cd.BUNDLE,
                "--console-socket",
                spec.socket,
                "--pid-file",
                cdir / cd.INIT_PID,
                spec.id,
            ],
            check=False,
            timeout=120,
            what=f"{name} run",
        )
        if started.returncode != 0:
            (cdir / cd.START_ERROR).write_text(
                f"{name} run failed (exit {started.returncode}): {_message(started)}"
            )
            return None
        # The runtime connected and sent the pty before it exited: this does not block.
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            _, fds, _, _ = socket.recv_fds(conn, 64, 1)
        if not fds:
            (cdir / cd.START_ERROR).write_text(f"{name} sent no console")
            return None
        return int(fds[0])
    finally:
        _close_listener(listener, spec.socket)


def _keyring_flags() -> list[str]:
    """Inside a container ($container set, the systemd interface: the builder image sets
    it), the engine already gave us a session keyring of our own, and docker's seccomp
    profile refuses keyctl: runc must not make one per nested container (it would fail)."""
    return ["--no-new-keyring"] if "container" in os.environ else []


def _message(result: subprocess.CompletedProcess[bytes]) -> str:
    import re

    # runc logs as `time="..." level=error msg="..."`: keep the message.
    tail = proc.tail_of(result)
    found = re.findall(r'msg="((?:[^"\\]|\\.)*)"', tail)
    return found[-1].replace('\\"', '"') if found else tail


def _copy_until_exit(master: int, logfile: Path, init_pid: int) -> int | None:
    """Copy the console to `logfile` until PID 1 is reaped; its wait status, or None."""
    os.set_blocking(master, False)
    out = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    # A pidfd wakes us the moment PID 1 ends (a stop waits for exactly that).
    try:
        pidfd = os.pidfd_open(init_pid)
    except OSError:
        pidfd = -1
    watched = [master] + ([pidfd] if pidfd >= 0 else [])
    status: int | None = None
    try:
        while True:
            ready, _, _ = select.select(watched, [], [], 1.0 if pidfd >= 0 else 0.1)
            if master in ready:
                _drain(master, out)
            reaped, status = _reap(init_pid)
            if reaped:
                _drain(master, out)
                return status
    finally:
        os.close(out)
        if pidfd >= 0:
            os.close(pidfd)


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


def _finish(spec: MonitorSpec, status: int | None) -> None:
    # The exit record as soon as the rootfs is unmounted (what a build waits for to take
    # the upper dir), then the runtime's delete, which the record does not wait for.
    overlay.umount(spec.dir / cd.ROOTFS)
    cd.write_exit(spec.dir, status)
    # Not killed with us: a delete that has begun had better finish.
    proc.run(
        [spec.runtime, "--root", spec.root, "delete", "--force", spec.id],
        check=False,
        what=f"{Path(spec.runtime).name} delete",
        die_with_parent=False,
    )
    if spec.remove:
        remove_tree(spec.dir)
