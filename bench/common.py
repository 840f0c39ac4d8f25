"""Shared helpers for the benchmarks: timing side by side, CLI invocation, podman set-up.

Benchmarks print ratios against their anchors, measured in the same run; they are not
tests and assert nothing about wall-clock time."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "web"
# The console script users run (no runpy start-up), next to the interpreter running this.
SYSBAKE = [str(Path(sys.executable).parent / "sysbake")]
WORK = Path(os.environ.get("SYSBAKE_BENCH_ROOT", "/var/tmp/sysbake-bench"))
# Users run an installed sysbake, whose bytecode was compiled at install time: where the
# shell forbids writing bytecode (PYTHONDONTWRITEBYTECODE), every command would compile
# sysbake's sources again (~40 ms) and the benchmarks would time Python's compiler.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
os.environ.setdefault("PYTHONPYCACHEPREFIX", str(WORK / "pycache"))
PODMAN_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def run(cmd: Sequence[str | os.PathLike[str]], **kw: object) -> subprocess.CompletedProcess[bytes]:
    done: subprocess.CompletedProcess[bytes] = subprocess.run(  # type: ignore[call-overload]
        [str(c) for c in cmd], check=True, capture_output=True, **kw
    )
    return done


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall-clock time of `repeat` runs of `fn`, in seconds. Dirty pages are written
    back first, so that one side does not pay for the writeback of the other's output."""
    best = float("inf")
    for _ in range(repeat):
        os.sync()
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def sysbake(store: Path, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    return run([*SYSBAKE, "--store", str(store), "-q", *map(str, args)])


def podman_env(root: Path) -> tuple[list[str], dict[str, str]]:
    """A podman command line and environment with its own store and config (HOST.md)."""
    root.mkdir(parents=True, exist_ok=True)
    conf = root / "containers.conf"
    conf.write_text(PODMAN_CONF)
    env = dict(os.environ, CONTAINERS_CONF=str(conf))
    cmd = [
        "podman",
        "--root",
        str(root / "storage"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "overlay",
    ]
    return cmd, env


def report(name: str, ours: float, anchor: float, anchor_name: str, goal: float) -> None:
    ratio = ours / anchor if anchor else float("inf")
    verdict = "meets" if ratio <= goal else "misses"
    print(
        f"{name}: sysbake {ours:.2f}s vs {anchor_name} {anchor:.2f}s -> ratio {ratio:.2f} "
        f"(goal <= {goal}; {verdict})",
        flush=True,
    )


# -- shared by bench_run.py and bench_provision.py -------------------------------------------

STORE = WORK / "store"
POLL = 0.02  # seconds between two `systemctl is-system-running` probes, for every engine
BOOTED = ("running", "degraded", "maintenance", "stopping")
BIG_PROJECT = """\
# The example base plus ~800 MB of random data (incompressible): a ~1 GB image.
[images.big]
from = "base:latest"

[[images.big.provision]]
type = "script"
name = "blob"
mode = "chroot"
network = false
run = "head -c 800M /dev/urandom > /srv/blob"
"""


def bench_store() -> Path:
    """WORK/store, kept across runs, with the shared .deb cache and a Salt toolchain dir
    outside it (bench_build.py wipes the store; a toolchain takes minutes to build)."""
    STORE.mkdir(parents=True, exist_ok=True)
    for name in ("debs", "toolchains"):
        (WORK / name).mkdir(exist_ok=True)
        link = STORE / name
        if not link.is_symlink() and not link.exists():
            link.symlink_to(WORK / name)
    return STORE


def ensure_base(store: Path) -> str:
    """The example base, built (or found in the cache) in `store`."""
    sysbake(store, "build", "--target", "base", EXAMPLE)
    return "base:latest"


def ensure_big(store: Path) -> str:
    """The ~1 GB image (`big`: the base plus an 800 MB layer), built once and kept."""
    project = WORK / "big-project"
    project.mkdir(parents=True, exist_ok=True)
    (project / "sysbake.toml").write_text(BIG_PROJECT)
    sysbake(store, "build", "--target", "big", project)
    return "big:latest"


@contextlib.contextmanager
def exit_on_failed_command() -> Iterator[None]:
    """A command that fails ends the benchmark with its command line and the end of its
    stderr, not a traceback."""
    try:
        yield
    except subprocess.CalledProcessError as exc:
        err = exc.stderr
        text = err.decode(errors="replace") if isinstance(err, bytes) else str(err or "")
        cmd = " ".join(map(str, exc.cmd))[:300]
        sys.exit(f"{cmd} failed ({exc.returncode}):\n{text[-3000:]}")


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


SUMMARY: list[str] = []


def result(
    name: str,
    value: float,
    anchor: float,
    anchor_name: str,
    goal: float | None,
    *,
    value_name: str = "sysbake",
    digits: int = 2,
) -> None:
    """Print a `report`-style line and keep it for `print_summary`; `value_name` names
    the measured side when both are sysbake's (say, two image sizes); no `goal`: context."""
    ratio = value / anchor if anchor else float("inf")
    verdict = (
        "no goal, context"
        if goal is None
        else f"goal <= {goal}; {'meets' if ratio <= goal else 'misses'}"
    )
    line = (
        f"{name}: {value_name} {value:.{digits}f}s vs {anchor_name} {anchor:.{digits}f}s "
        f"-> ratio {ratio:.2f} ({verdict})"
    )
    SUMMARY.append(line)
    print(line, flush=True)


def print_summary(title: str, notes: Sequence[str] = ()) -> None:
    """The block to paste into BENCHMARKS.md: every `result` line, then `notes`."""
    print(f"\n== {title} ==", *SUMMARY, *notes, sep="\n", flush=True)


def wait_booted(
    probe: Sequence[str], env: dict[str, str] | None = None, timeout: float = 180.0
) -> str:
    """Run `probe` (a command printing systemd's state) every POLL s until it says the
    system booted or `timeout` s pass; the last state. The same loop for every engine."""
    deadline = time.monotonic() + timeout
    while True:
        out = subprocess.run(
            list(probe), capture_output=True, text=True, env=env, timeout=60, check=False
        )
        lines = out.stdout.strip().splitlines()
        state = lines[-1].strip() if lines else "offline"
        if state in BOOTED or time.monotonic() >= deadline:
            return state
        time.sleep(POLL)


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below `root`, deepest first."""
    prefix = os.fspath(root).rstrip("/")
    with open("/proc/self/mountinfo") as f:
        points = {line.split()[4].replace("\\040", " ") for line in f}
    found = [p for p in points if p == prefix or p.startswith(prefix + "/")]
    return sorted(found, key=lambda p: (-p.count("/"), p))


def pids_using(root: Path) -> list[int]:
    """Processes whose command line names a path under `root` (conmon, podman helpers)."""
    needle = os.fspath(root).encode()
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def release(root: Path) -> None:
    """Stop what still runs from `root` (by pid), unmount below it, delete it."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = pids_using(root)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while pids and time.monotonic() < deadline:
            time.sleep(0.1)
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and "Z" not in _proc_state(p)]
    for _ in range(3):
        for point in mounts_under(root):
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    left = mounts_under(root)
    if left:
        raise RuntimeError(f"still mounted after clean-up: {left}")
    subprocess.run(["rm", "-rf", "--one-file-system", str(root)], check=True)


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


@dataclass(frozen=True)
class Podman:
    """podman with its own config and store under `root` (services.py's set-up: runc,
    no default ulimits, cgroupfs, file events): `cmd` + `env` select them."""

    root: Path
    cmd: tuple[str, ...]
    env: dict[str, str]

    def __call__(
        self, *args: str | os.PathLike[str], check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self.cmd, *map(str, args)],
            env=self.env,
            capture_output=True,
            text=True,
            check=check,
            stdin=subprocess.DEVNULL,
        )


