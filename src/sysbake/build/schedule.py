"""Jobs at once: the scheduler of `sysbake build -j N`.

`run_graph` starts each job once the jobs it waits for are done, at most N at a time.
After a failure it starts nothing new, asks the running jobs to stop after their current
stage, waits for them and raises the first error. On Ctrl-C (or SIGTERM, or any error of
its own) it cancels the running jobs and waits until they have cleaned up.

How a job runs is its launcher's. `ForkLauncher` runs each in a forked process: what a
build step leaves to undo (mounts, containers, staging, subprocesses) belongs to one
process, which a failure or an interrupt unwinds as it unwinds a build of one image. Its
output reaches stderr a line at a time, prefixed by the job's name, so that concurrent
stages stay readable; its events and its result come back as JSON lines on a pipe.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Generic, NoReturn, Protocol, TypeVar

from sysbake import log
from sysbake.errors import BuildError, Interrupted, SysbakeError

T = TypeVar("T")
Json = dict[str, Any]

_PR_SET_PDEATHSIG = 1
_STOP = signal.SIGUSR1  # a running job: end after the current stage
_CANCEL = signal.SIGTERM  # a running job: stop now, cleaning up (as Ctrl-C does)


class Outcome(Generic[T]):
    """How job `name` ended: its value, or the error that ended it."""

    __slots__ = ("error", "name", "value")

    def __init__(self, name: str, value: T | None = None, error: SysbakeError | None = None):
        self.name = name
        self.value = value
        self.error = error


class Launcher(Protocol[T]):
    """Runs the jobs `run_graph` starts."""

    def start(self, name: str) -> None:
        """Start job `name` (its dependencies are done)."""

    def wait(self) -> Outcome[T]:
        """Block until a started job ends; how it ended."""
        ...

    def stop(self) -> None:
        """Ask the running jobs to end after their current stage."""

    def cancel(self) -> None:
        """Ask the running jobs to stop now, cleaning up."""


def run_graph(deps: Mapping[str, Sequence[str]], launcher: Launcher[T], jobs: int) -> dict[str, T]:
    """The value of every job of `deps` (a job's name -> the names of the jobs it waits for,
    in the order to start them) run by `launcher`, at most `jobs` at once. A failure's
    error is raised once the running jobs have ended; so is any exception of the caller
    (KeyboardInterrupt), once the running jobs are cancelled and have ended."""
    pending = list(deps)
    running: set[str] = set()
    done: dict[str, T] = {}
    failure: SysbakeError | None = None
    try:
        while True:
            if failure is None:
                _start_ready(pending, running, done, deps, launcher, jobs)
            if not running:
                break
            outcome = launcher.wait()
            running.discard(outcome.name)
            if outcome.error is None:
                done[outcome.name] = outcome.value  # type: ignore[assignment]
            elif failure is None:
                failure = outcome.error
                if running:
                    log.info(
                        f"==> {outcome.name} failed; waiting for {', '.join(sorted(running))} "
                        "to end the stage in progress"
                    )
                    launcher.stop()
            else:
                log.info(f"==> {outcome.error}")
    except BaseException:
        _cancel(launcher, running)
        raise
    if failure is not None:
        raise failure
    if pending:  # a name waited for that no job has: a bug of the caller's graph
        raise BuildError(f"internal: jobs {pending} wait for jobs that never ran")
    return done


def _start_ready(
    pending: list[str],
    running: set[str],
    done: Mapping[str, object],
    deps: Mapping[str, Sequence[str]],
    launcher: Launcher[Any],
    jobs: int,
) -> None:
    """Start the pending jobs whose dependencies are done, in order, while there is room."""
    for name in list(pending):
        if len(running) >= jobs:
            return
        if all(dep in done for dep in deps[name]):
            pending.remove(name)
            launcher.start(name)
            running.add(name)


def _cancel(launcher: Launcher[Any], running: set[str]) -> None:
    """Cancel the running jobs and wait until each has ended (cleaned up); a second Ctrl-C
    meanwhile is ignored: leaving now would leave their mounts and containers behind."""
    if not running:
        return
    log.info(f"==> stopping {', '.join(sorted(running))}")
    with _deaf():
        launcher.cancel()
        while running:
            running.discard(launcher.wait().name)


@contextlib.contextmanager
def _deaf() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the block (signals are the main thread's)."""
    try:
        saved = {sig: signal.signal(sig, _ignore) for sig in (signal.SIGINT, _CANCEL)}
    except ValueError:  # not the main thread: signals are not ours to set
        saved = {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


class JobFailed(SysbakeError):
    """A job's error, as its process reported it: the message and the exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Job:
    """What a forked job's work is given: `send` an event to the parent (a JSON object);
    `stopping`, whether it was asked to end after its current stage."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._stop = False

    def send(self, message: Json) -> None:
        data = json.dumps(message, separators=(",", ":")).encode() + b"\n"
        while data:
            data = data[os.write(self._fd, data) :]

    def stopping(self) -> bool:
        return self._stop

    def request_stop(self, signum: int, frame: object) -> None:
        self._stop = True


class _Running:
    """A running job, seen from the parent: its process, a pidfd, its message pipe and its
    output pipe (read ends, non-blocking), with what has come of each so far."""

    def __init__(self, name: str, pid: int, messages: int, output: int) -> None:
        self.name = name
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        self.fds = {messages: b"", output: b""}  # fd -> an incomplete last line
        self.messages = messages
        self.result: Json | None = None

    def close(self) -> None:
        for fd in (*self.fds, self.pidfd):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}


