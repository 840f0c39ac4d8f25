"""Provisioning benchmarks (issue: provisioning).

1. Rebuild after a pillar-only change vs `podman build` of an equivalent Containerfile,
   FROM the same base, the same salt-call in a RUN (goal <= 0.8). The Salt step runs in a
   chroot (`mode = "chroot"`: like a RUN, no systemd); the default boot mode is shown
   against the same anchor.
2. Capturing a step's layer costs O(changed files), not O(rootfs): a step writing one file
   on the ~200 MB base and on a ~1 GB image; the capture alone (prune + commit of the
   step's upper dir) and the whole `sysbake build` of the step (goal: ratio ~1.0, <= 1.1
   for noise).

Run as root: .venv/bin/python bench/bench_provision.py [--repeat N]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tarfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    SYSBAKE,
    WORK,
    Podman,
    bench_store,
    ensure_base,
    ensure_big,
    exit_on_failed_command,
    median,
    podman_store,
    print_summary,
    release,
    result,
    run,
)
from sysbake.build.salt import run as salt
from sysbake.build.steps import prune_copy_ups
from sysbake.oci import compress
from sysbake.oci.layers.commit import commit_tree
from sysbake.oci.store import Store
from sysbake.runtime import overlay

# -- 1. pillar-only rebuild ---------------------------------------------------------------

STATE = """\
# Salt's own work dominates equally on both sides: a package check already satisfied
# (no index refresh: no network on either side) and a file rendered from the pillar.
procps:
  pkg.installed:
    - refresh: False

/etc/bench-motd:
  file.managed:
    - contents: "{{ pillar['bench']['message'] }}\\n"
    - require:
      - pkg: procps
"""
PROJECT = """\
[images.prov-chroot]
from = "base:latest"

[[images.prov-chroot.provision]]
type = "salt"
name = "bench"
state_tree = "salt"
pillar = "pillar"
mode = "chroot"
network = false

[images.prov-boot]
from = "base:latest"

