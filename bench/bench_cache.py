"""Registry cache benchmark (issue 12: machines that share only a registry).

Fresh runner, warm registry: the time to the bundled example's final image in a new, empty
store with `sysbake build --cache-from REG/cache` (every stage and the Salt toolchain in the
registry, pushed before by `--cache-to`), against `podman build --cache-from REG/podcache`
of an equivalent Containerfile in a new, empty podman store: FROM the same base image pushed
to the same registry, Salt installed by pip (offline, from the wheelhouse sysbake's own
toolchain was built from), the same salt-call runs of the same state trees and pillars,
its cache pushed before by `podman build --cache-to`. Goal: ratio <= 0.8.

Both registries are one docker-registry on loopback. The sides alternate over --rounds
rounds; medians, every sample printed. Warming the registry (a sysbake build of the example
and a cold podman build: apt and pip in the Containerfile's RUNs) takes minutes once.

Run as root, on a quiet machine: .venv/bin/python bench/bench_cache.py [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "integration"))

from services import registry_server

from common import EXAMPLE, WORK, bench_store, median, podman_store, print_summary, result, timed
from common import sysbake as sysbake_q
from sysbake.build.salt import toolchain as salt
from sysbake.oci.store import Store

# The example's two salt steps as podman runs them: Salt from a venv, the state trees and
# pillars bind-mounted from the context (never in a layer), as sysbake mounts them; the
# project step with its own pillar only (salt-call takes one pillar root). Service states
# cannot start units in a RUN (no systemd) and fail: `|| true` keeps the RUN's layer, which
# is all the warm measurement needs (cached RUNs do not run).
CONTAINERFILE = """\
FROM {base}
RUN --mount=type=bind,source=wheels,target=/wheels \\
    apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null \\
    && python3 -m venv /opt/salt \\
    && /opt/salt/bin/pip install -q --no-index --find-links /wheels salt=={version} \\
    && rm -rf /var/lib/apt/lists/*
RUN --mount=type=bind,source=web,target=/src \\
    /opt/salt/bin/salt-call --local --file-root=/src/salt --pillar-root=/src/pillar \\
    state.apply >/dev/null || true
RUN --mount=type=bind,source=web,target=/src \\
    /opt/salt/bin/salt-call --local --file-root=/src/projects/site/salt \\
    --pillar-root=/src/projects/site/pillar state.apply >/dev/null || true
"""


def _context(root: Path, base: str, wheels: Path) -> Path:
    """The podman build context: the Containerfile, the example, the wheelhouse."""
    ctx = root / "podman-ctx"
    shutil.rmtree(ctx, ignore_errors=True)
    ctx.mkdir(parents=True)
    shutil.copytree(EXAMPLE, ctx / "web")
    shutil.copytree(wheels, ctx / "wheels")
    text = CONTAINERFILE.format(base=base, version=salt.DEFAULT_SALT_VERSION)
    (ctx / "Containerfile").write_text(text)
    return ctx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    args = parser.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    warm = bench_store()  # the shared .deb cache and toolchains: warming is not timed
    with registry_server(WORK) as reg:
        cache, base = f"{reg.address}/cache", f"{reg.address}/base:latest"
        podcache = f"{reg.address}/podcache"
        # Warm the registry: every stage and the toolchain, and the base for FROM.
        sysbake_q(warm, "build", "--cache-to", cache, EXAMPLE)
        sysbake_q(warm, "push", "base:latest", base)
        toolchain = salt.installed(Store(warm))
        assert toolchain is not None, "the example's build made the Salt toolchain"
        wheels = salt.wheelhouse_path(Store(warm), toolchain.version, toolchain.architecture)
        ctx = _context(WORK, base, wheels)
        containerfile = (ctx / "Containerfile").read_text()
        build = ["build", "--tls-verify=false", "--network=host", "--layers", "-q"]
        build += ["-t", "bench-web", "-f", str(ctx / "Containerfile"), str(ctx)]
        with podman_store(WORK / "podman-warm") as podman:
            cold = podman(*build[:1], "--cache-to", podcache, *build[1:], check=False)
            if cold.returncode:
                raise SystemExit(f"the cold podman build failed:\n{cold.stderr[-3000:]}")

        fresh = WORK / "cache-fresh"

        def ours() -> None:
            shutil.rmtree(fresh, ignore_errors=True)
            sysbake_q(fresh, "build", "--cache-from", cache, EXAMPLE)

        def anchor() -> float:
            with podman_store(WORK / "podman-fresh") as podman:
                return timed(lambda: podman(*build[:1], "--cache-from", podcache, *build[1:]))

        samples: dict[str, list[float]] = {"ours": [], "anchor": []}
        for i in range(args.rounds):
            for side in ("anchor", "ours") if i % 2 == 0 else ("ours", "anchor"):
                if side == "ours":
                    samples["ours"].append(timed(ours))
                    assert not (fresh / "toolchains" / "wheels").exists(), "pip ran"
                else:
                    samples["anchor"].append(anchor())
        shutil.rmtree(fresh, ignore_errors=True)
    for side, values in samples.items():
        print(f"  {side}: " + ", ".join(f"{v:.1f}s" for v in values), flush=True)
    result(
        "fresh runner, warm registry (--cache-from)",
        median(samples["ours"]),
        median(samples["anchor"]),
        "podman build --cache-from",
        0.8,
    )
    print_summary("bench_cache", ["Containerfile:", containerfile])


if __name__ == "__main__":
    main()
