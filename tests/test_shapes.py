"""Every shape suffix in the source uses the letters of the legend in ``maxscore.shapes``."""

from __future__ import annotations

import re
from pathlib import Path

import maxscore
from maxscore.shapes import LEGEND

SUFFIX = re.compile(r"\b[a-z][a-z0-9]*_([A-Z][A-Z0-9]*)\b")


def test_shape_suffixes_use_the_legend():
    root = Path(maxscore.__file__).parent
    unknown = set()
    for path in root.rglob("*.py"):
        for match in SUFFIX.finditer(path.read_text()):
            letters = {c for c in match.group(1) if c.isalpha()}
            for letter in letters - set(LEGEND):
                unknown.add(f"{path.relative_to(root)}: {match.group(0)} ({letter})")
    assert not unknown, sorted(unknown)
