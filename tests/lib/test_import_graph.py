"""The project's own modules import each other without a cycle, and the model library never imports
the platform (it finds what the platform adds through entry points, e.g. `letstalk.model_resolvers`).

The graph has an edge for every import statement wherever it stands: at module level, inside a
function or method, under `if TYPE_CHECKING:`; and for `importlib.import_module("...")` /
`__import__("...")` with a literal name. A lazy import inside a function hides a cycle from the
interpreter until that function runs; it is still a cycle between the two modules' concerns.
An edge goes to the module named (`from pkg import sub` to pkg.sub when sub is a module); the
packages above it, which Python runs first, get no edge of their own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = [ROOT / "letstalk", ROOT / "platform" / "letstalk_platform"]
LIBRARY, PLATFORM = "letstalk", "letstalk_platform"

Edges = dict[str, dict[str, list[str]]]  # module -> imported module -> where ("path:line")


def module_files(package: Path) -> dict[str, Path]:
    """Every module of a package folder by dotted name (a package's name is its __init__.py's)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = (package.name, *path.relative_to(package).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_names(module: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(absolute module, names taken from it, line) of every import in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` in pkg/mod.py is pkg, in pkg/__init__.py pkg too
                parts = module.split(".")
                base = parts[:len(parts) - node.level + is_package]
                assert base, f"{path}:{node.lineno}: relative import beyond the top-level package"
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module
            found.append((name, [alias.name for alias in node.names], node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Name) and node.func.id in ("__import__", "import_module"))
                   or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"))):
            found.append((node.args[0].value, [], node.lineno))
    return found


def import_graph(packages: list[Path]) -> tuple[Edges, Edges]:
    """(edges between the packages' own modules, every import of a top-level name outside them too).

    An import of a name that is no module of the packages goes to its longest prefix that is one
    (`import pkg.mod.Class` → pkg.mod); `from pkg import a, b` goes to pkg.a and pkg.b where those
    are modules, to pkg otherwise."""
    files = {name: path for package in packages for name, path in module_files(package).items()}
    top = {package.name: package.parent for package in packages}
    graph: Edges = {name: {} for name in files}
    named: Edges = {name: {} for name in files}

    def own(name: str) -> str | None:
        parts = name.split(".")
        return next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in files), None)

    for module, path in files.items():
        for name, taken, line in imported_names(module, path):
            where = f"{path.relative_to(top[module.split('.')[0]]).as_posix()}:{line}"
            named[module].setdefault(name, []).append(where)
            targets = {own(f"{name}.{t}") if f"{name}.{t}" in files else own(name) for t in taken} or {own(name)}
            for target in targets - {None}:
                graph[module].setdefault(target, []).append(where)
    return graph, named


def tangles(graph: Edges) -> list[set[str]]:
    """The strongly connected components of more than one module, and modules that import themselves:
    each module of one can reach every other through imports (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 or v in graph.get(v, {}):
                found.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(found, key=min)


def shortest_cycle(graph: Edges, component: set[str]) -> list[str]:
    """The shortest cycle [a, b, ..., a] from the component's first module (by name) back to itself."""
    start = min(component)
    paths = {start: [start]}
    todo = [start]
    while todo:  # breadth first, inside the component
        v = todo.pop(0)
        for w in sorted(graph[v]):
            if w == start:
                return paths[v] + [start]
            if w in component and w not in paths:
                paths[w] = paths[v] + [w]
                todo.append(w)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def cycles(graph: Edges) -> list[list[str]]:
    """One shortest cycle through each tangle; an empty list when the graph is acyclic."""
    return [shortest_cycle(graph, component) for component in tangles(graph)]


def describe(cycle: list[str], graph: Edges) -> str:
    """a → b (a/file.py:12) → a (b/file.py:3)"""
    return cycle[0] + "".join(f" → {b} ({', '.join(graph[a][b])})" for a, b in zip(cycle, cycle[1:]))


def library_imports_of_platform(named: Edges) -> list[str]:
    return sorted(f"{module} imports {name} ({', '.join(where)})" for module, names in named.items()
                  if module.split(".")[0] == LIBRARY for name, where in names.items()
                  if name.split(".")[0] == PLATFORM)


def test_no_import_cycles():
    graph, _ = import_graph(PACKAGES)
    assert len(graph) > 40  # both packages were read
    found = tangles(graph)
    assert not found, "import cycles:\n" + "\n".join(
        f"{len(c)} modules import each other ({', '.join(sorted(c))}), e.g. {describe(shortest_cycle(graph, c), graph)}"
        for c in found)


def test_the_library_never_imports_the_platform():
    _, named = import_graph(PACKAGES)
    found = library_imports_of_platform(named)
    assert not found, "the model library imports the platform:\n" + "\n".join(found)


def write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path):
    """A small package whose only cycle runs through imports inside functions, relative ones included."""
    write(tmp_path, {
        "lib/__init__.py": "from .core import run\n",
        "lib/core.py": "import os\n\ndef run():\n    from . import helpers\n    return helpers\n",
        "lib/helpers.py": "class A:\n    def go(self):\n        from .sub.deep import f\n        return f\n",
        "lib/sub/__init__.py": "",
        "lib/sub/deep.py": "def f():\n    from ..core import run\n    import lib.sub\n    return run\n",
        "plat/__init__.py": "",
        "plat/tracking.py": "import importlib\n\ndef g():\n    return importlib.import_module('lib.helpers')\n",
    })
    graph, named = import_graph([tmp_path / "lib", tmp_path / "plat"])
    assert graph["lib"] == {"lib.core": ["lib/__init__.py:1"]}
    assert graph["lib.core"] == {"lib.helpers": ["lib/core.py:4"]}  # `from . import helpers`: the module, not lib
    assert graph["lib.sub.deep"] == {"lib.core": ["lib/sub/deep.py:2"], "lib.sub": ["lib/sub/deep.py:3"]}
    assert graph["plat.tracking"] == {"lib.helpers": ["plat/tracking.py:4"]}
    assert named["lib.core"] == {"os": ["lib/core.py:1"], "lib": ["lib/core.py:4"]}
    found = cycles(graph)
    assert found == [["lib.core", "lib.helpers", "lib.sub.deep", "lib.core"]]
    assert describe(found[0], graph) == ("lib.core → lib.helpers (lib/core.py:4) → lib.sub.deep (lib/helpers.py:3) "
                                         "→ lib.core (lib/sub/deep.py:2)")
    # cut the cycle: the package is acyclic
    write(tmp_path, {"lib/sub/deep.py": "def f():\n    import lib.sub\n"})
    assert cycles(import_graph([tmp_path / "lib", tmp_path / "plat"])[0]) == []


def test_a_library_import_of_the_platform_inside_a_function_is_found(tmp_path):
    write(tmp_path, {
        f"{LIBRARY}/__init__.py": "",
        f"{LIBRARY}/cli.py": f"def resolve():\n    from {PLATFORM}.tracking import resolve_bundle\n",
        f"{PLATFORM}/__init__.py": "",
        f"{PLATFORM}/tracking.py": f"from {LIBRARY} import cli\n",
    })
    graph, named = import_graph([tmp_path / LIBRARY, tmp_path / PLATFORM])
    assert library_imports_of_platform(named) == [
        f"{LIBRARY}.cli imports {PLATFORM}.tracking ({LIBRARY}/cli.py:2)"]
    assert cycles(graph) == [[f"{LIBRARY}.cli", f"{PLATFORM}.tracking", f"{LIBRARY}.cli"]]


def test_a_self_import_counts_and_a_missing_module_is_no_edge(tmp_path):
    write(tmp_path, {"p/__init__.py": "", "p/a.py": "def f():\n    from p.a import g\n    import p.nosuch\n"})
    graph, _ = import_graph([tmp_path / "p"])
    assert graph["p.a"] == {"p.a": ["p/a.py:2"], "p": ["p/a.py:3"]}
    assert cycles(graph) == [["p.a", "p.a"]]


def test_a_relative_import_beyond_the_top_is_an_error(tmp_path):
    write(tmp_path, {"p/__init__.py": "", "p/a.py": "from .. import x\n"})
    with pytest.raises(AssertionError, match="beyond the top-level package"):
        import_graph([tmp_path / "p"])
