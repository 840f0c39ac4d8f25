"""Runtime benchmarks (issue: runtime).

1. Boot to `running`, and stop, vs `podman run --systemd=always` of the same image on the
   same machine (goal <= 1.0 for both). Boot: from the start of `run -d` until `systemctl
   is-system-running --wait` says `running`, one engine-neutral probe for both sides
   (`nsenter` into PID 1's mount and pid namespaces; PID 1 found from sysbake's state
   file and from podman's conmon pid file), so neither side's `exec` start-up is counted
   as boot time; each engine's own `exec` is timed on its own row. Stop: `sysbake stop`
   vs `podman stop -t 10`, both through SIGRTMIN+3, PID 1 exiting 0. Repeated,
   interleaved; medians.
2. `run` costs the same for a ~200 MB and a ~1 GB image (goal: ratio ~1.0, <= 1.1 for
   noise): containers are overlay mounts of unpacked layer trees, never copies. The one-off
   cost of unpacking the 800 MB layer into its tree is shown on its own.

Run as root: .venv/bin/python bench/bench_run.py [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
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
    result,
    run,
    wait_booted,
)
from sysbake.oci import compress
from sysbake.oci.layers import archive as layers
from sysbake.oci.store import Store


@dataclass(frozen=True)
class Boot:
    """One container's life: seconds until `run -d` returned, until running, to stop."""

    returned: float
    running: float
    state: str
    probe: float = 0.0  # one `exec ... systemctl is-system-running` once booted
    stop: float = 0.0
    exit_code: int | None = None
    killed: bool = False

    @property
    def clean(self) -> bool:
        return self.state == "running" and self.exit_code == 0 and not self.killed


