"""No import circle in apt_data: the graph of its modules' imports (read from their source) is acyclic."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "apt_data"


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_nodes(tree: ast.Module, is_package: bool) -> list[ast.stmt]:
    """Every import statement of a module, at any depth (deferred imports inside functions too).

    A package's ``__init__`` counts only its module-level imports: a facade that re-exports a
    submodule on first use (module ``__getattr__``) does not depend on it.
    """
    if not is_package:
        return [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of apt_data it imports``. Importing ``a.b.c`` from outside package ``a.b``
    also runs ``a.b``'s ``__init__``: an edge to it too (not to apt_data itself, the parent of all)."""
    files = module_files()

    def with_parents(target: str, importer: str) -> set[str]:
        out = {target}
        parts = target.split(".")
        for k in range(2, len(parts)):
            pkg = ".".join(parts[:k])
            if pkg in files and not (importer == pkg or importer.startswith(pkg + ".")):
                out.add(pkg)
        return out

    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in import_nodes(ast.parse(path.read_text(), str(path)), is_package):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif node.level:
                base = mod.split(".") if is_package else mod.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in files else target for a in node.names]
            else:
                names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                         for a in node.names]
            for name in names:
                while name and name not in files:  # `import a.b.c` of a name inside a module
                    name = name.rpartition(".")[0]
                if name and name != mod:
                    edges |= with_parents(name, mod)
        graph[mod] = edges - {mod}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                cycle = visit(n)
                if cycle:
                    return cycle
        stack.pop()
        state[m] = 2
        return []

    for m in sorted(graph):
        if m not in state:
            cycle = visit(m)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_the_modules_and_their_imports():
    graph = import_graph()
    assert {"apt_data.loader", "apt_data.sources.index", "apt_data.shards.reader", "apt_data.io"} <= set(graph)
    assert {"apt_data.sources", "apt_data.transport"} <= graph["apt_data.loader"]
    # a cross-package import runs that package's __init__ too
    assert {"apt_data.shards", "apt_data.shards.reader"} <= graph["apt_data.sources.index"]
    assert "apt_data" in graph["apt_data.loader"]  # a deferred import (warmup) counts as well


def test_apt_data_has_no_import_circle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
