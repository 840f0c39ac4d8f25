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
import gzip
import json
import subprocess
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
    median,
    podman_store,
    print_summary,
    release,
    result,
    run,
)
from sysbake import overlay, salt
from sysbake.commit import commit_tree
from sysbake.provision import prune_copy_ups
from sysbake.store import Store

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
# Salt's config, state tree and pillar into the image; /sysbake rather than /run/sysbake,
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


def podman_contexts(toolchain: salt.Toolchain, project: Path) -> tuple[Path, Path]:
    """Two build contexts: one for a Salt-ready base (the toolchain COPYed in: built once,
    a cached earlier layer), one for the pillar-dependent salt-call."""
    ready, ctx = WORK / "podman-ctx-salt", WORK / "podman-ctx-prov"
    for d in (ready, ctx):
        if d.exists():
            release(d)
        d.mkdir()
    # Hard links: the context costs nothing, podman copies the bytes into its layer.
    run(["cp", "-al", toolchain.path, ready / "toolchain"])
    (ready / "Containerfile").write_text(
        f"FROM localhost/base:latest\nCOPY toolchain/ {PODMAN_DIR}/salt/\n")
    plan = salt.SaltRun(toolchain, state_trees=(project / "salt",),
                        pillar=(project / "pillar",))
    for path, data in plan.config_files().items():
        host = ctx / "conf" / path.removeprefix(salt.CONF_DIR + "/")
        host.parent.mkdir(parents=True, exist_ok=True)
        host.write_bytes(data.replace(salt.RUN_DIR.encode(), PODMAN_DIR.encode()))
    command = [arg.replace(salt.RUN_DIR, PODMAN_DIR) for arg in plan.command()]
    env = [f"{k}={v}" for k, v in plan.env().items()]
    script = f'/usr/bin/env -i "$@"; rc=$?; rm -rf {PODMAN_DIR}/var; exit $rc'
    runline = json.dumps(["/bin/sh", "-c", script, "salt-call", *env, *command])
    (ctx / "Containerfile").write_text(
        "FROM localhost/bench-salt:latest\n"
        f"COPY conf/ {PODMAN_DIR}/conf/\n"
        f"COPY salt/ {PODMAN_DIR}/srv/salt/0/\n"
        f"COPY pillar/ {PODMAN_DIR}/srv/pillar/0/\n"
        f"RUN {runline}\n")
    run(["cp", "-a", project / "salt", ctx / "salt"])
    run(["cp", "-a", project / "pillar", ctx / "pillar"])
    return ready, ctx


def podman_build(podman: Podman, ctx: Path, tag: str) -> float:
    # The build runs under runc (containers.conf), cgroupfs, no ulimits; --network none
    # like sysbake's step (network = false): Salt needs none here.
    start = time.perf_counter()
    podman("build", "-q", "--layers", "--pull=never", "--network", "none", "-t", tag, ctx)
    return time.perf_counter() - start


def sysbake_build(store: Path, project: Path, target: str) -> float:
    start = time.perf_counter()
    run([*SYSBAKE, "--store", store, "-q", "build", "-t", target, project])
    return time.perf_counter() - start


def stored_file(store: Path, ref: str, member: str) -> str:
    """`member` of the top layer of stored image `ref` (a small gzip layer)."""
    layer = Store(store).resolve(ref).layers[-1]
    path = Store(store).blob_path(layer.blob.digest)
    with gzip.open(path) as plain, tarfile.open(fileobj=plain, mode="r|") as tar:
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
        run([*SYSBAKE, "--store", store, "-q", "load", "base:latest", "--into", "podman"],
            env=podman.env)
        ready, ctx = podman_contexts(toolchain, project)
        try:
            podman("build", "-q", "--pull=never", "-t", "bench-salt", ready)
            times: dict[str, list[float]] = {"chroot": [], "boot": [], "podman": []}
            message = ""
            for i in range(repeat + 1):  # the first round fills the caches: not counted
                message = f"pillar revision {i} {uuid.uuid4().hex[:8]}"
                set_pillar(project, message)
                run(["cp", "-a", f"{project}/pillar/.", ctx / "pillar"])
                sides = [("chroot", lambda: sysbake_build(store, project, "prov-chroot")),
                         ("boot", lambda: sysbake_build(store, project, "prov-boot")),
                         ("podman", lambda: podman_build(podman, ctx, "bench-prov"))]
                for side, measure in sides[i % 3:] + sides[:i % 3]:
                    seconds = measure()
                    if i:
                        times[side].append(seconds)
            for side, values in times.items():
                print(f"  {side}: " + ", ".join(f"{v:.2f}" for v in values), flush=True)
            # Both sides really applied the last pillar.
            theirs = podman("run", "--rm", "--network", "none", "--pull=never",
                            "localhost/bench-prov", "cat", "/etc/bench-motd").stdout.strip()
            for side, got in (("podman", theirs),
                              ("sysbake chroot", stored_file(store, "prov-chroot:latest",
                                                             "etc/bench-motd").strip()),
                              ("sysbake boot", stored_file(store, "prov-boot:latest",
                                                           "etc/bench-motd").strip())):
                if got != message:
                    NOTES.append(f"WARNING: {side} image has /etc/bench-motd {got!r}, "
                                 f"expected {message!r}")
                    print(NOTES[-1], flush=True)
        finally:
            for d in (ready, ctx):
                release(d)
    result("pillar-only rebuild (salt step, chroot mode)", median(times["chroot"]),
           median(times["podman"]), "podman build (cached salt, pillar COPY + RUN)", 0.8)
    result("pillar-only rebuild (salt step, boot mode)", median(times["boot"]),
           median(times["podman"]), "podman build (cached salt, pillar COPY + RUN)", 0.8)


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
        for i in range(repeat + 1):  # round 0 warms up (unpacks trees): not counted
            for ref in (small, big) if i % 2 == 0 else (big, small):
                seconds = capture_seconds(store, ref, scratch, commits)
                (project / "sysbake.toml").write_text(
                    CAPTURE_PROJECT.format(nonce=uuid.uuid4().hex))
                target = "one-small" if ref == small else "one-big"
                build = sysbake_build(store_path, project, target)
                if i:
                    fast[ref].append(seconds)
                    whole[ref].append(build)
    finally:
        for d in (scratch, commits_dir):
            if d.exists():
                release(d)
    for ref in (small, big):
        print(f"  {ref}: capture " + ", ".join(f"{v * 1000:.1f}ms" for v in fast[ref])
              + "; whole build " + ", ".join(f"{v:.2f}s" for v in whole[ref]), flush=True)
    result("capture of a one-file step (prune + commit), ~1 GB vs ~200 MB image",
           median(fast[big]), median(fast[small]), "on the 200 MB image", 1.1,
           value_name="on the 1 GB image", digits=4)
    result("whole build of a one-file chroot step, ~1 GB vs ~200 MB image",
           median(whole[big]), median(whole[small]), "on the 200 MB image", 1.1,
           value_name="on the 1 GB image")


NOTES: list[str] = []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="measured runs per side")
    args = parser.parse_args()
    store = bench_store()
    try:
        ensure_base(store)
        ensure_big(store)
        pillar_rebuild(store, args.repeat)
        capture(store, max(args.repeat, 5))
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) \
            else str(exc.stderr or "")
        sys.exit(f"{' '.join(map(str, exc.cmd))[:300]} failed ({exc.returncode}):\n"
                 f"{err[-3000:]}")
    print_summary("bench_provision", NOTES)


if __name__ == "__main__":
    main()
