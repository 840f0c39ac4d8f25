"""No-op rebuild benchmark (issue: architecture).

A no-op `sysbake build` of the bundled example (every image, every stage cached) vs
`podman build` of a two-step Containerfile (FROM the example's `web` image loaded into
podman, one RUN) whose cache hits: goal <= 1.0. Both sides are started as a user starts
them (sysbake through its console script, with its bytecode cached as after an install);
they alternate, the first side changing each round; medians, with every sample printed.

Run as root: .venv/bin/python bench/bench_noop.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    EXAMPLE,
    SYSBAKE,
    WORK,
    bench_store,
    median,
    podman_store,
    print_summary,
    result,
    run,
)

CONTAINERFILE = "FROM localhost/web:latest\nRUN echo cached > /etc/bench-noop\n"
NOTES: list[str] = []


def note(line: str) -> None:
    NOTES.append(line)
    print(line, flush=True)


def seconds(fn: Callable[[], object]) -> float:
    """Wall-clock seconds of one call; dirty pages written back first (as common.timed)."""
    os.sync()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def check_noop(store: Path) -> None:
    """Fail unless a rebuild of the example reuses every stage (else nothing is measured)."""
    out = run([*SYSBAKE, "--store", store, "--json", "build", EXAMPLE])
    rebuilt = [
        f"{image['name']}: {stage['stage']}"
        for image in json.loads(out.stdout)["images"]
        for stage in image["stages"]
        if not stage["reused"]
    ]
    if rebuilt:
        raise SystemExit(f"not a no-op rebuild, stages rebuilt: {', '.join(rebuilt)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=21, help="runs per side (default 21)")
    args = parser.parse_args()
    store = bench_store()
    run([*SYSBAKE, "--store", store, "-q", "build", EXAMPLE])  # every image, all stages
    check_noop(store)
    ctx = WORK / "noop-context"
    ctx.mkdir(parents=True, exist_ok=True)
    (ctx / "Containerfile").write_text(CONTAINERFILE)
    with podman_store(WORK / "podman-noop") as podman:
        run(
            [*SYSBAKE, "--store", store, "-q", "load", "web:latest", "--into", "podman"],
            env=podman.env,
        )
        image_id = podman("build", "-q", "-t", "bench-noop", ctx).stdout.strip()

        def podman_build() -> None:
            again = podman("build", "-q", "-t", "bench-noop", ctx).stdout.strip()
            if again != image_id:
                raise SystemExit(f"podman's cache missed: {again} after {image_id}")

        def sysbake_build() -> None:
            run([*SYSBAKE, "--store", store, "-q", "build", EXAMPLE])

        sysbake_build()  # warm-up, not counted: bytecode, page cache
        podman_build()
        ours: list[float] = []
        anchor: list[float] = []
        for i in range(args.repeat):
            sides = ((ours, sysbake_build), (anchor, podman_build))
            for samples, fn in sides if i % 2 == 0 else reversed(sides):
                samples.append(seconds(fn))
    note("  samples (ms): sysbake " + ", ".join(f"{t * 1000:.0f}" for t in ours))
    note("  samples (ms): podman " + ", ".join(f"{t * 1000:.0f}" for t in anchor))
    result(
        f"no-op rebuild of examples/web (median of {args.repeat})",
        median(ours),
        median(anchor),
        "podman build (cache hit)",
        1.0,
        digits=3,
    )
    print_summary("bench_noop", NOTES)


if __name__ == "__main__":
    main()
