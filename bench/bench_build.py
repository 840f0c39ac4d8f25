"""Build benchmarks (issue: foundation).

1. Cold base build vs `mmdebstrap` alone into a directory, same inputs, same warm .deb
   cache (goal <= 1.15). The sides alternate over --rounds rounds (the first side of a
   round changes each round); medians, with every sample printed.
2. No-op rebuild (everything cached) vs `podman build` of an equivalent cached
   Containerfile (goal <= 0.5). The no-op rebuild of the whole example against a two-step
   Containerfile on top of it is bench_noop.py's.
3. Peak memory (max RSS) of the sysbake build process (goal < 300 MB).

Run as root: .venv/bin/python bench/bench_build.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import EXAMPLE, WORK, median, podman_env, report, run, sysbake, timed
from sysbake.build.bootstrap import mmdebstrap_command, plan_for
from sysbake.project.load import load_project


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="cold-build rounds (default 3)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    debs = WORK / "debs"
    debs.mkdir(exist_ok=True)
    store = WORK / "store"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    (store / "debs").symlink_to(debs)

    # Warm the .deb cache for both sides.
    sysbake(store, "build", "--target", "base", EXAMPLE)

    spec = load_project(EXAMPLE).image("base").bootstrap
    assert spec is not None, "the example's base image bootstraps"
    plan = plan_for(spec)
    target = WORK / "mmdebstrap-alone"

    def mmdebstrap_alone() -> None:
        shutil.rmtree(target, ignore_errors=True)
        run(mmdebstrap_command(plan, target, debs))

    cold = WORK / "cold-store"

    def cold_build() -> None:
        # A store that has never seen this image (only the .deb cache is shared): with
        # --no-cache in the warm store, the identical tree already unpacked there would be
        # deleted as part of the build and counted against sysbake.
        shutil.rmtree(cold, ignore_errors=True)
        cold.mkdir()
        (cold / "debs").symlink_to(debs)
        sysbake(cold, "build", "--target", "base", EXAMPLE)

    anchors: list[float] = []
    builds: list[float] = []
    for i in range(args.rounds):
        for side in ("anchor", "ours") if i % 2 == 0 else ("ours", "anchor"):
            if side == "anchor":
                anchors.append(timed(mmdebstrap_alone))
                shutil.rmtree(target, ignore_errors=True)
            else:
                builds.append(timed(cold_build))
                shutil.rmtree(cold, ignore_errors=True)
    print(
        "  cold build seconds per round: sysbake "
        + ", ".join(f"{t:.1f}" for t in builds)
        + "; mmdebstrap alone "
        + ", ".join(f"{t:.1f}" for t in anchors),
        flush=True,
    )
    report("cold base build", median(builds), median(anchors), "mmdebstrap alone", 1.15)

    # No-op rebuild vs a cached podman build of the same rootfs.
    podman, env = podman_env(WORK / "podman")
    ctx = WORK / "podman-ctx"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir()
    sysbake(
        store,
        "export",
        "base",
        "--format",
        "rootfs",
        "--compression",
        "none",
        "-o",
        ctx / "rootfs.tar",
    )
    (ctx / "Containerfile").write_text(
        "FROM scratch\nADD rootfs.tar /\nENV container=oci\nSTOPSIGNAL SIGRTMIN+3\n"
        'CMD ["/lib/systemd/systemd"]\n'
    )

    def podman_build() -> None:
        run([*podman, "build", "-q", "-t", "bench-base", str(ctx)], env=env)

    podman_build()  # fill podman's cache
    anchor = timed(podman_build, repeat=3)
    ours = timed(lambda: sysbake(store, "build", "--target", "base", EXAMPLE), repeat=3)
    report("no-op rebuild", ours, anchor, "podman build (cached)", 0.5)
    subprocess.run([*podman, "rmi", "-af"], env=env, capture_output=True, check=False)

    # Peak memory of the build process itself (its children are mmdebstrap, tar, ...).
    code = (
        "import resource,sys; from sysbake.cli import main; "
        "rc = main(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
        "sys.exit(rc)"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "--store",
            str(store),
            "-q",
            "build",
            "--no-cache",
            "-t",
            "base",
            str(EXAMPLE),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    peak_mb = int(out.stderr.strip().splitlines()[-1]) / 1024
    print(f"peak memory of the build process: {peak_mb:.0f} MB (goal < 300 MB)", flush=True)


if __name__ == "__main__":
    main()
