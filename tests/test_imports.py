"""The package's import graph: no cycles, and no upward arrows from the lower floors.

Read with the ``ast`` module only (nothing is imported).  What counts as an edge A -> B:
every ``import`` / ``from ... import`` statement anywhere in A's source -- module level,
inside functions, under ``if TYPE_CHECKING:`` or ``try:`` alike -- that names a module B of
this package.  ``from P import name`` is an edge to ``P.name`` when that is a module of the
package, otherwise to ``P`` (its ``__init__``).  The implicit execution of parent packages'
``__init__`` when a submodule is imported is not an edge: a package ``__init__`` that
re-exports its own submodules would otherwise put every package in a cycle with its
children.  Lazy attribute tables (``importlib.import_module`` with a string) are not
statements and are not counted.
"""
from __future__ import annotations

import ast
from pathlib import Path

PKG = "avstfp_fast"
ROOT = Path(__file__).resolve().parent.parent / PKG

# Lower floors, and what they must never import.
FLOORS = ("ops", "models", "data")
UPPER = ("train", "predict")


def _modules() -> dict[str, tuple[Path, bool]]:
    mods = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        mods[".".join(parts)] = (path, is_pkg)
    return mods


def _targets(node, name: str, is_pkg: bool, mods) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        base = base[:len(base) - (node.level - 1)]
        base = ".".join(base + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        out.append(sub if sub in mods else base)
    return out


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {imported module of the package: first line}}."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, (path, is_pkg) in mods.items():
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(node, name, is_pkg, mods):
                    if target in mods and target != name:
                        edges.setdefault(target, node.lineno)
    return graph


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_package():
    graph = import_graph()
    assert f"{PKG}.train.loop" in graph and f"{PKG}.models.avqa" in graph
    # function-local imports are edges too
    assert f"{PKG}.train.loop" in graph[f"{PKG}.train"]


def test_no_import_cycles():
    graph = import_graph()
    cycles = _cycles(graph)
    detail = ["  " + " <-> ".join(c) + "\n" + "\n".join(
        f"    {a} -> {b} (line {graph[a][b]})" for a in c for b in c if b in graph[a])
        for c in cycles]
    assert not cycles, "import cycles:\n" + "\n".join(detail)


def test_lower_floors_do_not_import_the_trainer_or_predict():
    graph = import_graph()
    bad = [f"{a} -> {b} (line {line})" for a, edges in graph.items()
           for b, line in edges.items()
           if a.split(".")[1:2] and a.split(".")[1] in FLOORS
           and b.split(".")[1:2] and b.split(".")[1] in UPPER]
    assert not bad, "lower floor imports train/predict:\n  " + "\n  ".join(bad)


def test_the_checks_catch_what_they_guard(tmp_path):
    # a cycle through a function-local import, and an upward arrow, on a toy graph
    assert _cycles({"a": {"b": 1}, "b": {"a": 3}, "c": {"a": 1}}) == [["a", "b"]]
    assert _cycles({"a": {"b": 1}, "b": {}}) == []
    tree = ast.parse("def f():\n    from ..train.tasks import Task\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    mods = _modules()
    assert _targets(node, f"{PKG}.models.avqa", False, mods) == [f"{PKG}.train.tasks"]
