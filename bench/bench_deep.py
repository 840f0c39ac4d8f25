"""Deep images benchmarks (issue 16).

1. `run -d` to `running`: the 201-layer image (the example base plus 200 small chroot
   steps) vs a one-layer image with the same files (`sysbake squash` of it), goal <= 1.1.
   The same probe as bench_run.py (`systemctl is-system-running --wait` in PID 1's
   namespaces), both images' trees unpacked first, interleaved; medians.
2. Cold build of the 200-step project, per step (`build --no-cache`: the base stays, every
   step runs and is committed) vs `podman build --no-cache --layers` of a Containerfile
   with the same RUN lines, per RUN (goal <= 1.0). podman 4.3.1 mounts at most 128 layers
   ("max depth exceeded"), so its Containerfile holds the first 127 of the RUN lines (the
   base is its 128th layer); a podman that takes more gets all 200.

Run as root: .venv/bin/python bench/bench_deep.py [--repeat N] [--boots N] [--only boot|build]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import Sysbake
from common import (
    SYSBAKE,
    WORK,
    Podman,
    bench_store,
    ensure_base,
    exit_on_failed_command,
    median,
    podman_store,
    print_summary,
    result,
    run,
    sysbake,
)

STEPS = 200
PODMAN_MAX_LAYERS = 128  # podman 4.3.1: containers/storage's overlay "max depth"
DEEP, FLAT = "bench-deep:latest", "bench-deep-flat:latest"
NOTES: list[str] = []


def script(i: int) -> str:
    """Step i: a file in /etc or /srv (a few steps delete, overwrite or replace a dir)."""
    special = {
        60: "rm -rf /srv/deep && mkdir -p /srv/deep && echo reborn > /srv/deep/marker",
        120: "rm /etc/deep.d/001",
        150: "echo changed > /etc/deep.d/003",
    }
    where = "/etc/deep.d" if i % 2 else "/srv/deep"
    return special.get(i, f"mkdir -p {where} && echo {i} > {where}/{i:03}")


def write_project(project: Path) -> None:
    project.mkdir(parents=True, exist_ok=True)
    steps = "".join(
        f'\n[[images.deep.provision]]\ntype = "script"\nname = "s{i:03}"\nmode = "chroot"\n'
        f"network = false\nrun = {json.dumps(script(i))}\n"
        for i in range(1, STEPS + 1)
    )
    (project / "sysbake.toml").write_text(
        f'[images.deep]\nfrom = "base:latest"\ntag = "{DEEP}"\n{steps}'
    )


# -- 1. run -d to running ---------------------------------------------------------------------


def boot(store: Path, repeat: int) -> None:
    sysbake(store, "squash", DEEP, FLAT)
    runner = Sysbake(store)
    times: dict[str, list[float]] = {DEEP: [], FLAT: []}
    try:
        for image in (DEEP, FLAT):  # unpacks the squashed layer's tree: not counted
            runner.boot(image)
        for i in range(repeat):
            for image in (DEEP, FLAT) if i % 2 == 0 else (FLAT, DEEP):
                booted = runner.boot(image)
                if booted.state != "running":
                    NOTES.append(f"WARNING: {image} booted to {booted.state!r}")
                times[image].append(booted.running)
    finally:
        runner.cleanup()
    for image, values in times.items():
        print(f"  {image}: " + ", ".join(f"{v:.2f}" for v in values), flush=True)
    result(
        "run -d to running, 201 layers vs the same files in one layer",
        median(times[DEEP]),
        median(times[FLAT]),
        "the squashed image",
        1.1,
        value_name="201 layers",
    )


# -- 2. cold build, per step --------------------------------------------------------------------


def podman_steps(podman: Podman) -> int:
    """The RUN lines podman can stack on the base: all 200, or up to its layer limit."""
    version = podman("version", "--format", "{{.Client.Version}}").stdout.strip()
    major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else 0
    limit = PODMAN_MAX_LAYERS - 1 if major <= 4 else STEPS
    NOTES.append(f"podman {version}: {limit} RUN lines on the one-layer base")
    return limit


def cold_build(store: Path, project: Path, repeat: int) -> None:
    ours: list[float] = []
    theirs: list[float] = []
    with podman_store(WORK / "podman-deep") as podman:
        run(
            [*SYSBAKE, "--store", store, "-q", "load", "base:latest", "--into", "podman"],
            env=podman.env,
        )
        count = podman_steps(podman)
        ctx = WORK / "podman-ctx-deep"
        ctx.mkdir(parents=True, exist_ok=True)
        lines = [f"RUN {script(i)}" for i in range(1, count + 1)]
        (ctx / "Containerfile").write_text("FROM localhost/base:latest\n" + "\n".join(lines) + "\n")
        for i in range(repeat):
            sides = ("sysbake", "podman") if i % 2 == 0 else ("podman", "sysbake")
            for side in sides:
                if side == "sysbake":
                    start = time.perf_counter()
                    sysbake(store, "build", "--no-cache", project)
                    ours.append((time.perf_counter() - start) / STEPS)
                else:
                    start = time.perf_counter()
                    podman(
                        "build",
                        "-q",
                        "--no-cache",
                        "--layers",
                        "--pull=never",
                        "--network",
                        "none",
                        "-t",
                        "bench-deep",
                        ctx,
                    )
                    theirs.append((time.perf_counter() - start) / count)
                    podman("rmi", "-f", "localhost/bench-deep", check=False)
    print("  sysbake s/step: " + ", ".join(f"{v:.3f}" for v in ours), flush=True)
    print("  podman s/RUN: " + ", ".join(f"{v:.3f}" for v in theirs), flush=True)
    result(
        "cold build of the 200-step project, per step",
        median(ours),
        median(theirs),
        "podman build, per RUN line",
        1.0,
        digits=3,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="measured builds per side")
    parser.add_argument("--boots", type=int, default=10, help="measured boots per image")
    parser.add_argument("--only", choices=("boot", "build"), help="one of the two benchmarks")
    args = parser.parse_args()
    store = bench_store()
    project = WORK / "deep-project"
    with exit_on_failed_command():
        ensure_base(store)
        write_project(project)
        sysbake(store, "build", project)
        if args.only != "build":
            boot(store, args.boots)
        if args.only != "boot":
            cold_build(store, project, args.repeat)
    print_summary("bench_deep", NOTES)


if __name__ == "__main__":
    main()
