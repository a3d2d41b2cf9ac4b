"""The package's import graph: no cycle among asymlora modules, and dependencies pointing one way.

Components (methods, routing, tuner, data, io, eval, analysis, train, the federated strategies, models,
export, ...) are used by the recipes, which the CLI and the server (asymlora.serve) use; a component never
imports a recipe, the CLI or the server. The graph is read with ``ast`` from the source, so it sees imports
inside functions and under ``if TYPE_CHECKING:`` as well as module-level ones: a cycle hidden in a function
body is still a cycle of the design.

The graph counts the module an import names (``from asymlora.data import tasks`` -> ``asymlora.data.tasks``;
``from asymlora.data import Task`` -> ``asymlora.data``), not the parent packages Python also runs on the
way, so a package ``__init__`` that re-exports its submodules does not make every sibling import a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "asymlora"

# Components: packages (prefix "asymlora.x.") and modules that must not import the application layers.
COMPONENTS = (
    "asymlora.methods",
    "asymlora.tuner",
    "asymlora.routing",
    "asymlora.data",
    "asymlora.io",
    "asymlora.eval",
    "asymlora.analysis",
    "asymlora.train",
    "asymlora.federated.strategies",
    "asymlora.federated.client",
    "asymlora.federated.partition",
    "asymlora.federated.accounting",
    "asymlora.federated.privacy",
    "asymlora.models",
    "asymlora.roles",
    "asymlora.export",
    "asymlora.calibration",
    "asymlora.hf",
    "asymlora.distributed",
    "asymlora.lora_files",
    "asymlora.progress",
    "asymlora.peft_integration",
    "asymlora.cache",
)
APPLICATION = ("asymlora.recipes", "asymlora.cli", "asymlora.serve")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known asymlora module that ``name`` is or lies in (None outside the package)."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The asymlora modules ``module`` imports anywhere in its source (module and function level)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import sub` names the submodule when there is one, else pkg itself.
            targets = [f"{origin}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            hit = _resolve(target, known) if target.split(".")[0] == PACKAGE else None
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _in(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def back_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(component, application module) pairs where a component imports a recipe or the CLI."""
    return sorted(
        (src, dst)
        for src, targets in graph.items()
        if _in(src, COMPONENTS)
        for dst in targets
        if _in(dst, APPLICATION)
    )


# ---------------------------------------------------------------------------------------- the checker's own tests


def test_checker_finds_a_planted_cycle_and_back_arrow():
    graph = {
        "asymlora.a": {"asymlora.b"},
        "asymlora.b": {"asymlora.c"},
        "asymlora.c": {"asymlora.a"},
        "asymlora.d": {"asymlora.a"},
        "asymlora.data.x": {"asymlora.recipes.multitask"},
        "asymlora.recipes.multitask": {"asymlora.data.x"},
    }
    assert cycles(graph) == [
        ["asymlora.a", "asymlora.b", "asymlora.c"],
        ["asymlora.data.x", "asymlora.recipes.multitask"],
    ]
    assert back_arrows(graph) == [("asymlora.data.x", "asymlora.recipes.multitask")]


def test_checker_reads_function_level_and_relative_imports(tmp_path):
    pkg = tmp_path / PACKAGE
    (pkg / "data").mkdir(parents=True)
    for name in ("__init__.py", "data/__init__.py", "data/tasks.py", "models.py"):
        (pkg / name).write_text("")
    (pkg / "data" / "files.py").write_text(
        "def f():\n    from .tasks import Task\n    from .. import models\n    import asymlora.data\n"
    )
    known = {module_name_in(tmp_path, p): p for p in pkg.rglob("*.py")}
    found = imports_of("asymlora.data.files", pkg / "data" / "files.py", known)
    assert found == {"asymlora.data.tasks", "asymlora.models", "asymlora.data"}


def module_name_in(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


# ---------------------------------------------------------------------------------------- the package itself


def test_graph_sees_the_package():
    graph = import_graph()
    assert "asymlora.cli" in graph and "asymlora.tuner.model" in graph
    assert "asymlora.recipes.multitask" in graph["asymlora.cli"] or any(
        t.startswith("asymlora.recipes") for t in graph["asymlora.cli"]
    )


def _cycle_text(found: list[list[str]]) -> str:
    return "\n".join(" <-> ".join(c) for c in found)


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles among asymlora modules:\n" + _cycle_text(found)


def test_components_do_not_import_recipes_or_cli():
    found = back_arrows(import_graph())
    assert not found, "components importing the application layer:\n" + "\n".join(
        f"{a} -> {b}" for a, b in found
    )
