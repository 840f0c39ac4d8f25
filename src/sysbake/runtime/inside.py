"""Running commands inside a running container: exec (captured or on our terminal) and
waiting for systemd to finish booting."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence

from sysbake import log, proc
from sysbake.errors import CommandError, RuntimeFailure
from sysbake.runtime.container_dir import console_tail
from sysbake.runtime.containers import Container, exit_code, status


def exec_argv(
    container: Container,
    command: Sequence[str],
    *,
    tty: bool = False,
    env: Sequence[str] = (),
    cwd: str | None = None,
) -> list[str]:
    """The runtime command line that runs `command` inside the container."""
    argv = [container.runtime, "--root", str(container.state_root), "exec"]
    if tty:
        argv.append("--tty")
    if cwd:
        argv += ["--cwd", cwd]
    for item in env:
        argv += ["--env", item]
    return [*argv, container.runtime_id, *command]


def run_attached(argv: Sequence[str]) -> int:
    """Run `argv` on our own terminal (stdin included); its exit code. Ctrl-C reaches it."""
    # Not proc.run: it always detaches stdin, which an interactive shell needs.
    log.debug("run: " + " ".join(argv))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(list(argv), preexec_fn=_child_setup)
        return child.wait()
    finally:
        signal.signal(signal.SIGINT, previous)


def _child_setup() -> None:
    # No parent-death signal, unlike other children of sysbake: `runc exec` ends with the
    # command it runs (which dies with the container at the latest). Killed early, it
    # would orphan that command to the host's init, and systemd's shutdown then waits
    # for the host to reap it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def exec_capture(
    container: Container, command: Sequence[str], *, timeout: float | None = 60.0
) -> tuple[int, str]:
    """Run `command` inside; (exit code, stdout+stderr text)."""
    result = proc.run(
        exec_argv(container, command),
        check=False,
        timeout=timeout,
        die_with_parent=False,
        what=f"exec in {container.name}",
    )
    text = (result.stdout + result.stderr).decode(errors="replace")
    return result.returncode, text


def wait_for_boot(container: Container, timeout: float) -> str:
    """systemd's state once booted ('running', 'degraded', ...) or the last state seen
    ('starting', 'initializing', 'offline') when `timeout` s pass first."""
    deadline = time.monotonic() + timeout
    state = "offline"
    while True:
        # --wait returns the moment the boot ends (early only while systemd's socket is not
        # up yet). Each wait is bounded: a killed exec leaves at most a harmless systemctl.
        bound = min(_WAIT_SLICE, max(0.5, deadline - time.monotonic()))
        try:
            _, out = exec_capture(
                container, ["systemctl", "is-system-running", "--wait"], timeout=bound
            )
        except CommandError:
            _, out = exec_capture(container, ["systemctl", "is-system-running"], timeout=10)
        state = (out.strip().splitlines() or ["offline"])[-1].strip()
        if state in ("running", "degraded", "maintenance", "stopping"):
            return state
        if not status(container).running:
            raise RuntimeFailure(
                f"container {container.name} exited during boot (code "
                f"{exit_code(container)}): {console_tail(container.dir)}"
            )
        if time.monotonic() >= deadline:
            return state
        time.sleep(0.02)


_WAIT_SLICE = 5.0  # seconds of one `systemctl --wait`
