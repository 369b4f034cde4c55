"""The shape of the code: an acyclic import graph, and design references that resolve.

Both are read from the source, not from a running interpreter, so an import inside a function
counts as much as one at the top of a file.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

from multirank import REPO

PACKAGE = REPO / "streaming_muloco"
DESIGN = REPO / "docs" / "design.md"
REFERENCE = re.compile(r"docs/design\.md (§\d+(?:(?:,| and) §\d+)*)")


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
    graph = import_graph(PACKAGE)
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


def _design_sections() -> set[str]:
    return {m.group(1) for m in re.finditer(r"^## (\d+)\. ", DESIGN.read_text(), re.M)}


def _references() -> list[tuple[str, str]]:
    """(file, '§N') for every 'docs/design.md §N' in the repository's code and docs."""
    refs = []
    for path in sorted(REPO.rglob("*")):
        if (path.suffix not in (".py", ".md", ".sh") or ".venv" in path.parts or ".git" in path.parts
                or not path.is_file()):
            continue
        for m in REFERENCE.finditer(path.read_text(errors="replace")):
            refs += [(str(path.relative_to(REPO)), s) for s in re.findall(r"§(\d+)", m.group(1))]
    return refs


def test_every_design_reference_names_a_section_of_docs_design_md():
    sections = _design_sections()
    assert {"1", "3", "4", "5", "6", "7"} <= sections, sections
    refs = _references()
    assert len(refs) >= 10, refs  # the code does cite it
    missing = [(f, s) for f, s in refs if s not in sections]
    assert not missing, f"references to sections that docs/design.md does not have: {missing}"


def test_no_reference_points_outside_the_repository():
    stale = []
    for path in list(PACKAGE.rglob("*.py")) + list((REPO / "tests").rglob("*.py")) + \
            list((REPO / "benchmarks").rglob("*.py")) + [REPO / "README.md", REPO / "BENCHMARKS.md"]:
        if re.search(r"\bDESIGN" + " §", path.read_text()):
            stale.append(str(path.relative_to(REPO)))
    assert not stale, f"these cite a 'DESIGN' document outside the repository; cite docs/design.md: {stale}"
