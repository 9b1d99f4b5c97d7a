"""The layering rules of docs/architecture.md, checked on the source with `ast` so they stay true:

- no import circle between our modules, counting imports inside functions;
- nothing in cube/ imports Ray, jobs/ or serve/ (the library runs where Ray is not installed);
- serve/ imports nothing of jobs/;
- serving loads only what it serves: not the training loop, the baselines or the eval report.

Imports under `if TYPE_CHECKING:` are for type checkers only and are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("cube", "jobs", "serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _type_checking_only(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `path` imports at run time (top level and inside functions), as dotted names;
    `from pkg import name` counts as pkg.name where that is a module of ours."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_name(path)
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking_only(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    found.add(f"{base}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imported(path, known) if m in known and m != name} for name, path in known.items()}


def test_no_import_circle():
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                strongconnect(w)
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
                circles.append(sorted(component))

    for v in edges:
        if v not in index:
            strongconnect(v)
    assert not circles, f"import circles: {circles}"


@pytest.mark.parametrize("package, forbidden", [("cube", ("ray", "jobs", "serve")), ("serve", ("jobs",))])
def test_layer_does_not_import(package, forbidden):
    known = modules()
    bad = {name: sorted(m for m in imported(path, known) if m.split(".")[0] in forbidden)
           for name, path in known.items() if name.split(".")[0] == package}
    assert not {k: v for k, v in bad.items() if v}, f"{package}/ must not import {forbidden}: {bad}"


def closure(start: str, edges: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(edges.get(m, ()))
            parent = m.rsplit(".", 1)[0]
            if parent != m and parent in edges:  # importing a submodule runs its package first
                todo.append(parent)
    return seen


def test_serving_loads_only_what_it_serves():
    edges = graph()
    loaded = set().union(*(closure(m, edges) for m in edges if m.startswith("serve")))
    heavy = {
        "cube.train.loop",
        "cube.train.graph_step",
        "cube.eval.baselines",
        "cube.eval.report",
        "cube.eval.analysis",
        "cube.job_config",
    }
    assert not loaded & heavy, f"serve/ loads {sorted(loaded & heavy)}"


def test_the_checker_sees_a_circle(tmp_path):
    """The rules can fail: a module pair that imports each other inside functions is found."""
    a = ROOT / "cube" / "_layering_probe_a.py"
    b = ROOT / "cube" / "_layering_probe_b.py"
    try:
        a.write_text("def f():\n    from cube import _layering_probe_b\n")
        b.write_text("def g():\n    import cube._layering_probe_a\n")
        with pytest.raises(AssertionError, match="_layering_probe"):
            test_no_import_circle()
    finally:
        a.unlink(missing_ok=True)
        b.unlink(missing_ok=True)