@contextlib.contextmanager
def podman_store(root: Path) -> Iterator[Podman]:
    """A private podman store at `root` (created fresh), removed with all its containers,
    images, processes and mounts when the block ends."""
    if root.exists():
        release(root)
    root.mkdir(parents=True)
    conf, storage = root / "containers.conf", root / "storage.conf"
    conf.write_text(
        PODMAN_CONF + f'events_logfile_path = "{root}/events.log"\n'
        f'tmp_dir = "{root}/tmp"\nstatic_dir = "{root}/graph/libpod"\n'
        f'volume_path = "{root}/graph/volumes"\n\n'
        f'[network]\nnetwork_config_dir = "{root}/networks"\n'
    )
    storage.write_text(
        f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
    )
    env = {**os.environ, "CONTAINERS_CONF": str(conf), "CONTAINERS_STORAGE_CONF": str(storage)}
    podman = Podman(root, ("podman",), env)
    try:
        graph = podman("info", "--format", "{{.Store.GraphRoot}}").stdout.strip()
        if graph != f"{root}/graph":
            raise RuntimeError(f"podman ignored {storage}: graph root {graph}")
        yield podman
    finally:
        podman("rm", "-af", "-t", "5", check=False)
        podman("rmi", "-af", check=False)
        release(root)
