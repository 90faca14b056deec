"""Module boundaries, read from the source: no import circle anywhere (apt_data, apt_model, apt_train,
tools/, benchmarks/), and no module of the three packages reads another module's private members.

The private-member rule, precisely: an attribute ``X._name`` (one leading underscore, not a dunder)
is an offence unless ``X`` is ``self``, ``cls`` or ``super()``; or ``X``'s root name is imported from
outside the project (``torch._C``-style internals are that library's business); or ``_name`` is
defined in the same module (a function, class, assigned name or attribute, argument or import), so
a module's own helpers and the private state its classes keep are its own. ``from m import _name``
of a project module's private name is an offence too. The namedtuple API (``_replace``, ``_asdict``,
``_fields``, ``_make``) is public.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("apt_data", "apt_model", "apt_train")
SCRIPT_FOLDERS = ("tools", "benchmarks")  # scripts import their neighbours by plain name
PUBLIC_UNDERSCORE = {"_replace", "_asdict", "_fields", "_make", "_field_defaults"}
#: argparse's own attributes (no public API lists a parser's actions): the only private reads left
KNOWN_OFFENCES = {
    "apt_train/cli.py: ap._actions",
    "apt_train/cli.py: ap._option_string_actions",
}


def module_files() -> dict[str, Path]:
    out = {}
    for folder in PACKAGES + SCRIPT_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def import_nodes(tree: ast.Module, is_package: bool) -> list[ast.stmt]:
    """Every import statement of a module, at any depth (deferred imports inside functions too).

    A package's ``__init__`` counts only its module-level imports: a facade that re-exports a
    submodule on first use (module ``__getattr__``) does not depend on it. Imports under
    ``if TYPE_CHECKING:`` never run: they name types for annotations only, and do not count.
    """
    found, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        elif isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
        elif not (is_package and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))):
            todo.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """``module -> project modules it imports``. Importing ``a.b.c`` from outside package ``a.b`` also
    runs ``a.b``'s ``__init__``: an edge to it too (not to a top package itself, the parent of all). A
    script in tools/ or benchmarks/ importing a plain name means its neighbour script when there is one."""
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
            folder = mod.split(".")[0]
            if folder in SCRIPT_FOLDERS:  # `import bench_fill` from tools/bench_loader.py: tools.bench_fill
                names = [f"{folder}.{n}" if f"{folder}.{n}" in files else n for n in names]
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
    assert {"apt_data.loader.driver", "apt_data.sources.index", "apt_data.shards.reader", "apt_data.io",
            "apt_model.vit", "apt_train.trainer"} <= set(graph)
    assert {"apt_data.sources", "apt_data.transport", "apt_data.loader.planned"} <= graph["apt_data.loader.driver"]
    # a cross-package import runs that package's __init__ too
    assert {"apt_data.shards", "apt_data.shards.reader"} <= graph["apt_data.sources.index"]
    assert "apt_data.scoring.warmup" in graph["apt_data.shards.build"]  # a deferred import counts as well
    assert "apt_data.loader" in graph["apt_train.trainer"] or "apt_data.loader" in graph["apt_train.data"]


def test_no_import_circle_anywhere():
    cycle = find_cycle(import_graph())
    assert not cycle, "import circle: " + " -> ".join(cycle)


def _defined(tree: ast.Module) -> set[str]:
    """Every name a module defines: functions, classes, assigned names and attributes, arguments, imports."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store):
            out.add(n.attr)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.alias):
            out.add((n.asname or n.name).split(".")[0])
    return out


def _external_roots(tree: ast.Module) -> set[str]:
    """Names a module binds by importing from outside the project (``torch``, ``np``, ``argparse``...)."""
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names if a.name.split(".")[0] not in PACKAGES}
        elif isinstance(n, ast.ImportFrom) and not n.level and (n.module or "").split(".")[0] not in PACKAGES:
            out |= {a.asname or a.name for a in n.names}
    return out


def _root(node: ast.expr) -> ast.expr:
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node


def private_reads(path: Path, root: Path = ROOT) -> list[str]:
    """``"file: expression"`` of every read of another module's private member (the module docstring's rule)."""
    tree = ast.parse(path.read_text(), str(path))
    mine, external, rel = _defined(tree), _external_roots(tree), path.relative_to(root).as_posix()
    found = []
    for n in ast.walk(tree):
        if isinstance(n, ast.ImportFrom) and (n.level or (n.module or "").split(".")[0] in PACKAGES):
            found += [f"{rel}: from {'.' * n.level}{n.module or ''} import {a.name}" for a in n.names if _private(a.name)
                      and not (path.parent / f"{a.name}.py").exists()]
        if not isinstance(n, ast.Attribute) or not _private(n.attr) or n.attr in mine | PUBLIC_UNDERSCORE:
            continue
        v, root = n.value, _root(n.value)
        if isinstance(v, ast.Name) and v.id in ("self", "cls"):
            continue
        if isinstance(v, ast.Call) and isinstance(v.func, ast.Name) and v.func.id == "super":
            continue
        if isinstance(root, ast.Name) and root.id in external:
            continue
        found.append(f"{rel}: {ast.unparse(n)}")
    return found


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def test_no_module_reads_another_modules_private_members():
    found = {f for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py")) for f in private_reads(p)}
    assert found <= KNOWN_OFFENCES, "private members read from another module: " + "; ".join(sorted(found - KNOWN_OFFENCES))


def test_the_private_rule_finds_what_it_should(tmp_path):
    src = tmp_path / "apt_data" / "probe_of_the_rule.py"
    src.parent.mkdir()
    src.write_text("import torch\nfrom .config import _is_int\n\nclass A:\n    def __init__(self, b):\n"
                   "        self._own = b._other + b._own\n        torch._C\n        super()._x\n")
    assert sorted(private_reads(src, tmp_path)) == ["apt_data/probe_of_the_rule.py: b._other",
                                                    "apt_data/probe_of_the_rule.py: from .config import _is_int"]


def test_a_circle_is_found():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
