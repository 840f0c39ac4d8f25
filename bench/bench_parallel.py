"""Parallel builds (issue 12, part 4): `sysbake build -j 2` of two independent images
against `-j 1` of the same project, side by side in one run (goal <= 0.7 of the time).

Both images start `from = "base:latest"` (the example base, built or found in the bench
store) and have the same kind of work, CPU and IO as real provisioning is, no sleeps:
1. a Salt run in a chroot (salt-call's start-up, 150 files rendered from Jinja and written,
   a package check against dpkg's database);
2. a script that hashes every file under /usr and packs /usr/share with gzip, as a
   step that builds an artifact does; its layer (tens of MB) is then compressed in turn.
Each round rebuilds both images (`--no-cache`: the base is not rebuilt, it is an image in
the store), once with -j 1 and once with -j 2, in alternating order.

Run as root, when the machine is quiet: .venv/bin/python bench/bench_parallel.py [--repeat N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SYSBAKE, WORK, bench_store, ensure_base, median, print_summary, result, run

STATE = """\
{% for i in range(150) %}
/srv/bench/{{ i }}.conf:
  file.managed:
    - makedirs: True
    - contents: |
        {%- for j in range(60) %}
        {{ pillar['bench']['name'] }} {{ i }}.{{ j }} {{ (i * j) % 97 }}
        {%- endfor %}
{% endfor %}

procps:
  pkg.installed:
    - refresh: False
"""
IMAGE = """\
[images.par-{name}]
from = "base:latest"

[[images.par-{name}.provision]]
type = "salt"
name = "configure"
state_tree = "salt"
pillar = "pillar-{name}"
mode = "chroot"
network = false

[[images.par-{name}.provision]]
type = "script"
name = "artifact"
mode = "chroot"
network = false
run = '''
find /usr -xdev -type f -print0 | xargs -0 sha256sum > /srv/{name}.sums
tar -C /usr/share -cf - . | gzip -6 > /srv/{name}-share.tgz
'''
"""
NAMES = ("left", "right")


def write_project(project: Path) -> None:
    (project / "salt" / "bench").mkdir(parents=True, exist_ok=True)
    (project / "salt" / "top.sls").write_text("base:\n  '*':\n    - bench\n")
    (project / "salt" / "bench" / "init.sls").write_text(STATE)
    for name in NAMES:
        pillar = project / f"pillar-{name}"
        pillar.mkdir(exist_ok=True)
        (pillar / "top.sls").write_text("base:\n  '*':\n    - bench\n")
        (pillar / "bench.sls").write_text(f"bench:\n  name: {name}\n")
    (project / "sysbake.toml").write_text("\n".join(IMAGE.format(name=n) for n in NAMES))


def build(store: Path, project: Path, jobs: int) -> float:
    start = time.perf_counter()
    run([*SYSBAKE, "--store", store, "-q", "build", "--no-cache", "-j", str(jobs), project])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default: 3)")
    args = parser.parse_args()
    store = bench_store()
    ensure_base(store)
    project = WORK / "par-project"
    write_project(project)
    build(store, project, 1)  # warm-up: the Salt toolchain, the page cache
    times: dict[int, list[float]] = {1: [], 2: []}
    for i in range(args.repeat):
        for jobs in (1, 2) if i % 2 == 0 else (2, 1):
            times[jobs].append(build(store, project, jobs))
            print(f"round {i + 1}: -j {jobs} {times[jobs][-1]:.2f}s", flush=True)
    result(
        "two independent images", median(times[2]), median(times[1]), "-j 1", 0.7, value_name="-j 2"
    )
    print_summary(
        "Parallel builds",
        [f"median of {args.repeat} rounds; each rebuilds both images (--no-cache), base kept"],
    )


if __name__ == "__main__":
    main()