[[images.prov-boot.provision]]
type = "salt"
name = "bench"
state_tree = "salt"
pillar = "pillar"
mode = "boot"
network = false
"""
# podman has no read-only bind mount that its layer cache sees, so the podman side COPYs
# Salt's config, state tree and pillar into the image, in one COPY (each COPY costs podman
# ~0.6 s even on a cache hit: one is its fastest way); at /sysbake rather than /run/sysbake,
# whatever the build runtime mounts on /run. Salt's scratch (var/) is removed in the same
# RUN, as sysbake's tmpfs does.
PODMAN_DIR = "/sysbake"


def write_project(project: Path, message: str) -> None:
    for sub in ("salt/bench", "pillar"):
        (project / sub).mkdir(parents=True, exist_ok=True)
    (project / "sysbake.toml").write_text(PROJECT)
    (project / "salt/top.sls").write_text("base:\n  '*':\n    - bench\n")
    (project / "salt/bench/init.sls").write_text(STATE)
    (project / "pillar/top.sls").write_text("base:\n  '*':\n    - bench\n")
    set_pillar(project, message)


def set_pillar(project: Path, message: str) -> None:
    (project / "pillar/bench.sls").write_text(f"bench:\n  message: {json.dumps(message)}\n")


def whole_seconds(tree: Path) -> None:
    """Truncate every mtime under `tree` to whole seconds. podman's COPY rounds mtimes to
    the nearest second: half of the toolchain's .pyc files would then be stale, recompiled
    by every RUN and carried in its layer (14 MB). Python compares whole seconds, so the
    truncated copy keeps them valid and podman is not penalised."""
    for dirpath, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            path = os.path.join(dirpath, name)
            mtime = os.lstat(path).st_mtime_ns // 10**9 * 10**9
            os.utime(path, ns=(mtime, mtime), follow_symlinks=False)
    mtime = os.lstat(tree).st_mtime_ns // 10**9 * 10**9
    os.utime(tree, ns=(mtime, mtime))


def podman_contexts(toolchain: salt.Toolchain, project: Path, ready: Path, ctx: Path) -> None:
    """Two build contexts: `ready` for a Salt-ready base (the toolchain COPYed in: built
    once, a cached earlier layer), `ctx` for the pillar-dependent salt-call."""
    for d in (ready, ctx):
        if d.exists():
            release(d)
        d.mkdir()
    run(["cp", "-a", toolchain.path, ready / "toolchain"])
    whole_seconds(ready / "toolchain")
    (ready / "Containerfile").write_text(
        f"FROM localhost/base:latest\nCOPY toolchain/ {PODMAN_DIR}/salt/\n"
    )
    plan = salt.SaltRun(toolchain, state_trees=(project / "salt",), pillar=(project / "pillar",))
    for path, data in plan.config_files().items():
        host = ctx / "sysbake/conf" / path.removeprefix(salt.CONF_DIR + "/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data.replace(salt.RUN_DIR.encode(), PODMAN_DIR.encode()))
    command = [arg.replace(salt.RUN_DIR, PODMAN_DIR) for arg in plan.command()]
    env = [f"{k}={v}" for k, v in plan.env().items()]
    script = f'/usr/bin/env -i "$@"; rc=$?; rm -rf {PODMAN_DIR}/var; exit $rc'
    runline = json.dumps(["/bin/sh", "-c", script, "salt-call", *env, *command])
    (ctx / "Containerfile").write_text(
        f"FROM localhost/bench-salt:latest\nCOPY sysbake/ {PODMAN_DIR}/\nRUN {runline}\n"
    )
    for sub in ("salt", "pillar"):
        (ctx / "sysbake/srv" / sub).mkdir(parents=True)
    run(["cp", "-a", project / "salt", ctx / "sysbake/srv/salt/0"])
    run(["cp", "-a", project / "pillar", ctx / "sysbake/srv/pillar/0"])


def podman_build(podman: Podman, ctx: Path, tag: str) -> float:
    # The build runs under runc (containers.conf), cgroupfs, no ulimits; --network none
    # like sysbake's step (network = false): Salt needs none here.
    start = time.perf_counter()
    podman("build", "-q", "--layers", "--pull=never", "--network", "none", "-t", tag, ctx)
    return time.perf_counter() - start


def sysbake_build(store: Path, project: Path, target: str) -> float:
    start = time.perf_counter()
    run([*SYSBAKE, "--store", store, "-q", "build", "--target", target, project])
    return time.perf_counter() - start


def stored_file(store: Path, ref: str, member: str) -> str:
    """`member` of the top layer of stored image `ref` (a small layer)."""
    images = Store(store)
    layer = images.resolve(ref).layers[-1]
    with (
        images.open_blob(layer.blob.digest) as raw,
        compress.decompressor(layer.compression, raw) as plain,
        tarfile.open(fileobj=io.BytesIO(plain.read()), mode="r:") as tar,
    ):
        for entry in tar:
            if entry.name.lstrip("./") == member:
                f = tar.extractfile(entry)
                return f.read().decode() if f else ""
    return ""


def pillar_rebuild(store: Path, repeat: int) -> None:
    project = WORK / "prov-project"
    write_project(project, "warm-up")
    toolchain = salt.ensure_toolchain(Store(store))
    with podman_store(WORK / "podman-prov") as podman:
        run(
            [*SYSBAKE, "--store", store, "-q", "load", "base:latest", "--into", "podman"],
            env=podman.env,
        )
        ready, ctx = WORK / "podman-ctx-salt", WORK / "podman-ctx-prov"
        try:
            podman_contexts(toolchain, project, ready, ctx)
            podman("build", "-q", "--pull=never", "-t", "bench-salt", ready)
            times: dict[str, list[float]] = {"chroot": [], "boot": [], "podman": []}
            message = ""
            for i in range(repeat + 1):  # the first round fills the caches: not counted
                message = f"pillar revision {i} {uuid.uuid4().hex[:8]}"
                set_pillar(project, message)
                run(["cp", "-a", f"{project}/pillar/.", ctx / "sysbake/srv/pillar/0"])
                # Rotate who goes first: none always meets a warmer page cache.
                sides = ["chroot", "boot", "podman"]
                for side in sides[i % 3 :] + sides[: i % 3]:
                    seconds = (
                        podman_build(podman, ctx, "bench-prov")
                        if side == "podman"
                        else sysbake_build(store, project, f"prov-{side}")
                    )
                    if i:
                        times[side].append(seconds)
            for side, values in times.items():
                print(f"  {side}: " + ", ".join(f"{v:.2f}" for v in values), flush=True)
            # Both sides really applied the last pillar.
            theirs = podman(
                "run",
                "--rm",
                "--network",
                "none",
                "--pull=never",
                "localhost/bench-prov",
                "cat",
                "/etc/bench-motd",
            ).stdout.strip()
            for side, got in (
                ("podman", theirs),
                (
                    "sysbake chroot",
                    stored_file(store, "prov-chroot:latest", "etc/bench-motd").strip(),
                ),
                ("sysbake boot", stored_file(store, "prov-boot:latest", "etc/bench-motd").strip()),
            ):
                if got != message:
                    NOTES.append(
                        f"WARNING: {side} image has /etc/bench-motd {got!r}, expected {message!r}"
                    )
                    print(NOTES[-1], flush=True)
        finally:
            for d in (ready, ctx):
                if d.exists():
                    release(d)
    anchor = "podman build (salt cached; COPY + RUN salt-call)"
    result(
        "pillar-only rebuild (salt step, chroot mode)",
        median(times["chroot"]),
        median(times["podman"]),
        anchor,
        0.8,
    )
    result(
        "pillar-only rebuild (salt step, boot mode, the default)",
        median(times["boot"]),
        median(times["podman"]),
        anchor,
        0.8,
    )


# -- 2. capturing a one-file step ---------------------------------------------------------

CAPTURE_PROJECT = """\
[images.one-small]
from = "base:latest"

