"""Solver benchmark: every method vs torch.topk on the same scores, in the same run.

    python benchmarks/bench_solvers.py [--quick] [--device cuda] [--methods exact,greedy] [--threads N]
        [--out results.json] [--md results.md]

Prints a markdown table (time, ratio to torch.topk, the exact method's device engine in topk
units, optimality gap vs exact, dropped fraction, max load/capacity, exact's duality gap), with
batched rows (64 routing groups of (512, 16, 2) per call), and optionally writes JSON and a
dated markdown file with the hardware, versions and commit.
"""

from __future__ import annotations

import argparse
import sys

import torch

from maxscore.bench import (
    DISTRIBUTIONS,
    METHODS,
    QUICK_SIZES,
    SIZES,
    bench_batched,
    bench_solvers,
    format_table,
    rows_as_dicts,
    write_report,
)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="JSON output")
    parser.add_argument("--md", help="markdown output with the environment")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    parser.add_argument("--device", default="cpu", help="where the scores live (cpu or cuda)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated, default all")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    progress = lambda m: print(f"  {m}", file=sys.stderr, flush=True)  # noqa: E731
    rows = bench_batched(budget_s=args.budget, device=args.device, progress=progress)
    rows += bench_solvers(
        QUICK_SIZES if args.quick else SIZES,
        ("std1", "std1+bias") if args.quick else tuple(DISTRIBUTIONS),
        args.methods.split(","),
        budget_s=args.budget,
        device=args.device,
        progress=progress,
    )
    table = format_table(rows)
    write_report("Solver benchmark", table, rows_as_dicts(rows), args.out, args.md, args.concurrent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
