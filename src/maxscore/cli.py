"""The ``maxscore`` command line: argparse subcommands; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence


def _solve_bench(args: argparse.Namespace) -> int:
    from maxscore.bench import DISTRIBUTIONS, QUICK_SIZES, SIZES, bench_solvers, format_table, rows_as_dicts

    sizes = QUICK_SIZES if args.quick else SIZES
    distributions = ("std1", "std1+bias") if args.quick else tuple(DISTRIBUTIONS)

    def progress(message: str) -> None:
        print(f"  running {message} ...", file=sys.stderr, flush=True)

    rows = bench_solvers(
        sizes, distributions, budget_s=0.3 if args.quick else 1.0, paper=not args.no_paper, progress=progress
    )
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows_as_dicts(rows), f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maxscore", description="Maximum Score Routing for Mixture-of-Experts"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser(
        "solve-bench",
        help="compare the routing solvers: time (x torch.topk), optimality gap, drops, load",
        description="Benchmarks every solver method on random router scores (capacity_factor 1.0).",
    )
    bench.add_argument("--quick", action="store_true", help="two small sizes and two distributions")
    bench.add_argument("--out", help="also write the rows as JSON to this file")
    bench.add_argument("--no-paper", action="store_true", help="skip the paper's O(T^3) Hungarian design")
    bench.set_defaults(run=_solve_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