class ForkLauncher(Generic[T]):
    """Runs each job in a forked process: `work(name, job)` there returns its result (a
    JSON object) or raises SysbakeError; `on_event(name, event)` hears each event it sends,
    and `finish(name, result)` makes its value, both here. Its stdout and stderr come to our
    stderr line by line, prefixed with "[name] "."""

    def __init__(
        self,
        work: Callable[[str, Job], Json],
        on_event: Callable[[str, Json], None],
        finish: Callable[[str, Json], T],
    ) -> None:
        self._work = work
        self._on_event = on_event
        self._finish = finish
        self._running: dict[int, _Running] = {}  # by pidfd

    def start(self, name: str) -> None:
        for stream in (sys.stdout, sys.stderr):  # nothing buffered is written twice
            stream.flush()
        msg_r, msg_w = os.pipe()
        out_r, out_w = os.pipe()
        # Blocked until the child has its handler: a stop that early must not kill it.
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, {_STOP})
        parent = os.getpid()
        try:
            pid = os.fork()
            if pid == 0:  # pragma: no cover - the child's coverage is not collected
                self._child(name, parent, msg_w, out_w, (msg_r, out_r))
        except BaseException:
            for fd in (msg_r, msg_w, out_r, out_w):
                os.close(fd)
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, saved)
        os.close(msg_w)
        os.close(out_w)
        for fd in (msg_r, out_r):
            os.set_blocking(fd, False)
        job = _Running(name, pid, msg_r, out_r)
        self._running[job.pidfd] = job

    def _child(
        self, name: str, parent: int, msg_w: int, out_w: int, parent_ends: tuple[int, ...]
    ) -> NoReturn:
        """The forked job: run `work`, send its result or error, and exit without returning
        into the parent's stack (os._exit: no finally block of the parent runs twice)."""
        code = 1
        try:
            job = Job(msg_w)
            _child_signals(job, parent)
            for fd in parent_ends:
                os.close(fd)
            for other in self._running.values():
                other.close()
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            os.close(out_w)
            # Streams on those descriptors, whatever the parent's were (a test's capture).
            sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
            code = _run_job(self._work, name, job)
        except KeyboardInterrupt:  # before the job began: nothing to undo
            code = Interrupted.exit_code
        except BaseException:  # a bug: say what it was, on the job's output
            import traceback

            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def wait(self) -> Outcome[T]:
        while True:
            poller = select.poll()
            for job in self._running.values():
                poller.register(job.pidfd, select.POLLIN)
                for fd in job.fds:
                    poller.register(fd, select.POLLIN)
            for fd, _events in poller.poll():
                job = self._job_of(fd)
                if fd != job.pidfd:
                    self._read(job, fd)
                    continue
                del self._running[job.pidfd]
                return self._ended(job)

    def _job_of(self, fd: int) -> _Running:
        if fd in self._running:
            return self._running[fd]
        return next(job for job in self._running.values() if fd in job.fds)

    def _read(self, job: _Running, fd: int) -> None:
        """What is there to read on `fd` now; its last line, at its end."""
        while True:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not data:
                rest = job.fds.pop(fd)
                os.close(fd)
                if rest:
                    self._line(job, fd, rest)
                return
            *lines, job.fds[fd] = (job.fds[fd] + data).split(b"\n")
            for line in lines:
                self._line(job, fd, line)

    def _line(self, job: _Running, fd: int, line: bytes) -> None:
        if fd != job.messages:
            sys.stderr.write(f"[{job.name}] {line.decode(errors='replace')}\n")
            sys.stderr.flush()
            return
        message = json.loads(line)
        if "event" in message:
            self._on_event(job.name, message["event"])
        else:
            job.result = message

    def _ended(self, job: _Running) -> Outcome[T]:
        """How the job whose process has ended ended (its pipes read to what is left)."""
        _pid, status = os.waitpid(job.pid, 0)
        for fd in list(job.fds):
            self._read(job, fd)
        for fd, rest in job.fds.items():  # still open in a process it left: not waited for
            if rest:
                self._line(job, fd, rest)
        job.close()
        result = job.result or {}
        try:
            if "done" in result:
                return Outcome(job.name, self._finish(job.name, result["done"]))
        except SysbakeError as exc:
            return Outcome(job.name, error=exc)
        if "error" in result:
            return Outcome(job.name, error=JobFailed(result["error"], result["exit_code"]))
        if "interrupted" in result:
            return Outcome(job.name, error=Interrupted(f"{job.name}: interrupted"))
        how = (
            f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exit {os.waitstatus_to_exitcode(status)}"
        )
        return Outcome(job.name, error=BuildError(f"{job.name}: its build ended ({how})"))

    def stop(self) -> None:
        self._signal(_STOP)

    def cancel(self) -> None:
        self._signal(_CANCEL)

    def _signal(self, sig: int) -> None:
        for job in self._running.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(job.pidfd, sig)


