"""Shared helpers for the benchmarks: timing side by side, CLI invocation, podman set-up.

Benchmarks print ratios against their anchors, measured in the same run; they are not
tests and assert nothing about wall-clock time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "web"
SYSBAKE = [sys.executable, "-m", "sysbake.cli"]
WORK = Path(os.environ.get("SYSBAKE_BENCH_ROOT", "/var/tmp/sysbake-bench"))
PODMAN_CONF = """\
[containers]
default_ulimits = []
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
"""


def run(cmd: Sequence[str | os.PathLike[str]], **kw: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([str(c) for c in cmd], check=True, capture_output=True,
                          **kw)  # type: ignore[call-overload, no-any-return]


def timed(fn: Callable[[], object], repeat: int = 1) -> float:
    """Best wall-clock time of `repeat` runs of `fn`, in seconds."""
    best = float("inf")
    for _ in range(repeat):
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
    cmd = ["podman", "--root", str(root / "storage"), "--runroot", str(root / "run"),
           "--storage-driver", "overlay"]
    return cmd, env


def report(name: str, ours: float, anchor: float, anchor_name: str, goal: float) -> None:
    ratio = ours / anchor if anchor else float("inf")
    verdict = "meets" if ratio <= goal else "misses"
    print(f"{name}: sysbake {ours:.2f}s vs {anchor_name} {anchor:.2f}s -> ratio {ratio:.2f} "
          f"(goal <= {goal}; {verdict})", flush=True)
