"""The import graph, read from the source (ast): layers point one way and no module imports itself round.

Layers, lowest first: core → metrics (pure numpy; core's errors) → data → explainability → evaluation → training → cli and
app. A module may import its own layer and the layers below; an import of a higher layer fails, even
inside a function. Imports under ``if TYPE_CHECKING:`` (annotations only) are not counted.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("core", "metrics", "data", "explainability", "evaluation", "interop", "training", "cli", "app")
#: cli and app are one layer: neither imports the other.
RANK = {name: i for i, name in enumerate(LAYERS)} | {"app": LAYERS.index("cli")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sources() -> dict[str, Path]:
    files = [*ROOT.glob("mcloss/**/*.py"), *ROOT.glob("app/*.py")]
    return {module_name(p): p for p in files}


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(path: Path, module: str) -> set[str]:
    """The mcloss modules ``path`` imports at run time (anywhere in the file; not under TYPE_CHECKING)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    if module.startswith("app"):  # the app imports its sibling module by its bare name
        found = {f"app.{m}" if m in ("view",) else m for m in found}
    return found


def graph() -> dict[str, set[str]]:
    mods = sources()
    return {m: {i for i in imports(p, m) if i in mods and i != m} for m, p in mods.items()}


def layer(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "app":
        return "app"
    return parts[1] if len(parts) > 1 and parts[1] in RANK else None


def test_no_import_climbs_a_layer():
    climbs = []
    for module, targets in graph().items():
        own = layer(module)
        for target in targets:
            other = layer(target)
            if own is None or other is None:
                continue  # the top package mcloss/__init__ (lazy) and mcloss/__main__
            if RANK[other] > RANK[own] or (RANK[other] == RANK[own] and other != own):
                climbs.append(f"{module} ({own}) imports {target} ({other})")
    assert not climbs, "\n".join(sorted(climbs))


def test_nothing_below_the_top_imports_the_top_package():
    mods = sources()
    offenders = [m for m, p in mods.items() if layer(m) not in (None, "cli") and "mcloss" in imports(p, m)]
    assert not offenders, offenders


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                connect(w)
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

    for v in sorted(edges):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycles():
    assert _cycles(graph()) == []


def test_the_checks_catch_a_climb_and_a_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert layer("mcloss.core.model") == "core" and layer("mcloss.cli.export") == "cli" and layer("app.view") == "app"
    assert RANK["evaluation"] > RANK["explainability"] > RANK["data"] > RANK["metrics"] > RANK["core"]


@pytest.mark.parametrize("package", ["core", "data", "metrics", "explainability", "evaluation", "training"])
def test_the_library_draws_no_progress_bars(package):
    for path in (ROOT / "mcloss" / package).rglob("*.py"):
        assert "tqdm" not in imports(path, module_name(path)), path
