"""Shared helpers of the integration tests (imported as `helpers`; pytest puts this
directory on sys.path)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "web"
SYSBAKE = [sys.executable, "-m", "sysbake.cli"]
TEST_ROOT = Path(os.environ.get("SYSBAKE_TEST_ROOT", "/var/tmp/sysbake-test"))


def sysbake(
    *args: str | os.PathLike[str],
    store: Path,
    check: bool = True,
    timeout: float = 1800,
    **kw: object,
) -> subprocess.CompletedProcess[str]:
    """Run the sysbake CLI against `store`; output captured as text."""
    cmd = [*SYSBAKE, "--store", str(store), *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, **kw)  # type: ignore[call-overload]
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
        )
    return result  # type: ignore[no-any-return]


def new_store(path: Path, *, share: tuple[str, ...] = ("debs", "toolchains")) -> Path:
    """A store directory sharing the run-independent caches (.debs, Salt toolchains)."""
    path.mkdir(parents=True, exist_ok=True)
    # Caches that only save downloads and compile time are shared across runs.
    for name in share:
        shared = TEST_ROOT / name
        shared.mkdir(parents=True, exist_ok=True)
        if not (path / name).exists():
            (path / name).symlink_to(shared)
    return path
