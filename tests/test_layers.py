"""The import graph of ``lightstudy``: no cycles, and how many floors it stands on.

Edges are the ``lightstudy.*`` imports of every module, at module level and inside functions
(a function-level import is still a dependency, only a later one), read with ``ast``. Imports
under ``if TYPE_CHECKING:`` are left out: they never run. Importing ``a.b`` also runs ``a``'s
``__init__``; that implicit edge to the parent package is left out too, as Python's own
layering of packages over their modules.

A module's floor is 0 when it imports no other lightstudy module, else one more than the highest
floor it imports (a cycle's modules share a floor).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import REPO

SRC = REPO / "src"

# Edges allowed to close an import cycle: none (the storage -> proxy -> study cycle is gone
# since the storage package took in the proxy's server side and protocol).
ALLOWED_CYCLE_EDGES: set[tuple[str, str]] = set()

# The commands and what they read: none of them may be in a cycle, allowed edge or not.
RESULTS = {
    "lightstudy.ranking",
    "lightstudy.evaluate",
    "lightstudy.summary",
    "lightstudy.report",
    "lightstudy.predict",
    "lightstudy.reproduce",
    "lightstudy.dashboard",
    "lightstudy.__main__",
}

# Floors of the whole package: 12 when this test was written (before and after the CLI became a
# package; the issue counted 13 another way); 11 since the device checks (devices.py), the stop
# flag (stopping.py), the launched worker's entry (launched.py) and the warm process's server
# (_warm.py, apart from the workers' client in warmserver.py) left the modules that import
# the trial machinery. Lower it as the package gets flatter.
MAX_FLOORS = 11


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "lightstudy").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for other in node.orelse:
                yield from _imports(ast.Module(body=[other], type_ignores=[]))
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        yield from _imports(node)


def import_graph() -> dict[str, set[str]]:
    """Each lightstudy module and the lightstudy modules it imports."""
    modules = _modules()

    def owner(name: str) -> str:  # the module a dotted name lives in
        while name not in modules and "." in name:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "lightstudy"}
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            if base.split(".")[0] != "lightstudy":
                continue
            for alias in node.names:  # `from pkg import mod` imports the module mod
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else owner(base))
        graph[name] = targets - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return found


def floors(graph: dict[str, set[str]]) -> dict[str, int]:
    """Each module's floor; the modules of a cycle share one."""
    component = {m: frozenset({m}) for m in graph}
    for c in cycles(graph):
        for m in c:
            component[m] = frozenset(c)
    floor: dict[frozenset[str], int] = {}

    def height(c: frozenset[str]) -> int:
        if c not in floor:
            below = {component[w] for m in c for w in graph[m]} - {c}
            floor[c] = 1 + max(map(height, below)) if below else 0
        return floor[c]

    return {m: height(component[m]) for m in graph}


def test_the_graph_reads_every_kind_of_import() -> None:
    graph = import_graph()
    assert "lightstudy.cli.shared" in graph["lightstudy.cli.results"]  # module level, from-import
    assert "lightstudy.evaluate" in graph["lightstudy.predict"]  # inside a function
    assert "lightstudy.cli.studies" in graph["lightstudy.cli"]  # `from package import module`
    assert "lightstudy.spec" not in graph["lightstudy.ranking"]  # only under TYPE_CHECKING
    assert "lightstudy" in graph["lightstudy.cli.shared"]  # `from lightstudy import __version__`


def test_no_import_cycle_but_the_allowed_edges() -> None:
    graph = import_graph()
    stale = {(a, b) for a, b in ALLOWED_CYCLE_EDGES if b not in graph.get(a, set())}
    assert not stale, f"these edges are gone: remove them from ALLOWED_CYCLE_EDGES: {sorted(stale)}"
    allowed = {m: {t for t in targets if (m, t) not in ALLOWED_CYCLE_EDGES} for m, targets in graph.items()}
    assert cycles(allowed) == [], "a new import cycle"
    mine = {m for m in graph if m == "lightstudy.cli" or m.startswith("lightstudy.cli.")} | RESULTS
    assert mine - set(graph) == set(), "a module named here does not exist"
    tangled = [sorted(c) for c in cycles(graph) if c & mine]
    assert tangled == [], "the CLI or a results module is in an import cycle"


def test_floors(record_property: pytest.RecordProperty) -> None:
    graph = import_graph()
    floor = floors(graph)
    height = max(floor.values()) + 1
    for level in range(height):
        print(f"floor {level:2d}: {' '.join(sorted(m for m, f in floor.items() if f == level))}")
    print(f"{len(graph)} modules on {height} floors")
    record_property("floors", height)
    record_property("modules", len(graph))
    assert height <= MAX_FLOORS, f"{height} floors; the package stood on {MAX_FLOORS}"
    # The shared floor of the CLI is below every command module; the commands never import each other.
    commands = {"lightstudy.cli.studies", "lightstudy.cli.results"}
    for name in commands:
        assert floor["lightstudy.cli.shared"] < floor[name]
        assert not graph[name] & (commands - {name})
    assert floor["lightstudy.ranking"] <= 2, "ranking is read by everything: keep it near the bottom"


# Optuna's storage internals: only lightstudy.storage may touch them.
PRIVATE_ATTRS = {"_storage", "_study_id", "_trial_id", "_backend", "_cached"}


def _private_storage_uses(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in PRIVATE_ATTRS:
            if not (isinstance(node.value, ast.Name) and node.value.id == "self"):  # a class's own field
                found.append(f"{path.name}:{node.lineno} .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [a.name for a in node.names]
            if node.module.startswith(("optuna.storages._", "optuna.pruners._")) or (
                node.module in ("optuna.storages", "optuna.pruners") and any(n.startswith("_") for n in names)
            ):
                found.append(f"{path.name}:{node.lineno} from {node.module} import {', '.join(names)}")
        elif isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno} import {a.name}"
                for a in node.names
                if a.name.startswith(("optuna.storages._", "optuna.pruners._"))
            ]
    return found


def test_only_the_storage_package_touches_optuna_storage_internals() -> None:
    outside = [
        use
        for name, path in _modules().items()
        if name != "lightstudy.storage" and not name.startswith("lightstudy.storage.")
        for use in _private_storage_uses(path)
    ]
    assert outside == [], "use lightstudy.storage (storage_of, study_id, trial_id, StudyStorage) instead"
    inside = [
        use
        for name, path in _modules().items()
        if name.startswith("lightstudy.storage")
        for use in _private_storage_uses(path)
    ]
    assert inside, "the check finds nothing at all: it reads the wrong thing"
