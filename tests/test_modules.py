"""The package's shape: gemma_edge's modules import one another without a circle, counting the
imports inside functions (a circle there works only until someone moves an import to the top)."""

import ast

from conftest import REPO

PACKAGE = REPO / "scripts" / "gemma_edge"


def imports_within_package(path) -> set[str]:
    """The sibling modules `path` imports, at any depth of its code (relative imports only)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names.update([node.module.split(".")[0]] if node.module else [alias.name for alias in node.names])
    return names


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle once, as the module path from its alphabetically first module back to it."""
    circles = []

    def walk(start, path):
        for name in sorted(graph.get(path[-1], ())):
            if name == start:
                circles.append(path + [start])
            elif name > start and name not in path:
                walk(start, path + [name])

    for start in sorted(graph):
        walk(start, [start])
    return circles


def test_import_circles_are_found():
    assert import_circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_circles({"perf": {"pipeline"}, "pipeline": {"perf", "hub"}, "hub": set()}) == [["perf", "pipeline", "perf"]]
    assert import_circles({"a": {"b"}, "b": set()}) == []


def test_gemma_edge_modules_import_without_a_circle():
    graph = {path.stem: imports_within_package(path) for path in PACKAGE.glob("*.py")}
    assert "pipeline" in graph and graph["pipeline"], "the package was not read"
    assert import_circles(graph) == []
