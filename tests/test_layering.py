"""Import directions (DESIGN "one direction of dependency"), read from the source with ``ast``: the
store does not import the engine, the engine does not import what sits on it, the registry does not
import the chat model or the tools, and no module imports another that imports it back (counting
imports inside functions and under ``TYPE_CHECKING`` too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "emloc_agents"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


# (importer prefix, imported prefix): never, at any level
FORBIDDEN = [
    ("store", "engine"),
    ("store", "models"),
    ("store", "registry"),
    ("engine", "store"),
    ("engine", "registry"),
    ("engine", "chat_model"),
    ("engine", "tools"),
    ("engine", "cli"),
    ("engine", "bench"),
    ("registry", "chat_model"),
    ("registry", "tools"),
    ("registry", "cli"),
    ("registry", "bench"),
    ("tools", "chat_model"),
    ("chat_model", "cli"),
    ("chat_model", "bench"),
    ("chat_model", "middleware"),
    ("registry", "middleware"),
    ("tools", "middleware"),
    ("skills", "tasks"),
    # the server sits on top: a client of the chat model, never of the engine, the store or the models
    *[(below, "serve") for below in ("store", "engine", "models", "registry", "tools", "messages", "chat_model",
                                     "bench", "skills", "config")],
    ("serve", "engine"),
    ("serve", "store"),
    ("serve", "models"),
    ("serve", "cli"),
    # Ray Serve (the ray extra) sits on top of the server and the store: nothing below imports it
    *[(below, "ray_serve") for below in ("store", "engine", "models", "registry", "tools", "messages", "chat_model",
                                         "bench", "skills", "config", "serve")],
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The emloc_agents modules an import statement names (``from .x import y`` -> x.y if y is a module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PACKAGE]
    if node.level:
        base = importer.split(".") if is_package else importer.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != PACKAGE:
        return []
    out = []
    for alias in node.names:
        sub = f"{target}.{alias.name}"
        out.append(sub if sub in MODULES else target)
    return out


def _edges() -> list[tuple[str, str, str | None]]:
    """(importer, imported, enclosing function or None for module level) for every import."""
    edges = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"

        def visit(node: ast.AST, func: str | None, _name: str = name, _pkg: bool = is_package) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, ast.Import | ast.ImportFrom):
                    edges.extend((_name, t, func) for t in _resolve(_name, _pkg, child) if t != _name)
                inner = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else func
                visit(child, inner)

        visit(tree, None)
    return edges


EDGES = _edges()


def _short(module: str) -> str:
    return module.removeprefix(PACKAGE + ".")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v) :] + [v]
            if v not in state and (found := dfs(v)):
                return found
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (found := dfs(u)):
            return found
    return None


def test_the_parser_sees_the_imports() -> None:
    pairs = {(_short(a), _short(b)) for a, b, _ in EDGES}
    assert ("registry", "store") in pairs and ("chat_model", "registry") in pairs
    assert ("engine.chunk_loop", "engine.chunks") in pairs and ("engine.presses", "engine.chunks") in pairs
    # skill tools: the chat model builds them from tools.py; ``registry.as_tools(chat)`` asks the chat
    assert ("chat_model", "tools") in pairs
    # the bench builds on the engine (its baselines are presses on the engine's loop), never the reverse
    assert ("bench.presses", "engine.presses") in pairs and ("bench.methods", "bench.presses") in pairs


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_forbidden_import_directions(importer: str, imported: str) -> None:
    def under(module: str, prefix: str) -> bool:
        m = _short(module)
        return m == prefix or m.startswith(prefix + ".")

    bad = [(a, b, f) for a, b, f in EDGES if under(a, importer) and under(b, imported)]
    assert not bad, f"{importer} must not import {imported}: {bad}"


def test_the_engine_keeps_only_the_products_presses() -> None:
    """The baselines live in the bench: the engine's only presses are the base press and EMLoC's."""
    presses = {node.name: path.parent.name for path in ROOT.rglob("*.py")
               for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.ClassDef)
               and any(isinstance(b, ast.Name) and b.id.endswith("Press") for b in node.bases)}
    assert {name for name, where in presses.items() if where == "engine"} == {"EMLoCPress"}
    assert {"KVzipPress", "RandomPress", "SnapKVPress", "StreamingLLMPress", "UniformPress"} <= {
        name for name, where in presses.items() if where == "bench"}


def test_no_import_cycles() -> None:
    """Modules, with every import (module level, TYPE_CHECKING, inside functions)."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in EDGES:
        graph.setdefault(a, set()).add(b)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(map(_short, cycle))


def test_store_imports_without_the_engine() -> None:
    import subprocess
    import sys

    code = (
        "import sys, emloc_agents.store, emloc_agents.store.format as f; "
        "f.load_memory; assert not [m for m in sys.modules if m.startswith('emloc_agents.engine')], "
        "sorted(m for m in sys.modules if m.startswith('emloc_agents'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
