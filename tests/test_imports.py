"""The structure of the code itself: no import cycles between tunectl's modules, and every package in the wheel.

The import graph is read from the source with `ast`, nothing is imported. Every import statement counts: at
module level, inside functions, and under `if TYPE_CHECKING:`. A cycle that only a function-level or typing import
closes still ties two modules together: neither can be read, tested or moved without the other.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ROOTS = (REPO / "controller" / "tunectl", REPO / "jobs" / "tunectl_jobs")

Graph = dict[str, set[str]]


def modules(roots: tuple[Path, ...]) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, is a package's __init__), for every .py file under each root (a package)."""
    found = {}
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root.parent).with_suffix("").parts)
            package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def import_graph(roots: tuple[Path, ...]) -> Graph:
    """Module -> the modules of `roots` it imports. `from P import x` names the submodule P.x where there is one
    (importing a submodule needs nothing of its package's __init__ but that it runs first), else P itself."""
    mods = modules(roots)
    graph: Graph = {}
    for name, (path, package) in mods.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, one level up per extra dot
                    base = name.split(".") if package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in mods else source)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (a -> ... -> a) per group of modules that import each other (Tarjan's strongly connected
    components), each starting at its first module by name; sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # recursive: a few dozen modules deep at most
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
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(_cycle_through(graph, group) for group in groups)


def _cycle_through(graph: Graph, group: set[str]) -> list[str]:
    """The shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {w: [start, w] for w in sorted(graph[start] & group)}
    queue = list(paths)
    while start not in paths:
        v = queue.pop(0)
        for w in sorted(graph[v] & group):
            if w not in paths:
                paths[w] = paths[v] + [w]
                queue.append(w)
    return paths[start]


def test_the_checker_finds_a_cycle_closed_inside_a_function_or_under_type_checking(tmp_path: Path):
    """The shape issue 14 reported: store.py imports s3store.py for typing and inside a function; s3store.py
    imports store.py."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "store.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .s3store import S3Store\n"
        "def open_store():\n    from .s3store import S3Store\n"
    )
    (pkg / "s3store.py").write_text("from .store import MANIFEST\n")
    (pkg / "sub" / "__init__.py").write_text("from .a import A\n")
    (pkg / "sub" / "a.py").write_text("from . import b\n")  # a sibling submodule, not the package: no cycle
    (pkg / "sub" / "b.py").write_text("import pkg.sub.c\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..sub.a import A\n")
    graph = import_graph((pkg,))
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.sub.a"] == {"pkg.sub.b"}
    assert cycles(graph) == [
        ["pkg.s3store", "pkg.store", "pkg.s3store"],
        ["pkg.sub.a", "pkg.sub.b", "pkg.sub.c", "pkg.sub.a"],
    ]


def test_tunectl_modules_import_no_cycle():
    graph = import_graph(ROOTS)
    assert "tunectl.stores.s3" in graph and "tunectl_jobs.stage" in graph  # the graph covers both packages
    found = cycles(graph)
    assert not found, "import cycles: " + "; ".join(" -> ".join(c) for c in found)


def test_every_package_is_in_the_wheel():
    """setuptools installs only the packages pyproject.toml lists: one left out imports from a checkout (the
    editable install) but not from the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {name for name, (_, package) in modules(ROOTS).items() if package}
    assert packages <= listed, f"add to [tool.setuptools] packages: {sorted(packages - listed)}"
