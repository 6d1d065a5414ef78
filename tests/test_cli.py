"""The command line end to end."""

from __future__ import annotations

import json
import math

import pytest

from maxscore.cli import main
from tests.conftest import run_options


def test_solve_bench_quick_writes_rows(tmp_path, capsys):
    out = tmp_path / "rows.json"
    assert main(["solve-bench", "--quick", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| G | T | E | k |") and "paper_hungarian" in table
    rows = json.loads(out.read_text())
    exact = [r for r in rows if r["method"] == "exact" and r["groups"] == 1]
    assert len(exact) == 4  # 2 sizes x 2 distributions
    for row in exact:
        assert row["gap_vs_exact"] == 0.0 and row["dropped_fraction"] == 0.0
        assert row["max_load_ratio"] == 1.0 and abs(row["certificate_gap"]) < 1e-6
        assert row["device_ratio"] is None  # timed on CUDA scores only (bench_engine.py covers the CPU)
    batched = [r for r in rows if r["groups"] == 64 and r["method"].startswith("exact")]
    assert len(batched) == 4 and all(r["gap_vs_exact"] == 0.0 for r in batched)
    greedy = [r for r in rows if r["method"] == "greedy"]
    assert all(r["dropped_fraction"] > 0 for r in greedy)  # GShard drops at capacity_factor 1


def test_unknown_subcommand_exits_with_usage():
    with pytest.raises(SystemExit) as error:
        main(["no-such-command"])
    assert error.value.code == 2


def test_train_then_eval(tmp_path, capsys, small_corpus_dir):
    out = tmp_path / "run"
    args = ["train", *run_options(small_corpus_dir), "--router", "maxscore", "--seed", "3", "--out", str(out)]
    assert main(args) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4, 6] and all("loss" in row for row in rows)
    assert (out / "checkpoint.pt").is_file() and (out / "tokenizer.json").is_file()
    capsys.readouterr()
    for extra in ([], ["--causal"], ["--data", str(small_corpus_dir / "doc03.txt")]):
        assert main(["eval", "--checkpoint", str(out / "checkpoint.pt"), *extra]) == 0
        result = json.loads(capsys.readouterr().out)
        assert {"loss", "perplexity", "bpc", "tokens"} <= set(result) and result["tokens"] > 0
        assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))


def test_compare_then_report(tmp_path, capsys, small_corpus_dir):
    out = tmp_path / "cmp"
    args = [
        "compare",
        *run_options(small_corpus_dir),
        "--routers",
        "maxscore,maxscore@two_stage,gshard,dense,gshard:normalize=false,maxscore:soft_topk=true:schedule.steps=50%",
        "--seeds",
        "2",
    ]
    assert main([*args, "--out", str(out)]) == 0
    table = capsys.readouterr().out
    labels = ("maxscore", "maxscore@two_stage", "gshard", "dense", "gshard:normalize=false")
    for label in (*labels, "maxscore:soft_topk=true:schedule.steps=50%"):
        assert f"| {label} | 2 |" in table
    for name in ("results.md", "results.json", "loss.png", "load_ratio.png", "affinity.png", "paired.png"):
        assert (out / name).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [
        "dense-s0",
        "dense-s1",
        "gshard+normalize=false-s0",
        "gshard+normalize=false-s1",
        "gshard-s0",
        "gshard-s1",
        "maxscore+soft_topk=true+schedule.steps=50pct-s0",
        "maxscore+soft_topk=true+schedule.steps=50pct-s1",
        "maxscore-s0",
        "maxscore-s1",
        "maxscore@two_stage-s0",
        "maxscore@two_stage-s1",
    ]
    raw = json.loads((out / "gshard+normalize=false-s1" / "final.json").read_text())
    assert raw["router"] == "gshard:normalize=false" and raw["seed"] == 1
    # config.json stores every router option, resolved (a later default change cannot alter it)
    assert json.loads((out / "gshard+normalize=false-s1" / "config.json").read_text())["model"]["moe"][
        "router_config"
    ] == {"group": "sequence", "balance_coef": 0.01, "z_coef": 0.0, "score_function": "softmax"} | {
        "normalize": False,
        "validate": "deferred",
    }
    scheduled = json.loads(
        (out / "maxscore+soft_topk=true+schedule.steps=50pct-s0" / "config.json").read_text()
    )["model"]["moe"]["router_config"]
    assert scheduled["schedule"] == {"start": 4.0, "end": 1.0, "steps": 3, "kind": "linear"}
    assert scheduled["normalize"] is True and scheduled["method"] == "exact"
    flow = json.loads((out / "maxscore-s0" / "final.json").read_text())
    assert flow["causal_load"]["min"] <= 1.0 <= flow["causal_load"]["max"] * 1.000001
    assert flow["validation_batch"]["tokens"] > 0
    results = json.loads((out / "results.json").read_text())
    assert results["baseline"] == "gshard"
    rows = {row["label"]: row for row in results["configurations"]}
    differences = [
        json.loads((out / f"gshard+normalize=false-s{s}" / "final.json").read_text())["validation_batch"][
            "loss"
        ]
        - json.loads((out / f"gshard-s{s}" / "final.json").read_text())["validation_batch"]["loss"]
        for s in (0, 1)
    ]
    assert rows["gshard:normalize=false"]["val_differences"] == pytest.approx(differences)
    assert rows["gshard:normalize=false"]["val_diff_low"] <= rows["gshard:normalize=false"]["val_diff"]
    # resuming keeps finished runs: nothing is trained again
    stamp = (out / "gshard-s0" / "final.json").stat().st_mtime_ns
    assert main([*args, "--out", str(out)]) == 0
    assert "gshard, seed 0: finished, skipped" in capsys.readouterr().err
    assert (out / "gshard-s0" / "final.json").stat().st_mtime_ns == stamp
    report_dir = tmp_path / "report"
    assert main(["report", str(out / "maxscore-s0"), str(out / "gshard-s0"), "--out", str(report_dir)]) == 0
    assert "| gshard | 1 |" in (report_dir / "results.md").read_text()
    # a report of the same runs against another baseline
    args = ["report", str(out), "--out", str(tmp_path / "raw"), "--baseline", "gshard:normalize=false"]
    assert main(args) == 0
    raw = json.loads((tmp_path / "raw" / "results.json").read_text())
    assert raw["baseline"] == "gshard:normalize=false"
    flipped = {row["label"]: row for row in raw["configurations"]}["gshard"]["val_differences"]
    assert flipped == pytest.approx([-d for d in differences])


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--set", "k=9"], "k must satisfy 1 <= k <= num_experts=4, got k=9"),
        (["--router", "top2"], "router must be 'dense' or one of"),
        (["--data", "/no/such/path"], "does not exist"),
    ],
)
def test_train_bad_settings_exit_2(tmp_path, capsys, small_corpus_dir, extra, match):
    options = run_options(small_corpus_dir)
    if "--data" in extra:
        options[options.index("--data") + 1] = extra[1]
        extra = []
    assert main(["train", *options, *extra, "--out", str(tmp_path / "bad")]) == 2
    assert match in capsys.readouterr().err
