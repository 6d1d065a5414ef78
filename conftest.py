"""The code blocks of README.md and docs/*.md run as tests (Sybil).

Python blocks run in one namespace per page, in order; shell blocks run with bash from the
repository root.  A block that needs CUDA, a network, an installed framework's runtime or a long
run is preceded by ``<!-- skip: next "the reason" -->``, which pytest reports as the skip reason.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from sybil import Sybil
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent


def run_shell(example) -> None:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"shell block failed ({done.returncode}):\n{done.stderr[-2000:]}"


pytest_collect_file = Sybil(
    parsers=[PythonCodeBlockParser(), CodeBlockParser("bash", run_shell), SkipParser()],
    patterns=["README.md", "docs/*.md"],
).pytest()
