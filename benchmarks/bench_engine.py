"""Device engine benchmark: exact routing of a layer's groups on the scores' device, cold and
warm-started, against torch.topk and the host engine on the same scores, in the same run.

    python benchmarks/bench_engine.py [--device cuda] [--out results.json] [--md results.md]

Rows per (G, N, E, k) and score distribution: milliseconds and multiples of ``torch.topk`` for
the device engine cold (no prices) and warm (the optimal prices of the previous call, as a
router's averaged prices), the host engine (on CUDA scores: with its transfers), the groups
that fell back to the host, the relative difference to the host engine's optimum, and the
launches and device-to-host copies of one warm call (``maxscore.bench.count_launches``: on a
CPU the profiler's leaf operations plus one per Triton launch, a proxy of the launch count;
the copies are counted on CUDA only), and the device's work per group, cold and warm: price
steps and augmentations (mean and largest; with plain torch the augmentations are the
compiled core's).  The same calls with ``validate="deferred"`` (the routers' mode on CUDA: no
host round trip, every group finished on the device): their times, the groups they left
uncertified (their fallback count) and their device-to-host copies.  Which implementation ran
(Triton kernels or plain torch) is in the "dense" column; on a CPU set ``TRITON_INTERPRET=1``
to run the kernels (slowly: the timings are then the interpreter's, only the launch column means
anything).
"""

from __future__ import annotations

import argparse
import sys

import torch

from maxscore import solve
from maxscore.bench import count_launches, make_scores, median_ms, write_report
from maxscore.solvers._validate import make_problems
from maxscore.solvers.exact.device import kernels_available, route_on_device
from maxscore.solvers.exact.prices import DEVICE_PRICE_STEPS

SIZES = ((64, 512, 16, 2), (16, 4096, 64, 8))  # (G, N, E, k): a layer's routing groups
DISTRIBUTIONS = ("std1", "std1+bias")


def device_work(scores: torch.Tensor, k: int, prices: torch.Tensor | None) -> torch.Tensor:
    """float64 [G, 2]: each group's price steps and augmentations in one device-engine call."""
    problems = make_problems(scores, k, None, 1.0, None, on_device=True)
    return route_on_device(problems, prices, DEVICE_PRICE_STEPS, None).work.cpu()


def bench_case(groups, num_tokens, num_experts, k, distribution, device, budget_s, timed=True) -> dict:
    scores = make_scores(num_tokens, num_experts, distribution, groups=groups).to(device)
    flat = scores.reshape(-1, num_experts)
    time = median_ms if timed else lambda fn, budget: float("nan")
    topk_ms = median_ms(lambda: torch.topk(flat, k, dim=1), budget_s)
    host = solve(scores, k, engine="host")
    cold = solve(scores, k, engine="device")
    warm = solve(scores, k, engine="device", prices=host.prices)
    launches, copies = count_launches(lambda: solve(scores, k, engine="device", prices=host.prices))
    deferred = dict(engine="device", validate="deferred")
    deferred_cold = solve(scores, k, **deferred)
    deferred_warm = solve(scores, k, prices=host.prices, **deferred)
    optimum = host.score.double()
    solved = (cold, warm, deferred_cold, deferred_warm)
    gap = max(float(((optimum - a.score.double()).abs() / optimum.abs()).max()) for a in solved)
    warm_deferred = lambda: solve(scores, k, prices=host.prices, **deferred)  # noqa: E731
    deferred_launches, deferred_copies = count_launches(warm_deferred)
    work = {name: device_work(scores, k, p) for name, p in (("cold", None), ("warm", host.prices))}
    row = dict(
        groups=groups,
        num_tokens=num_tokens,
        num_experts=num_experts,
        k=k,
        distribution=distribution,
        dense="triton" if kernels_available(scores.device) else "torch",
        topk_ms=topk_ms,
        cold_ms=time(lambda: solve(scores, k, engine="device"), budget_s),
        warm_ms=time(lambda: solve(scores, k, engine="device", prices=host.prices), budget_s),
        host_ms=time(lambda: solve(scores, k, engine="host"), budget_s),
        deferred_cold_ms=time(lambda: solve(scores, k, **deferred), budget_s),
        deferred_warm_ms=time(lambda: solve(scores, k, prices=host.prices, **deferred), budget_s),
        cold_fallbacks=int(cold.fallback.sum()),
        warm_fallbacks=int(warm.fallback.sum()),
        deferred_uncertified=(int(deferred_cold.fallback.sum()), int(deferred_warm.fallback.sum())),
        gap_vs_host=gap,
        certified=all(bool(a.converged.all()) for a in solved),
        launches=launches,
        device_to_host=copies,
        deferred_launches=deferred_launches,
        deferred_device_to_host=deferred_copies,
        **{f"{name}_steps": float(w[:, 0].mean()) for name, w in work.items()},
        **{f"{name}_augmentations": float(w[:, 1].mean()) for name, w in work.items()},
        **{f"{name}_augmentations_max": int(w[:, 1].max()) for name, w in work.items()},
    )
    for name in ("cold", "warm", "host", "deferred_cold", "deferred_warm"):
        row[f"{name}_x_topk"] = row[f"{name}_ms"] / topk_ms
    return row