[[images.one-small.provision]]
type = "script"
name = "one-file"
mode = "chroot"
network = false
run = "echo {nonce} > /etc/one-file"

[images.one-big]
from = "big:latest"

[[images.one-big.provision]]
type = "script"
name = "one-file"
mode = "chroot"
network = false
run = "echo {nonce} > /etc/one-file"
"""


CAPTURE_ROUNDS = 15


def capture_seconds(store: Store, ref: str, scratch: Path, commits: Store) -> float:
    """Write one file through an overlay of `ref` (as a step would), then time only what
    a build does to capture it: prune the upper dir and commit it as a layer."""
    lowerdirs = [store.layer_tree(layer) for layer in store.resolve(ref).layers]
    if scratch.exists():
        release(scratch)
    upper, work, root = scratch / "upper", scratch / "work", scratch / "root"
    for d in (upper, work, root):
        d.mkdir(parents=True)
    overlay.mount_overlay(lowerdirs, upper, work, root)
    try:
        (root / "etc/one-file").write_text(f"{uuid.uuid4().hex}\n")
    finally:
        overlay.umount(root)
    start = time.perf_counter()
    prune_copy_ups(upper, lowerdirs)
    commit_tree(commits, upper, overlay_upper=True)
    seconds = time.perf_counter() - start
    release(scratch)
    return seconds


def capture(store_path: Path, repeat: int) -> None:
    store = Store(store_path)
    small, big = "base:latest", "big:latest"
    scratch, commits_dir = WORK / "capture-scratch", WORK / "capture-store"
    project = WORK / "capture-project"
    project.mkdir(parents=True, exist_ok=True)
    commits = Store(commits_dir).ensure()
    fast: dict[str, list[float]] = {small: [], big: []}
    whole: dict[str, list[float]] = {small: [], big: []}
    try:
        # Tens of milliseconds, mostly the blob's fsync: many rounds for a stable median.
        # Round 0 warms up (unpacks trees, fills the page cache): not counted.
        for i in range(CAPTURE_ROUNDS + 1):
            for ref in (small, big) if i % 2 == 0 else (big, small):
                seconds = capture_seconds(store, ref, scratch, commits)
                if i:
                    fast[ref].append(seconds)
        for i in range(repeat + 1):
            for ref in (small, big) if i % 2 == 0 else (big, small):
                (project / "sysbake.toml").write_text(
                    CAPTURE_PROJECT.format(nonce=uuid.uuid4().hex)
                )
                seconds = sysbake_build(
                    store_path, project, "one-small" if ref == small else "one-big"
                )
                if i:
                    whole[ref].append(seconds)
    finally:
        for d in (scratch, commits_dir):
            if d.exists():
                release(d)
    for ref in (small, big):
        print(
            f"  {ref}: capture "
            + ", ".join(f"{v * 1000:.0f}ms" for v in fast[ref])
            + "; whole build "
            + ", ".join(f"{v:.2f}s" for v in whole[ref]),
            flush=True,
        )
    result(
        "capture of a one-file step (prune + commit), ~1 GB vs ~200 MB image",
        median(fast[big]),
        median(fast[small]),
        "on the 200 MB image",
        1.1,
        value_name="on the 1 GB image",
        digits=3,
    )
    result(
        "whole build of a one-file chroot step, ~1 GB vs ~200 MB image",
        median(whole[big]),
        median(whole[small]),
        "on the 200 MB image",
        1.1,
        value_name="on the 1 GB image",
    )


NOTES: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="measured runs per side")
    args = parser.parse_args()
    store = bench_store()
    with exit_on_failed_command():
        ensure_base(store)
        ensure_big(store)
        pillar_rebuild(store, args.repeat)
        capture(store, args.repeat)
    print_summary("bench_provision", NOTES)


if __name__ == "__main__":
    main()
