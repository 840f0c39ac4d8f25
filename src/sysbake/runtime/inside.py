"""Running commands inside a running container: exec (captured or on our terminal, as a
user of the container, with docker's exit codes 126 and 127 for a command that cannot
run or is not there) and waiting for systemd to finish booting."""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import time
from collections.abc import Sequence
from typing import NamedTuple

from sysbake import log, proc
from sysbake.errors import CommandError, RuntimeFailure
from sysbake.rootfs import Root
from sysbake.runtime import bundle
from sysbake.runtime import container_dir as cd
from sysbake.runtime.container_dir import console_tail
from sysbake.runtime.containers import Container, exit_code, status


class ExecRefused(RuntimeFailure):
    """A command `exec` cannot run, with docker's exit code: 127 when it is not found,
    126 when it is found but cannot be run (not executable, a directory, no such user)."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.exit_code = code


class User(NamedTuple):
    """Whom an exec'd command runs as: ids, supplementary groups and home directory."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    home: str = "/"


def exec_argv(
    container: Container,
    command: Sequence[str],
    *,
    tty: bool = False,
    env: Sequence[str] = (),
    cwd: str | None = None,
    user: User | None = None,
) -> list[str]:
    """The runtime command line that runs `command` inside the container."""
    argv = [container.runtime, "--root", str(container.state_root), "exec"]
    if tty:
        argv.append("--tty")
    if cwd:
        argv += ["--cwd", cwd]
    if user is not None:
        argv += ["--user", f"{user.uid}:{user.gid}"]
        if user.groups and container.runtime == "runc":
            argv += ["--additional-gids", ",".join(map(str, user.groups))]
    for item in env:
        argv += ["--env", item]
    return [*argv, container.runtime_id, *command]


def find_user(root: Root, spec: str, container: str) -> User:
    """`exec -u USER[:GROUP]` (names or numbers) as the container's /etc/passwd and
    /etc/group say; a number that names no account is taken as it is (gid 0, as docker).
    ExecRefused (126) for a name the container does not know."""
    name, _, group = spec.partition(":")
    passwd = _table(root, "etc/passwd")
    groups = _table(root, "etc/group")
    entry = next((e for e in passwd if name in (e[0], e[2])), None)
    if entry is None and not name.isdigit():
        raise ExecRefused(f"exec -u {spec}: no user {name!r} in {container}'s /etc/passwd", 126)
    uid = int(entry[2]) if entry else int(name)
    gid = int(entry[3]) if entry and entry[3].isdigit() else 0
    if group:
        found = next((g for g in groups if group in (g[0], g[2])), None)
        if found is None and not group.isdigit():
            raise ExecRefused(
                f"exec -u {spec}: no group {group!r} in {container}'s /etc/group", 126
            )
        gid = int(found[2]) if found else int(group)
    login = entry[0] if entry else ""
    extra = tuple(
        sorted(
            {int(g[2]) for g in groups if login and login in g[3].split(",") and g[2].isdigit()}
            - {gid}
        )
    )
    home = entry[5] if entry and entry[5] else "/"
    return User(uid, gid, extra if not group else (), home)


def _table(root: Root, path: str) -> list[list[str]]:
    """The colon-separated entries of /etc/passwd or /etc/group (padded to 7 fields);
    [] when the container has none."""
    try:
        text = root.read_bytes(path).decode(errors="replace")
    except OSError:
        return []
    rows = [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]
    return [row + [""] * (7 - len(row)) for row in rows]


def process_env(container: Container) -> list[str]:
    """PID 1's environment, as the bundle gives it (an exec starts from it)."""
    try:
        config = json.loads((container.dir / cd.CONFIG).read_text())
        return [str(item) for item in config["process"]["env"]]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"PATH={bundle.DEFAULT_PATH}"]


def check_command(root: Root, command: str, path: str, cwd: str, container: str) -> None:
    """ExecRefused unless `command` (found in `path` when it has no slash, else relative
    to `cwd`) is an executable file of the container: 127 when there is none, 126 when
    it cannot run."""
    if "/" in command:
        candidates = [command if command.startswith("/") else f"{cwd.rstrip('/')}/{command}"]
    else:
        candidates = [f"{d.rstrip('/') or ''}/{command}" for d in path.split(":") if d]
    refused = ""
    for candidate in candidates:
        st = root.stat(candidate)
        if st is None:
            continue
        if stat.S_ISREG(st.st_mode) and st.st_mode & 0o111:
            return
        refused = refused or (
            f"{candidate}: is a directory"
            if stat.S_ISDIR(st.st_mode)
            else f"{candidate}: permission denied"
        )
    if refused:
        raise ExecRefused(f"exec in {container}: {refused}", 126)
    where = f"in the container's PATH ({path})" if "/" not in command else "in the container"
    raise ExecRefused(f"exec in {container}: {command}: command not found {where}", 127)


def run_attached(argv: Sequence[str], *, stdin: bool = True) -> int:
    """Run `argv` on our own terminal (stdin included unless not `stdin`); its exit code.
    Ctrl-C reaches it."""
    # Not proc.run: it always detaches stdin, which an interactive shell needs.
    log.debug("run: " + " ".join(argv))
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        child = subprocess.Popen(
            list(argv), stdin=None if stdin else subprocess.DEVNULL, preexec_fn=_child_setup
        )
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
