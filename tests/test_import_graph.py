"""The packages' import graph has no cycles: the layout reads in one direction.

Every ``import`` of ``planning``, ``workers`` and ``orchestrator`` modules is read from the source (AST),
at module level, inside functions and under ``TYPE_CHECKING`` alike: a cycle hidden in a function-level
import is still a cycle (it is how the plan types once imported their own builders). ``from pkg import
name`` counts as an import of ``pkg.name`` when that is a module, else of ``pkg``. No Ray, no imports run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("planning", "workers", "orchestrator")



def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _nearest(name: str, modules: dict[str, Path]) -> str | None:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """Module → the modules of the three packages it imports anywhere in its source."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                edges.update(m for a in node.names if (m := _nearest(a.name, modules)))
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    target = f"{node.module}.{alias.name}"
                    found = target if target in modules else _nearest(node.module, modules)
                    if found:
                        edges.add(found)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _describe(component: list[str], graph: dict[str, set[str]]) -> str:
    members = set(component)
    return "; ".join(f"{m} -> {sorted(graph[m] & members)}" for m in component)


def test_the_walk_finds_a_function_level_cycle():
    """The checker itself: a cycle closed by an import inside a function is reported."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # planning.checkpoint imports planning.pickle_checkpoint only inside build_local_index.
    assert "planning.pickle_checkpoint" in graph["planning.checkpoint"]
    assert "planning.plan" in graph["planning.build"]
    # subpackages too: the family registry imports each family module
    assert "planning.families.gpt2" in graph["planning.families"]


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(_describe(c, graph) for c in found)


def test_the_plan_types_import_no_builder():
    """``planning.plan`` holds the types only: it imports none of the modules that build, check or encode a plan."""
    builders = {"planning.build", "planning.validate", "planning.plan_json", "planning.planner", "planning.retarget",
                "planning.plan_check", "planning.offload", "planning.tp_styles",
                "planning.tp_plans", "planning.conversions"}
    assert not import_graph()["planning.plan"] & builders
