"""The import graph of src/sysbake: no cycle, and each module imports only modules of its
own layer or below (ARCHITECTURE.md). Every import counts, wherever it is written: at
module level, inside a function, under `if TYPE_CHECKING:`; `from package import name`
counts as an import of the submodule `package.name` when there is one."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"

# Bottom to top; a module belongs to the entry naming it or its package (the longest one);
# "sysbake" names the top package's __init__ only.
LAYERS: tuple[tuple[str, ...], ...] = (
    (
        "sysbake",
        "sysbake.fsutil",
        "sysbake.proc",
        "sysbake.rootfs",
        "sysbake.errors",
        "sysbake.log",
        "sysbake.progress",
        "sysbake.records",
        "sysbake.signals",
        "sysbake.cgroups",
        "sysbake.userns",
    ),
    ("sysbake.oci",),
    ("sysbake.project", "sysbake.runtime", "sysbake.engines"),
    ("sysbake.build", "sysbake.supply"),
    ("sysbake.imagetest", "sysbake.registry", "sysbake.verify"),
    ("sysbake.cli", "sysbake.commands"),
)

Graph = Mapping[str, frozenset[str]]


def module_name(path: Path, src: Path) -> str:
    """'sysbake.build.steps' for src/sysbake/build/steps.py; a package is its __init__."""
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(source: str, name: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The modules of `known` that module `name` (source text `source`) imports anywhere."""
    modules = set(known)
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, one level up per extra dot
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(
                f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in modules
            )
    return {m for m in found if m in modules and m != name}


def import_graph(src: Path) -> dict[str, frozenset[str]]:
    """Every module under src/sysbake and the sysbake modules it imports."""
    paths = {module_name(p, src): p for p in sorted((src / "sysbake").rglob("*.py"))}
    return {
        name: frozenset(imports_of(path.read_text(), name, path.name == "__init__.py", paths))
        for name, path in paths.items()
    }


def find_cycle(graph: Graph) -> list[str]:
    """One import cycle of `graph` as [a, b, ..., a]; [] when there is none."""
    done: set[str] = set()
    for start in sorted(graph):
        if start in done:
            continue
        path: list[str] = []
        on_path: set[str] = set()
        # Iterative depth-first search: (module, its imports not yet followed).
        stack: list[tuple[str, list[str]]] = [(start, sorted(graph[start]))]
        path.append(start)
        on_path.add(start)
        while stack:
            module, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                on_path.discard(module)
                done.add(module)
                continue
            nxt = todo.pop()
            if nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in done:
                stack.append((nxt, sorted(graph.get(nxt, ()))))
                path.append(nxt)
                on_path.add(nxt)
    return []


def layer_of(module: str) -> int | None:
    """The index in LAYERS of `module`'s layer; None when no entry names it."""
    best: tuple[int, int] | None = None  # (length of the entry, layer)
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            inside = entry != "sysbake" and module.startswith(entry + ".")
            if (module == entry or inside) and (best is None or len(entry) > best[0]):
                best = (len(entry), index)
    return None if best is None else best[1]


def climbing(graph: Graph) -> list[str]:
    """Each import of a module of a higher layer, as 'importer (layer) -> imported (layer)'."""
    return [
        f"{module} ({layer_of(module)}) -> {target} ({layer_of(target)})"
        for module, targets in sorted(graph.items())
        for target in sorted(targets)
        if (layer_of(target) or 0) > (layer_of(module) or 0)
    ]


@pytest.fixture(scope="module")
def graph() -> dict[str, frozenset[str]]:
    return import_graph(SRC)


def test_every_module_has_a_layer(graph: Graph) -> None:
    assert [m for m in sorted(graph) if layer_of(m) is None] == []


def test_the_import_graph_has_no_cycle(graph: Graph) -> None:
    assert find_cycle(graph) == []


def test_no_module_imports_from_a_layer_above_its_own(graph: Graph) -> None:
    assert climbing(graph) == []


# -- the checks themselves can fail --------------------------------------------------------


def test_every_kind_of_import_is_collected() -> None:
    source = """
from typing import TYPE_CHECKING
import sysbake.log
from sysbake import errors, __version__
from sysbake.oci import model as oci
from . import cache
from .. import proc
from .salt import run
if TYPE_CHECKING:
    from sysbake.oci.store import Store
def later():
    from sysbake.imagetest import CheckResult
"""
    known = {
        "sysbake",
        "sysbake.log",
        "sysbake.errors",
        "sysbake.oci",
        "sysbake.oci.model",
        "sysbake.oci.store",
        "sysbake.build",
        "sysbake.build.cache",
        "sysbake.proc",
        "sysbake.build.salt",
        "sysbake.build.salt.run",
        "sysbake.imagetest",
        "sysbake.build.steps",
    }
    assert imports_of(source, "sysbake.build.steps", False, known) == {
        "sysbake",
        "sysbake.log",
        "sysbake.errors",
        "sysbake.oci",
        "sysbake.oci.model",
        "sysbake.build",
        "sysbake.build.cache",
        "sysbake.proc",
        "sysbake.build.salt",
        "sysbake.build.salt.run",
        "sysbake.oci.store",
        "sysbake.imagetest",
    }


def test_a_cycle_through_a_function_level_import_is_found() -> None:
    graph = {
        "a": frozenset({"b"}),
        "b": frozenset({"c"}),
        "c": frozenset({"a"}),
        "d": frozenset({"a"}),
    }
    assert find_cycle(graph) in (["a", "b", "c", "a"], ["b", "c", "a", "b"], ["c", "a", "b", "c"])
    assert find_cycle({"a": frozenset({"b"}), "b": frozenset(), "c": frozenset({"b"})}) == []


def test_an_import_that_climbs_a_layer_is_named() -> None:
    graph = {
        "sysbake.build.steps": frozenset({"sysbake.imagetest", "sysbake.oci.store"}),
        "sysbake.imagetest": frozenset({"sysbake.build.steps"}),
    }
    assert climbing(graph) == ["sysbake.build.steps (3) -> sysbake.imagetest (4)"]
    assert layer_of("sysbake.oci.layers.tar") == 1
    assert layer_of("sysbake") == 0 and layer_of("sysbake.elsewhere") is None
