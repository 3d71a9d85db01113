"""
The modules of graceful_plugin import one another in one direction only: no import cycle, not
even through an import inside a function or one made for type checking alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import graceful_plugin

PACKAGE = "graceful_plugin"
ROOT = Path(graceful_plugin.__file__).parent


def _imported(module: str, tree: ast.AST) -> set[str]:
    """
    The graceful_plugin modules that C{module} imports anywhere in its source (module level,
    inside functions, under C{if TYPE_CHECKING:}).
    """
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.rsplit(".", node.level)[0]
                prefix = f"{base}.{node.module}" if node.module else base
            else:
                prefix = node.module or ""
            # "from graceful_plugin import control" imports the module graceful_plugin.control.
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            if name.startswith(PACKAGE + "."):
                found.add(name)
    return found


def importGraph() -> dict[str, set[str]]:
    """
    Every graceful_plugin module and the graceful_plugin modules it imports (itself and the
    package C{__init__} left out).
    """
    modules = {f"{PACKAGE}.{path.stem}": path for path in ROOT.glob("*.py")}
    modules.pop(f"{PACKAGE}.__init__")
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        graph[module] = {name for name in _imported(module, tree) if name in modules} - {module}
    return graph


def findCycle(graph: dict[str, set[str]]) -> list[str] | None:
    """
    One import cycle of C{graph} (its modules in order, the first repeated at the end), or
    L{None} when there is none.
    """
    done: set[str] = set()
    path: list[str] = []
    onPath: set[str] = set()

    def visit(module: str) -> list[str] | None:
        path.append(module)
        onPath.add(module)
        for imported in sorted(graph.get(module, ())):
            if imported in onPath:
                return path[path.index(imported) :] + [imported]
            if imported not in done:
                cycle = visit(imported)
                if cycle is not None:
                    return cycle
        path.pop()
        onPath.discard(module)
        done.add(module)
        return None

    for module in sorted(graph):
        if module not in done:
            cycle = visit(module)
            if cycle is not None:
                return cycle
    return None


def test_noImportCycle() -> None:
    """
    No graceful_plugin module imports, however indirectly, one that imports it back.
    """
    cycle = findCycle(importGraph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycleFinderFindsCycles() -> None:
    """
    The cycle finder reports a cycle through a function-level import, and none in a graph that
    points one way.
    """
    source = "import graceful_plugin.b\n\ndef f():\n    from graceful_plugin import a\n"
    imported = _imported("graceful_plugin.b", ast.parse(source))
    assert {"graceful_plugin.a", "graceful_plugin.b"} <= imported
    a, b = "graceful_plugin.a", "graceful_plugin.b"
    assert findCycle({a: {b}, b: {a}}) == [a, b, a]
    assert findCycle({a: {b}, b: set()}) is None


def test_lowerRoomsNeverImportTheService() -> None:
    """
    The service's parts (the generation, listener set, process effects, control responder,
    successor side, restarts, observers) never import the service module that wires them.
    """
    graph = importGraph()
    parts = [
        "generation",
        "listenerset",
        "process",
        "responder",
        "takeover",
        "successor",
        "restart",
        "lifecycle",
    ]
    for part in parts:
        module = f"{PACKAGE}.{part}"
        assert f"{PACKAGE}.server" not in graph[module], f"{module} imports the service"


def test_machinesDoNoIO() -> None:
    """
    The two state machines import no other graceful_plugin module than each other's shared
    deadline: everything they do goes through the effects they are given.
    """
    graph = importGraph()
    assert graph[f"{PACKAGE}.machine"] == set()
    assert graph[f"{PACKAGE}.successor"] == {f"{PACKAGE}.machine"}


def test_generationImportsNothingOfTheProcess() -> None:
    """
    The generation reaches its process only through the effects it is given: it imports neither
    the process effects nor the pidfile module, nor the standard library's C{signal} and C{sys},
    nor the rooms above it (the responder, the successor's side, restarts).
    """
    graph = importGraph()
    imported = graph[f"{PACKAGE}.generation"]
    for room in ["process", "pidfile", "server", "responder", "takeover", "restart"]:
        assert f"{PACKAGE}.{room}" not in imported, f"generation imports {room}"
    path = ROOT / "generation.py"
    tree = ast.parse(path.read_text(), str(path))
    stdlib = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    stdlib |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not stdlib & {"signal", "sys", "subprocess"}, stdlib
