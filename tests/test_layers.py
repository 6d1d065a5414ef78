"""Imports run only down the layers: solvers and gates -> routers -> moe -> model and parallel
-> hf -> train -> cli.  Every import counts, the lazy ones inside functions too."""

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
