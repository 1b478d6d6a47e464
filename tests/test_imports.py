"""The package's imports form no circle (read statically from the source, lazy imports included).

Every ``import`` statement of ``sparseode/**/*.py`` counts, also those inside functions (a lazy
import only hides a circle until the function runs) and under ``if TYPE_CHECKING`` (a type checker
follows them). Importing ``a.b.c`` runs the packages ``a`` and ``a.b`` first, so an import of a
module is also an edge to each of its packages, except the importer's own packages (those are
always initialised, or being initialised, before the importer runs).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import sparseode

ROOT = Path(sparseode.__file__).resolve().parent
PACKAGE = "sparseode"


def _module_names(root: Path) -> dict[str, Path]:
    """``{dotted module name: file}`` of every ``.py`` file under ``root``."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _imported(module: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``module`` imports anywhere in its file (resolved against ``known``)."""
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets.add(source)
            targets.update(f"{source}.{alias.name}" for alias in node.names)  # submodules
    edges: set[str] = set()
    for t in targets:
        if t in known:
            edges.add(t)
            edges.update(a for a in _ancestors(t) if a in known)
    own = set(_ancestors(module)) | {module}
    return edges - own


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    """``{module: modules it imports}`` over the package under ``root``."""
    files = _module_names(root)
    known = set(files)
    return {m: _imported(m, p, known) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        iters = [iter(sorted(graph[start]))]
        state[start] = 1
        while iters:
            nxt = next(iters[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                iters.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                iters.append(iter(sorted(graph.get(nxt, ()))))
    return None


def circles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Every circle of ``graph`` as a set of modules (its strongly connected components of more
    than one module, and modules importing themselves); iterative Tarjan."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph.get(w, ())))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    x = stack.pop()
                    on_stack.discard(x)
                    comp.add(x)
                    if x == v:
                        break
                if len(comp) > 1 or v in graph.get(v, ()):
                    out.append(comp)
    return out


def test_the_package_imports_form_no_circle():
    graph = import_graph()
    assert len(graph) > 30  # the walk saw the package, not an empty folder
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_module_of_the_package_is_in_a_circle():
    graph = import_graph()
    assert {"sparseode.prune.masking", "sparseode.pruned", "sparseode.nn.convert"} <= set(graph)
    assert [sorted(c) for c in circles(graph)] == []


def test_the_walk_sees_lazy_relative_and_package_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .b import f\n")
    (pkg / "a.py").write_text("def g():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..c import h\n")
    (pkg / "c.py").write_text("import pkg.a\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.sub", "pkg.sub.b"}
    assert graph["pkg.sub"] == {"pkg.sub.b"}
    assert graph["pkg.sub.b"] == {"pkg.c"}
    assert graph["pkg.c"] == {"pkg.a"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub", "pkg.sub.b", "pkg.c", "pkg.a"]


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),  # a diamond is no circle
    ({"a": {"a"}}, ["a", "a"]),
    ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
])
def test_find_cycle_on_small_graphs(graph, expected):
    assert find_cycle(graph) == expected
    assert (circles(graph) == []) == (expected is None)


def test_circles_finds_each_component_once():
    graph = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c", "e"}, "e": set(), "f": {"f"}}
    assert sorted(map(sorted, circles(graph))) == [["a", "b"], ["c", "d"], ["f"]]
