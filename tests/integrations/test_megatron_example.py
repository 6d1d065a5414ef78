"""The README's Megatron-Core example runs as a user runs it and balances every expert."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "megatron_cpu.py"


def test_the_example_trains_and_fills_every_expert():
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=600, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    losses = [float(value) for value in re.findall(r"loss (\d+\.\d+)", result.stdout)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 1.0, result.stdout
    ratios = [float(value) for value in re.findall(r"\d\.\d{3}", result.stdout.split("per layer")[1])]
    assert ratios and all(ratio == 1.0 for ratio in ratios), result.stdout