def format_table(rows: list[dict]) -> str:
    lines = [
        "| G | N | E | k | scores | dense | topk ms | cold ms | cold x topk | warm ms | warm x topk "
        "| host ms | host x topk | fallbacks cold/warm | gap vs host | launches (warm) | D2H (warm) "
        "| steps cold/warm | augmentations cold/warm (max) | deferred x topk cold/warm "
        "| deferred uncertified cold/warm | launches deferred (warm) | D2H deferred (warm) |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        copies = "-" if r["device_to_host"] < 0 else str(r["device_to_host"])
        deferred_copies = "-" if r["deferred_device_to_host"] < 0 else str(r["deferred_device_to_host"])
        uncertified = "/".join(map(str, r["deferred_uncertified"]))
        lines.append(
            f"| {r['groups']} | {r['num_tokens']} | {r['num_experts']} | {r['k']} | {r['distribution']} "
            f"| {r['dense']} | {r['topk_ms']:.3f} | {r['cold_ms']:.2f} | {r['cold_x_topk']:.1f} "
            f"| {r['warm_ms']:.2f} | {r['warm_x_topk']:.1f} | {r['host_ms']:.2f} | {r['host_x_topk']:.1f} "
            f"| {r['cold_fallbacks']}/{r['warm_fallbacks']} | {r['gap_vs_host']:.1e} | {r['launches']} "
            f"| {copies} | {r['cold_steps']:.1f}/{r['warm_steps']:.1f} "
            f"| {r['cold_augmentations']:.1f}/{r['warm_augmentations']:.1f} "
            f"({r['cold_augmentations_max']}/{r['warm_augmentations_max']}) "
            f"| {r['deferred_cold_x_topk']:.1f}/{r['deferred_warm_x_topk']:.1f} | {uncertified} "
            f"| {r['deferred_launches']} | {deferred_copies} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="where the scores live (cpu or cuda)")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of repeats per measurement")
    parser.add_argument("--sizes", default=",".join("x".join(map(str, s)) for s in SIZES), help="GxNxExk,...")
    parser.add_argument("--distributions", default=",".join(DISTRIBUTIONS), help="std1,std1+bias,...")
    parser.add_argument("--out", help="JSON output")
    parser.add_argument("--md", help="markdown output with the environment")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    parser.add_argument(
        "--count-only",
        action="store_true",
        help="launches, fallbacks and exactness only (Triton's interpreter)",
    )
    args = parser.parse_args()
    sizes = [tuple(int(v) for v in size.split("x")) for size in args.sizes.split(",")]
    rows = []
    for size in sizes:
        for distribution in args.distributions.split(","):
            print(f"  {size} {distribution}", file=sys.stderr, flush=True)
            rows.append(bench_case(*size, distribution, args.device, args.budget, not args.count_only))
    write_report("Device engine benchmark", format_table(rows), rows, args.out, args.md, args.concurrent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
