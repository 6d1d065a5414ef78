"""Training throughput per router against ``gshard``, on the bundled corpus, at any expert count
and k: the figure a user sees in ``maxscore train``.

    python benchmarks/bench_train.py [--experts 96,128] [--k 8] [--routers maxscore,gshard]
        [--steps 60] [--rounds 3] [--set expert_hidden=32] [--out r.json] [--md r.md]

Each run is ``maxscore train --preset tiny`` in its own process (``--set num_experts=E --set
k=K`` and the given settings), logging every 10 steps; the runs are interleaved round by round
(every router at one expert count, then the next count), so a slow spell of a shared machine
hits every router alike.  Per run: the tokens/s of each 10-step window after the first (from
the log's running figures; the first window holds the start-up and the routers' first batches,
whose warm start is cold), and the exact solver's milliseconds in the logged steps (all
layers).  Reported per (E, router): the median over the rounds, and tokens/s as a multiple of
``gshard``'s in the same round (the median of the rounds' ratios, and their range).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from maxscore.bench import write_report

BASELINE = "gshard"
LOG_EVERY = 10


def run_once(router: str, num_experts: int, k: int, steps: int, settings: list[str]) -> dict:
    """One training run in a fresh process: its tokens/s and solver ms per step after warm-up."""
    with tempfile.TemporaryDirectory() as out:
        options = [f"num_experts={num_experts}", f"k={k}", f"log_every={LOG_EVERY}", "eval_every=100000"]
        command = [sys.executable, "-m", "maxscore", "train", "--preset", "tiny", "--steps", str(steps)]
        command += ["--router", router, "--out", out, "--quiet"]
        for setting in options + settings:
            command += ["--set", setting]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    logged = [row for row in map(json.loads, lines) if "tokens_per_s" in row]
    if len(logged) < 2:
        raise ValueError(f"--steps {steps} logs no window after the first; use at least {2 * LOG_EVERY}")
    # the log's tokens/s runs from the start: each window's own is its tokens over its seconds
    elapsed = [row["tokens"] / row["tokens_per_s"] for row in logged]
    rates = [
        (logged[i]["tokens"] - logged[i - 1]["tokens"]) / (elapsed[i] - elapsed[i - 1])
        for i in range(1, len(logged))
    ]
    return {
        "tokens_per_s": statistics.median(rates),
        "solver_ms": statistics.median(row.get("solver_ms") or 0.0 for row in logged[1:]),
    }


def measure(experts, k, routers, steps, rounds, settings) -> list[dict]:
    runs = {(e, r): [] for e in experts for r in routers}
    for round_ in range(rounds):
        for num_experts in experts:
            for router in routers:
                print(f"  E {num_experts} {router} round {round_ + 1} ...", file=sys.stderr, flush=True)
                runs[num_experts, router].append(run_once(router, num_experts, k, steps, settings))
    rows = []
    for (num_experts, router), measured in runs.items():
        baseline = runs.get((num_experts, BASELINE))
        ratios = [
            m["tokens_per_s"] / b["tokens_per_s"] for m, b in zip(measured, baseline or [], strict=False)
        ]
        rows.append(
            {
                "num_experts": num_experts,
                "k": k,
                "router": router,
                "rounds": rounds,
                "steps": steps,
                "tokens_per_s": statistics.median(m["tokens_per_s"] for m in measured),
                "solver_ms_per_step": statistics.median(m["solver_ms"] for m in measured),
                "x_gshard": statistics.median(ratios) if ratios else None,
                "x_gshard_range": [min(ratios), max(ratios)] if ratios else None,
                "runs": measured,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| E | k | router | tokens/s (median) | x gshard (median, range over rounds) | solver ms per step |",
        "|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        ratio = (
            "-"
            if r["x_gshard"] is None
            else f"{r['x_gshard']:.2f} ({r['x_gshard_range'][0]:.2f}-{r['x_gshard_range'][1]:.2f})"
        )
        lines.append(
            f"| {r['num_experts']} | {r['k']} | {r['router']} | {r['tokens_per_s']:.0f} | {ratio} "
            f"| {r['solver_ms_per_step']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--experts", default="96,128", help="expert counts, comma-separated")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--routers", default=f"maxscore,{BASELINE}")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=["expert_hidden=32"], help="KEY=VALUE, as in train")
    parser.add_argument("--out", help="write the rows as JSON")
    parser.add_argument("--md", help="write a markdown report")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    args = parser.parse_args(argv)
    experts = [int(e) for e in args.experts.split(",")]
    rows = measure(experts, args.k, args.routers.split(","), args.steps, args.rounds, args.set)
    write_report(
        "Training throughput against gshard", format_table(rows), rows, args.out, args.md, args.concurrent
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