class Sysbake:
    """Containers of `store` through the CLI, as a user starts them; remembers every name
    it started so that `cleanup` removes what a failure left running."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.names: list[str] = []

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SYSBAKE, "--store", str(self.store), *args],
            text=True,
            capture_output=True,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    def boot(self, image: str, *, stop: bool = True) -> Boot:
        name = f"bench-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        start = time.perf_counter()
        self.cli("run", "-d", "--name", name, image)
        returned = time.perf_counter() - start
        state_file = self.store / "containers" / name / "state.json"
        state = wait_booted(nsenter_probe(json.loads(state_file.read_text())["pid"]))
        running = time.perf_counter() - start
        probed = probe_seconds(
            [
                *SYSBAKE,
                "--store",
                str(self.store),
                "exec",
                "-T",
                name,
                "systemctl",
                "is-system-running",
            ]
        )
        if not stop:
            self.remove(name)
            return Boot(returned, running, state, probed)
        start = time.perf_counter()
        out = self.cli("--json", "stop", name)
        stopped = time.perf_counter() - start
        outcome = json.loads(out.stdout)[name]
        self.remove(name)
        return Boot(
            returned, running, state, probed, stopped, outcome["exit_code"], outcome["killed"]
        )

    def remove(self, name: str) -> None:
        self.cli("rm", "-f", name)
        self.names.remove(name)

    def cleanup(self) -> None:
        for name in list(self.names):
            self.cli("rm", "-f", name, check=False)
            self.names.remove(name)


def podman_boot(podman: Podman, image: str) -> Boot:
    """The anchor: podman's own recipe for systemd containers, same probe loop."""
    name = f"bench-{uuid.uuid4().hex[:8]}"
    conmon_pidfile = podman.root / f"{name}.conmon.pid"
    start = time.perf_counter()
    try:
        podman(
            "run",
            "-d",
            "--systemd=always",
            "--network",
            "none",
            "--pull",
            "never",
            "--conmon-pidfile",
            str(conmon_pidfile),
            "--name",
            name,
            image,
        )
        returned = time.perf_counter() - start
        state = wait_booted(nsenter_probe(conmon_child(conmon_pidfile)))
        running = time.perf_counter() - start
        probed = probe_seconds(
            [*podman.cmd, "exec", name, "systemctl", "is-system-running"], podman.env
        )
        start = time.perf_counter()
        podman("stop", "-t", "10", name)
        stopped = time.perf_counter() - start
        code = int(podman("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip())
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)
    # podman reports SIGKILL as 137; a stop that took the whole timeout was a kill too.
    return Boot(returned, running, state, probed, stopped, code, code == 137 or stopped >= 10)


def nsenter_probe(pid: int) -> list[str]:
    """`systemctl is-system-running --wait` in the mount and pid namespaces of PID 1 (`pid`
    on the host): the same probe whatever engine started the container. --wait returns the
    moment the boot ends (only "offline" earlier, while systemd's socket is not up), so
    the time is not rounded up to the polling interval."""
    return [
        "nsenter",
        "--target",
        str(pid),
        "--mount",
        "--pid",
        "systemctl",
        "is-system-running",
        "--wait",
    ]


def conmon_child(pidfile: Path) -> int:
    """PID 1 of a podman container: the child of its conmon (a subreaper)."""
    conmon = pidfile.read_text().strip()
    children = Path(f"/proc/{conmon}/task/{conmon}/children").read_text().split()
    if len(children) != 1:
        raise SystemExit(f"conmon {conmon} has children {children}: expected PID 1 only")
    return int(children[0])


def probe_seconds(probe: list[str], env: dict[str, str] | None = None) -> float:
    """How long one probe takes: up to this much of a boot time is the probe's latency."""
    start = time.perf_counter()
    subprocess.run(probe, capture_output=True, env=env, check=False)
    return time.perf_counter() - start


def describe(boots: list[Boot], who: str) -> None:
    bad = [b for b in boots if not b.clean]
    for b in bad:
        how = "killed" if b.killed else f"exit code {b.exit_code}"
        print(f"  WARNING {who}: systemd {b.state}, stopped with {how}", flush=True)
    runs = ", ".join(f"{b.running:.2f}/{b.stop:.2f}" for b in boots)
    print(f"  {who} boot/stop seconds per run: {runs}", flush=True)


def boot_and_stop(ours: Sysbake, podman: Podman, image: str, repeat: int) -> None:
    mine: list[Boot] = []
    theirs: list[Boot] = []
    for i in range(repeat):
        # Alternate who goes first: neither side always meets a warmer page cache.
        if i % 2 == 0:
            mine.append(ours.boot(image))
            theirs.append(podman_boot(podman, f"localhost/{image}"))
        else:
            theirs.append(podman_boot(podman, f"localhost/{image}"))
            mine.append(ours.boot(image))
    describe(mine, "sysbake")
    describe(theirs, "podman")
    result(
        "run -d returns",
        median([b.returned for b in mine]),
        median([b.returned for b in theirs]),
        "podman run -d",
        None,
    )
    result(
        "exec of `systemctl is-system-running` once booted",
        median([b.probe for b in mine]),
        median([b.probe for b in theirs]),
        "podman exec",
        None,
    )
    result(
        "boot to running",
        median([b.running for b in mine]),
        median([b.running for b in theirs]),
        "podman run --systemd=always",
        1.0,
    )
    result(
        "stop (SIGRTMIN+3, exit 0)",
        median([b.stop for b in mine]),
        median([b.stop for b in theirs]),
        "podman stop -t 10",
        1.0,
    )
    if any(not b.clean for b in mine + theirs):
        NOTES.append("boot/stop: some runs did not end clean (see WARNING lines above)")


def unpack_seconds(store: Store, ref: str) -> float:
    """Seconds to unpack the top layer of `ref` into a scratch tree, the way the store
    does it the first time a layer is used (then the tree is kept)."""
    layer = store.resolve(ref).layers[-1]
    scratch = WORK / "unpack-scratch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    try:
        start = time.perf_counter()
        with (
            store.open_blob(layer.blob.digest) as raw,
            compress.decompressor(layer.compression, raw) as plain,
        ):
            layers.extract(plain, scratch, overlay=True)
        return time.perf_counter() - start
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", str(scratch)], check=True)


def image_size(store: Store, ref: str) -> str:
    image = store.resolve(ref)
    packed = sum(layer.blob.size for layer in image.layers) / 1e6
    trees = [str(store.tree_path(layer.diff_id)) for layer in image.layers]
    out = subprocess.run(["du", "-scb", *trees], capture_output=True, text=True, check=False)
    unpacked = int(out.stdout.split()[-2]) / 1e6 if out.returncode == 0 else 0.0
    return f"{ref}: {packed:.0f} MB of layers, {unpacked:.0f} MB unpacked"


def size_independence(ours: Sysbake, store_path: Path, small: str, big: str, repeat: int) -> None:
    store = Store(store_path)
    missing = [
        layer for layer in store.resolve(big).layers if not store.tree_path(layer.diff_id).exists()
    ]
    if missing:
        # Layers made by a provision step are unpacked when first used.
        first = ours.boot(big, stop=False)
        note(
            f"first run of {big} (unpacks {len(missing)} layer tree(s) first): run -d "
            f"returned in {first.returned:.2f}s"
        )
    note(
        f"unpacking the 800 MB layer of {big} into its tree (once per layer, not per run): "
        f"{unpack_seconds(store, big):.2f}s"
    )
    note(image_size(store, small))
    note(image_size(store, big))
    runs: dict[str, list[Boot]] = {small: [], big: []}
    for i in range(repeat):
        for ref in (small, big) if i % 2 == 0 else (big, small):
            runs[ref].append(ours.boot(ref, stop=False))
    for ref, boots in runs.items():
        print(
            f"  {ref} returned/running seconds per run: "
            + ", ".join(f"{b.returned:.2f}/{b.running:.2f}" for b in boots),
            flush=True,
        )
        states = {b.state for b in boots} - {"running"}
        if states:
            print(f"  WARNING {ref}: systemd ended in {sorted(states)}", flush=True)
    result(
        "run -d returns, ~1 GB vs ~200 MB image",
        median([b.returned for b in runs[big]]),
        median([b.returned for b in runs[small]]),
        "sysbake on the 200 MB image",
        1.1,
        value_name="sysbake on the 1 GB image",
    )
    result(
        "run -d to running, ~1 GB vs ~200 MB image",
        median([b.running for b in runs[big]]),
        median([b.running for b in runs[small]]),
        "sysbake on the 200 MB image",
        1.1,
        value_name="sysbake on the 1 GB image",
    )


NOTES: list[str] = []


def note(line: str) -> None:
    NOTES.append(line)
    print(line, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per side (default 5)")
    args = parser.parse_args()
    store = bench_store()
    small = ensure_base(store)
    big = ensure_big(store)
    ours = Sysbake(store)
    podman_root = WORK / "podman-run"
    try:
        with podman_store(podman_root) as podman:
            run(
                [*SYSBAKE, "--store", store, "-q", "load", small, "--into", "podman"],
                env=podman.env,
            )
            ours.boot(small)  # warm-up, not counted: first use of the page cache, runc...
            podman_boot(podman, f"localhost/{small}")
            boot_and_stop(ours, podman, small, args.repeat)
        size_independence(ours, store, small, big, args.repeat)
    finally:
        ours.cleanup()
    print_summary("bench_run", NOTES)


if __name__ == "__main__":
    main()
