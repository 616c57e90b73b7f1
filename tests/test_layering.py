"""The layering written in the README holds: envs < policies < serve < cluster, and no module imports in a circle.

Imports are read with ``ast`` from every product module, including imports placed inside
functions: moving an import into a function does not make a cycle go away.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("envs", "policies", "serve", "cluster")
"""Lowest first: a package may import only the packages before it."""


def modules() -> dict[str, Path]:
    """Dotted name -> file of every product module."""
    out = {}
    for package in LAYERS:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """The product modules a file imports, anywhere in it (``from envs import tiny`` names envs.tiny)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_packages_import_only_lower_layers():
    wrong = []
    for mod, deps in graph().items():
        rank = LAYERS.index(mod.split(".")[0])
        wrong += [f"{mod} -> {d}" for d in deps if LAYERS.index(d.split(".")[0]) > rank]
    assert wrong == [], "imports against the layering:\n" + "\n".join(sorted(wrong))


def test_no_module_imports_in_a_circle():
    g = graph()
    # A package's __init__ is imported by its submodules' imports, which is not a use: skip those edges.
    g = {m: {d for d in deps if not m.startswith(d + ".")} for m, deps in g.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(g.get(node, ())):
            if state.get(dep) == 1:
                cycles.append(
                    " -> ".join(stack[stack.index(dep) :] + [node, dep]) if dep in stack else f"{node} -> {dep}"
                )
            elif dep not in state:
                visit(dep, stack + [node])
        state[node] = 2

    for mod in sorted(g):
        if mod not in state:
            visit(mod, [])
    assert cycles == [], "import cycles:\n" + "\n".join(cycles)


def test_every_package_says_what_lives_there():
    for package in LAYERS:
        doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text()))
        assert doc and "layer" in doc.lower(), f"{package}/__init__.py needs a docstring naming its layer"
