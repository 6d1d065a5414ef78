"""Imports run only down the layers: solvers and gates -> routers -> moe -> model and parallel
-> hf -> train -> cli, and no modules import each other in a circle, within a layer too.  Every
import counts, the lazy ones inside functions and those under ``TYPE_CHECKING`` too."""

from __future__ import annotations

import ast
from pathlib import Path

import maxscore

PACKAGE = Path(maxscore.__file__).parent
LAYERS = {  # first component below maxscore -> its layer
    "_checks": 0,
    "_distributed": 0,
    "shapes": 0,
    "data": 0,
    "gates": 0,
    "solvers": 0,
    "routers": 1,
    "moe": 2,
    "model": 3,
    "parallel": 3,
    "hf": 4,
    "integrations": 4,
    "train": 5,
    "bench": 6,
    "cli": 6,
    "__main__": 6,
    "__init__": 6,  # the public API re-exports every layer
}


def _layer(parts: tuple[str, ...]) -> int:
    return LAYERS[parts[0].removesuffix(".py")]


def _imported_modules(tree: ast.AST, module: tuple[str, ...]) -> list[tuple[str, ...]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [tuple(alias.name.split(".")) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the importing module's package
                base = module[: len(module) - node.level]
                found.append(("maxscore", *base, *(node.module or "").split(".")))
            elif node.module:
                found.append(tuple(node.module.split(".")))
    return [name[1:] for name in found if name[0] == "maxscore" and len(name) > 1]


def test_every_import_runs_down_the_layers():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        own = _layer(parts)
        for target in _imported_modules(ast.parse(path.read_text()), parts[:-1]):
            if _layer(target) > own:
                upward.append(f"{'/'.join(parts)} imports maxscore.{'.'.join(target)}")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def _module_names() -> set[tuple[str, ...]]:
    """Every module of the package by dotted parts (a package by its folder), compiled
    extensions included."""
    names = set()
    for path in PACKAGE.rglob("*"):
        if path.suffix not in (".py", ".so", ".pyd"):
            continue
        parts = path.relative_to(PACKAGE).parts
        stem = parts[-1].split(".")[0]
        names.add(("maxscore", *parts[:-1]) if stem == "__init__" else ("maxscore", *parts[:-1], stem))
    return names


def _import_graph() -> dict[tuple[str, ...], set[tuple[str, ...]]]:
    """Module -> the package modules its import statements run: the module each names (the
    longest prefix that is one), and for ``from M import name`` also ``M.name`` where that is a
    submodule.  A package's own ``__init__``, run first by any import below it, is not counted."""
    names = _module_names()

    def known(name: tuple[str, ...]) -> tuple[str, ...] | None:
        while name and name not in names:
            name = name[:-1]
        return name or None

    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        is_package = parts[-1] == "__init__"
        module = ("maxscore", *parts[:-1]) if is_package else ("maxscore", *parts)
        package = module if is_package else module[:-1]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {known(tuple(alias.name.split("."))) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package[: len(package) - node.level + 1] if node.level else ()
                source = base + (tuple(node.module.split(".")) if node.module else ())
                targets.add(known(source))
                targets |= {source + (alias.name,) for alias in node.names if source + (alias.name,) in names}
        graph[module] = {t for t in targets if t is not None and t != module}
    return graph


def _circles(graph: dict) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on_stack, stack, circles = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            for target in edges:
                if target not in graph:
                    continue
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(graph[target]))))
                    break
                if target in on_stack:
                    low[node] = min(low[node], index[target])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(".".join(member))
                        if member == node:
                            break
                    if len(component) > 1:
                        circles.append(sorted(component))
    return circles


def test_no_modules_import_each_other_in_a_circle():
    circles = _circles(_import_graph())
    assert not circles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in circles)


def test_the_circle_check_finds_a_circle():
    graph = {("a",): {("b",)}, ("b",): {("c",)}, ("c",): {("a",)}, ("d",): {("a",)}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_every_module_has_a_layer():
    tops = {path.relative_to(PACKAGE).parts[0].removesuffix(".py") for path in PACKAGE.rglob("*.py")}
    assert tops <= set(LAYERS), f"modules without a layer: {sorted(tops - set(LAYERS))}"


def test_nothing_in_the_package_imports_the_integrations():
    importers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        if parts[0] == "integrations":
            continue
        for target in _imported_modules(ast.parse(path.read_text()), parts[:-1]):
            if target[0] == "integrations":
                importers.append("/".join(parts))
    assert not importers, f"the framework adapters are imported by {importers}"
