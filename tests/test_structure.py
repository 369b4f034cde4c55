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


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Package modules `path` imports, anywhere in the file (relative imports resolved)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:
                t = t.rsplit(".", 1)[0] if "." in t else ""
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    return {_module_name(f): _imports(f, modules) for f in files}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a list of modules, or None. A package's __init__ re-exporting its own
    submodules is not a cycle of the code, so edges from a package to its children are dropped."""
    edges = {m: {t for t in ts if not t.startswith(m + ".")} for m, ts in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if t not in state:
                cycle = visit(t)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return None


def test_the_package_import_graph_has_no_cycle():
    graph = import_graph()
    assert "streaming_muloco.collectives" in graph and graph["streaming_muloco.outer_sync"], graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_cycle_finder_finds_a_cycle_through_a_function_level_import():
    """The checker itself: a base module importing its own backend inside a function is a cycle."""
    graph = {"pkg.base": {"pkg.backend"}, "pkg.backend": {"pkg.base"}, "pkg.user": {"pkg.base"}}
    assert find_cycle(graph) == ["pkg.backend", "pkg.base", "pkg.backend"]
    assert find_cycle({"pkg": {"pkg.sub"}, "pkg.sub": {"pkg"}}) is None  # a package re-exporting


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
    assert not stale, f"'DESIGN §' names a document outside the repository; cite docs/design.md: {stale}"
