"""The command line end to end."""

from __future__ import annotations

import json

import pytest

from maxscore.cli import main


def test_solve_bench_quick_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["solve-bench", "--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| T | E | k |") and "paper_hungarian" in table
    rows = json.loads(out.read_text())
    exact = [r for r in rows if r["method"] == "exact"]
    assert len(exact) == 4  # 2 sizes x 2 distributions
    for row in exact:
        assert row["gap_vs_exact"] == 0.0 and row["dropped_fraction"] == 0.0
        assert row["max_load_ratio"] == 1.0 and abs(row["certificate_gap"]) < 1e-6
    greedy = [r for r in rows if r["method"] == "greedy"]
    assert all(r["dropped_fraction"] > 0 for r in greedy)  # GShard drops at capacity_factor 1


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit) as error:
        main(["no-such-command"])
    assert error.value.code == 2
