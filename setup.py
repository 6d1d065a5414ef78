"""Builds the compiled assignment core; all other metadata lives in pyproject.toml."""

import sys

from setuptools import Extension, setup

args = ["/O2"] if sys.platform == "win32" else ["-O3", "-std=c99"]
setup(
    ext_modules=[
        Extension("maxscore.solvers.exact._core", ["src/maxscore/solvers/exact/_core.c"], extra_compile_args=args),
    ]
)