def _run_job(work: Callable[[str, Job], Json], name: str, job: Job) -> int:
    """Run `work` in the child and send how it ended; the child's exit code."""
    try:
        job.send({"done": work(name, job)})
        return 0
    except SysbakeError as exc:
        job.send({"error": str(exc), "exit_code": exc.exit_code})
    except KeyboardInterrupt:
        job.send({"interrupted": True})
        return Interrupted.exit_code
    return 1


def _child_signals(job: Job, parent: int) -> None:
    """A job's signals: SIGUSR1 asks it to stop after its stage; SIGINT or SIGTERM, once,
    unwinds it (KeyboardInterrupt, as Ctrl-C does a build), and later ones are ignored so
    that nothing interrupts its clean-up (a terminal's Ctrl-C reaches the whole group, and
    the parent then cancels its jobs too); the parent's death is a SIGTERM."""
    import ctypes

    def interrupt(signum: int, frame: object) -> None:
        for sig in (signal.SIGINT, _CANCEL):
            signal.signal(sig, _ignore)
        if os.getppid() != parent:  # nobody reads our output any more
            _to_null()
        raise KeyboardInterrupt

    signal.signal(_STOP, job.request_stop)
    for sig in (signal.SIGINT, _CANCEL):
        signal.signal(sig, interrupt)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {_STOP})
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, _CANCEL, 0, 0, 0)
    if os.getppid() != parent:  # died before prctl: no signal will come
        raise KeyboardInterrupt


def _ignore(signum: int, frame: object) -> None:
    """A handler that does nothing: unlike SIG_IGN, one a signal already pending (Ctrl-C
    to the whole group, then our own SIGTERM) can run without Python complaining."""


def _to_null() -> None:
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)
    os.close(null)
