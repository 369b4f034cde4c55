"""The package's import graph has no cycle: a base module never reaches back to what builds on it.

Read from the source with `ast`, so imports inside functions count as much as top-level ones
(a lazy import hides a cycle from the interpreter, not from the design).
"""
from __future__ import annotations

import ast
from pathlib import Path

import streaming_muloco



def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package in `root` that it imports anywhere in its file.

    `from . import x` with x a submodule is an edge to x only: the package's __init__ is
    already imported before any of its submodules, so it is no edge of its own.
    """
    mods = _modules(root)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, path in mods.items():
        package = m.split(".") if path.name == "__init__.py" else m.split(".")[:-1]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods] or [base]
            else:
                continue
            graph[m].update(t for t in targets if t in mods and t != m)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(v: str) -> list[str]:
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (cycle := visit(w)):
                return cycle
        state[v] = 2
        path.pop()
        return []

    for v in sorted(graph):
        if v not in state and (cycle := visit(v)):
            return cycle
    return []


def test_the_package_has_no_import_cycle() -> None:
    graph = import_graph(Path(streaming_muloco.__file__).resolve().parent)
    assert graph["streaming_muloco.compression"] == set()  # the compressors' base imports none of them
    assert find_cycle(graph) == []


def test_an_import_inside_a_function_closes_a_cycle(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "base.py").write_text("def make():\n    from .impl import Impl\n    return Impl()\n")
    (pkg / "impl.py").write_text("from . import base\nfrom .base import make\n\nclass Impl:\n    pass\n")
    graph = import_graph(pkg)
    assert graph == {"pkg": set(), "pkg.base": {"pkg.impl"}, "pkg.impl": {"pkg.base"}}
    assert find_cycle(graph) == ["pkg.base", "pkg.impl", "pkg.base"]
