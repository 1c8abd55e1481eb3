"""The package's imports form no circle, counting the lazy ones inside functions: each layer reads only the layers
below it, and `mochi_hub.config` is a leaf (it reads only `mochi_hub.errors`, itself a leaf)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Where each part of the installed package lives in the tree (pyproject's package-dir).
PACKAGE_DIRS = {"mochi_hub": REPO / "mochi_hub", "mochi_hub.cli": REPO / "cli"}


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    found = {}
    for package, root in PACKAGE_DIRS.items():
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).with_suffix("").parts
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            found[".".join((package, *parts))] = path
    return found


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The package modules `name` imports anywhere in its file (top level, functions, methods), not counting
    `if TYPE_CHECKING:` blocks, which never run. `from a import b` names module a.b when it is one, else a."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    skipped = {
        id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and _is_type_checking(node) for n in ast.walk(node)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found |= {f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names}
    return {m for m in found if m in known and m != name}


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search with the path on a stack)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" after

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt, [*path, nxt])):
                return found
        state[node] = "done"
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_finder_sees_lazy_relative_and_from_imports():
    edges = graph()
    assert "mochi_hub.training.preflight" in edges["mochi_hub.cli.train"]  # inside a function
    assert "mochi_hub.cli.options" in edges["mochi_hub.cli.train"]  # from .options import ...
    assert "mochi_hub.core.persist" in edges["mochi_hub.evaluate.probe"]  # from mochi_hub.core import persist
    assert circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circle_and_config_is_a_leaf():
    edges = graph()
    assert circle(edges) is None, " -> ".join(circle(edges) or [])
    assert edges["mochi_hub.config"] == {"mochi_hub.errors"} and edges["mochi_hub.errors"] == set()
