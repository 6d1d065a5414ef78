"""Sweep benchmark: the exact solver on random shapes and score distributions, against
``torch.topk`` on the same scores, in the same run.

    python benchmarks/bench_sweep.py [--shapes 240] [--batches 80] [--threads 1]
        [--out sweep.json] [--md sweep.md] [--device-kernel CASES]

Shapes are drawn with a fixed seed: E from 8 to 512 (half from the counts real models use,
half uniform), k from 1 to 10 (at most E / 2), N from 1024 to 8192 for single groups and
G = 32 groups of 128, 256 or 512 tokens for batched calls; capacity factor 1.  Score
distributions (``DISTRIBUTIONS``) add a per-expert logit offset, the same for every token of
a shape: a router that favours some experts.  Its spread (the offsets' std) is the "bias".

Per single shape, three exact solves through the public ``solve``:
- cold: no warm start;
- warm, optimum: from the optimal prices of the same scores;
- warm, next batch: from the optimal prices of another draw of the same distribution (same
  offsets, new noise), as a router warm-starts in training.
Per batched shape: cold, and warm from the mean prices of the previous batch's groups, as the
routers do.  Each figure is the median time over repeats within ``--budget`` seconds, divided
by the median time of ``torch.topk`` on the same scores ([G * N, E] for batches).

Work counts come from one more call of the compiled core: the moves (auction evictions and
repair path steps), augmentations, and the units that must move (those of the starting top-k
of ``s - p`` that the optimal routing does not keep: no exact method moves fewer).  The report
gives the median, p90 and max ratio overall and by bucket (E, bias, k / E, N, distribution,
and whether the capacity has slack, i.e. E does not divide N k).

``--device-kernel CASES`` runs the fused device kernel on CASES batches drawn the same way (their
own seed): on a CPU 2 groups of at most 256 tokens under ``TRITON_INTERPRET=1``, on CUDA 32
groups, timed against ``torch.topk``.  It reports the kernel's price steps, augmentations and
fallbacks to the host per group, cold, warm from the optimum and warm from the previous batch's
mean prices, and the relative difference to the host engine's optimum.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

from maxscore import solve
from maxscore.bench import write_report
from maxscore.solvers._validate import make_problem, make_problems
from maxscore.solvers.exact._native import run_core, run_core_batch

MODEL_EXPERTS = (8, 16, 24, 32, 40, 48, 60, 64, 72, 96, 128, 160, 192, 256, 320, 384, 448, 512)
DISTRIBUTIONS = ("softmax", "sigmoid", "zipf", "bf16")
SEED = 2026
GROUPS = 32
LEFT_OUT_S = 3.0  # shapes whose cold solve takes longer (a batch: G / 8 times) are left out, counted


def draw_shape(rng: random.Random, batched: bool) -> dict:
    """One random case: (N or G x N, E, k), a distribution and its bias."""
    num_experts = rng.choice(MODEL_EXPERTS) if rng.random() < 0.5 else rng.randint(8, 512)
    k = rng.randint(1, min(10, num_experts // 2))
    num_tokens = rng.choice((128, 256, 512)) if batched else rng.randint(1024, 8192)
    distribution = rng.choice(DISTRIBUTIONS)
    bias = rng.uniform(0.0, 2.0)
    return dict(num_tokens=num_tokens, num_experts=num_experts, k=k, distribution=distribution, bias=bias)


def expert_offsets(case: dict, seed: int) -> torch.Tensor:
    """Per-expert logit offsets with std ``case["bias"]``: Gaussian, or Zipf-like popularity
    (``-log rank`` over a random order of the experts, scaled to that std)."""
    generator = torch.Generator().manual_seed(seed)
    num_experts, bias = case["num_experts"], case["bias"]
    if case["distribution"] == "zipf":
        ranks = torch.randperm(num_experts, generator=generator).double() + 1
        offsets = -ranks.log()
        return (offsets - offsets.mean()) / offsets.std() * bias
    return torch.randn(num_experts, generator=generator, dtype=torch.float64) * bias


def make_case_scores(case: dict, offsets: torch.Tensor, seed: int, groups: int | None = None) -> torch.Tensor:
    """Scores [N, E] (or [G, N, E]) of ``case``'s distribution: softmax or sigmoid of unit
    Gaussian logits plus ``offsets``; ``bf16`` is the softmax rounded to bfloat16 (ties)."""
    generator = torch.Generator().manual_seed(seed)
    shape = (case["num_tokens"], case["num_experts"])
    if groups is not None:
        shape = (groups, *shape)
    logits = torch.randn(shape, generator=generator) + offsets.float()
    if case["distribution"] == "sigmoid":
        return logits.sigmoid()
    scores = logits.softmax(-1)
    return scores.to(torch.bfloat16) if case["distribution"] == "bf16" else scores


def timed_ms(fn: Callable[[], object], budget_s: float, max_reps: int = 5) -> float:
    """Median wall time of ``fn`` in ms: repeats while within ``budget_s`` (at least once)."""
    times: list[float] = []
    start = time.perf_counter()
    while not times or (len(times) < max_reps and time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        fn()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def topk_ms(scores: torch.Tensor, k: int, budget_s: float) -> float:
    flat = scores.reshape(-1, scores.shape[-1])
    torch.topk(flat, k, dim=1)  # warm-up
    return timed_ms(lambda: torch.topk(flat, k, dim=1), budget_s, max_reps=50)


def must_move(scores: torch.Tensor, k: int, prices: torch.Tensor | None, experts: torch.Tensor) -> int:
    """Units of the top-k of ``scores - prices`` that the routing ``experts`` does not hold."""
    values = scores.double() - (0 if prices is None else prices.double()[..., None, :])
    start = torch.zeros(values.shape, dtype=torch.bool)
    start.scatter_(-1, torch.topk(values, k, dim=-1).indices, True)
    final = torch.zeros(values.shape, dtype=torch.bool)
    final.scatter_(-1, experts.clamp(min=0), experts >= 0)
    return int((start & ~final).sum())


def single_case(case: dict, index: int, budget_s: float) -> dict:
    offsets = expert_offsets(case, SEED + index)
    scores = make_case_scores(case, offsets, SEED + 10_000 + index)
    other = make_case_scores(case, offsets, SEED + 20_000 + index)
    k = case["k"]
    problem = make_problem(scores, k, None, 1.0, None)
    begin = time.perf_counter()
    cold = run_core(problem)
    if time.perf_counter() - begin > LEFT_OUT_S:
        return dict(case, index=index, groups=1, left_out=True)
    optimum = torch.from_numpy(cold.prices_E.copy())
    next_batch = torch.from_numpy(run_core(make_problem(other, k, None, 1.0, None)).prices_E.copy())
    row = dict(case, index=index, groups=1, topk_ms=topk_ms(scores, k, budget_s))
    for name, prices in (("cold", None), ("warm_optimum", optimum), ("warm_next", next_batch)):
        work = cold if prices is None else run_core(problem, prices_E=prices.numpy())
        ms = timed_ms(lambda p=prices: solve(scores, k, prices=p), budget_s)
        start = None if prices is None else prices - prices.min()
        row |= {
            f"{name}_x_topk": ms / row["topk_ms"],
            f"{name}_ms": ms,
            f"{name}_moves": work.moves,
            f"{name}_augmentations": work.augmentations,
            f"{name}_must_move": must_move(scores, k, start, torch.from_numpy(work.experts_TK)),
            f"{name}_gap": work.gap,
        }
    return row


def batched_case(case: dict, index: int, budget_s: float) -> dict:
    offsets = expert_offsets(case, SEED + index)
    scores = make_case_scores(case, offsets, SEED + 10_000 + index, groups=GROUPS)
    previous = make_case_scores(case, offsets, SEED + 20_000 + index, groups=GROUPS)
    k = case["k"]
    mean_prices = solve(previous, k).prices.double().mean(0)
    problems = make_problems(scores, k, None, 1.0, None)
    row = dict(case, index=index, groups=GROUPS, topk_ms=topk_ms(scores, k, budget_s))
    for name, prices in (("cold", None), ("warm_mean", mean_prices)):
        begin = time.perf_counter()
        work = run_core_batch(problems, prices_GE=None if prices is None else prices[None].numpy())
        if name == "cold" and time.perf_counter() - begin > GROUPS * LEFT_OUT_S / 8:
            return dict(case, index=index, groups=GROUPS, left_out=True)
        ms = timed_ms(lambda p=prices: solve(scores, k, prices=p), budget_s)
        start = None if prices is None else (prices - prices.min()).expand(GROUPS, -1)
        row |= {
            f"{name}_x_topk": ms / row["topk_ms"],
            f"{name}_ms": ms,
            f"{name}_moves": int(work.stats_GS[:, 4].sum()),
            f"{name}_augmentations": int(work.stats_GS[:, 3].sum()),
            f"{name}_must_move": must_move(scores, k, start, torch.from_numpy(work.experts_GNK)),
            f"{name}_gap": float(abs(work.gap_G).max()),
        }
    return row


def device_case(case: dict, index: int, budget_s: float) -> dict:
    """The fused device kernel on the case's groups (2 under the interpreter, 32 on CUDA) against
    the host engine's optimum: cold, warm from the optimum, and warm from the mean prices of the
    previous batch (as the routers); on CUDA also the time in ``torch.topk``'s."""
    from maxscore.solvers.exact.device import kernels_available, route_on_device
    from maxscore.solvers.exact.prices import DEVICE_PRICE_STEPS

    cuda = torch.cuda.is_available()
    groups = GROUPS if cuda else 2
    offsets = expert_offsets(case, SEED + index)
    scores = make_case_scores(case, offsets, SEED + 10_000 + index, groups=groups).to(
        "cuda" if cuda else "cpu"
    )
    previous = make_case_scores(case, offsets, SEED + 20_000 + index, groups=groups).to(scores.device)
    k = case["k"]
    host = solve(scores, k, engine="host")
    mean_prices = solve(previous, k, engine="host").prices.double().mean(0)
    row = dict(
        case, index=index, groups=groups, dense="triton" if kernels_available(scores.device) else "torch"
    )
    if cuda:
        row["topk_ms"] = topk_ms(scores, k, budget_s)
    for name, prices in (("cold", None), ("warm", host.prices), ("warm_mean", mean_prices)):
        problems = make_problems(scores, k, None, 1.0, None, on_device=True)
        work = route_on_device(problems, prices, DEVICE_PRICE_STEPS, None).work.cpu()
        result = solve(scores, k, engine="device", prices=prices)
        optimum = host.score.double().cpu()
        gap = float(((optimum - result.score.double().cpu()).abs() / optimum.abs()).max())
        row |= {
            f"{name}_steps": float(work[:, 0].mean()),
            f"{name}_augmentations": float(work[:, 1].mean()),
            f"{name}_augmentations_max": int(work[:, 1].max()),
            f"{name}_fallbacks": int(result.fallback.sum()),
            f"{name}_gap_vs_host": gap,
        }
        if cuda:

            def call(p=prices):
                solve(scores, k, engine="device", prices=p)
                torch.cuda.synchronize()

            row[f"{name}_x_topk"] = timed_ms(call, budget_s) / row["topk_ms"]
    return row


def buckets(row: dict) -> dict[str, str]:
    """The buckets a row falls in, by dimension."""
    num_experts, k, bias = row["num_experts"], row["k"], row["bias"]
    ratio = k / num_experts
    return {
        "E": "8-31"
        if num_experts < 32
        else "32-127"
        if num_experts < 128
        else "128-255"
        if num_experts < 256
        else "256-512",
        "bias": "< 1" if bias < 1 else ">= 1",
        "k / E": "< 1/32" if ratio < 1 / 32 else "1/32-1/8" if ratio < 1 / 8 else ">= 1/8",
        "N": str(row["num_tokens"])
        if row["groups"] > 1
        else (
            "< 2048" if row["num_tokens"] < 2048 else "2048-4095" if row["num_tokens"] < 4096 else ">= 4096"
        ),
        "scores": row["distribution"],
        "capacity": "slack" if (row["num_tokens"] * k) % num_experts else "exact",
    }


BUCKET_ORDER = ("8-31", "32-127", "128-255", "256-512", "< 1/32", "1/32-1/8", ">= 1/8", "< 2048", "2048-4095")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(rows: list[dict], figures: tuple[str, ...]) -> list[dict]:
    """Median, p90 and max of each figure's ratio, and the work, overall and per bucket."""
    groups: dict[tuple[str, str], list[dict]] = {("all", ""): rows}
    for row in rows:
        for dimension, bucket in buckets(row).items():
            groups.setdefault((dimension, bucket), []).append(row)
    order = ["all", *buckets(rows[0])]

    def position(key: tuple[str, str]) -> tuple[int, int, str]:
        dimension, bucket = key
        rank = BUCKET_ORDER.index(bucket) if bucket in BUCKET_ORDER else len(BUCKET_ORDER)
        return order.index(dimension), rank, bucket

    summary = []
    for (dimension, bucket), members in sorted(groups.items(), key=lambda g: position(g[0])):
        entry = dict(dimension=dimension, bucket=bucket, cases=len(members))
        for figure in figures:
            ratios = [r[f"{figure}_x_topk"] for r in members]
            entry |= {
                f"{figure}_median": statistics.median(ratios),
                f"{figure}_p90": quantile(ratios, 0.9),
                f"{figure}_max": max(ratios),
                f"{figure}_moves": statistics.median(r[f"{figure}_moves"] for r in members),
                f"{figure}_must_move": statistics.median(r[f"{figure}_must_move"] for r in members),
            }
        summary.append(entry)
    return summary


def format_summary(title: str, summary: list[dict], figures: tuple[str, ...]) -> str:
    head = (
        "| bucket | cases | "
        + " | ".join(f"{f}: median / p90 / max x topk | moves / must move (median)" for f in figures)
        + " |"
    )
    lines = [f"### {title}", "", head, "|---|---:|" + "---|---:|" * len(figures)]
    for s in summary:
        name = "all" if s["dimension"] == "all" else f"{s['dimension']} {s['bucket']}"
        cells = " | ".join(
            f"{s[f'{f}_median']:.1f} / {s[f'{f}_p90']:.1f} / {s[f'{f}_max']:.0f} | "
            f"{s[f'{f}_moves']:.0f} / {s[f'{f}_must_move']:.0f}"
            for f in figures
        )
        lines.append(f"| {name} | {s['cases']} | {cells} |")
    return "\n".join(lines)


def format_device(rows: list[dict]) -> str:
    names = ("cold", "warm", "warm_mean")
    timed = all("cold_x_topk" in r for r in rows)
    lines = [
        f"### Fused device kernel ({rows[0]['groups']} groups per case; warm: from the host optimum, "
        "warm_mean: from the previous batch's mean prices)",
        "",
        "| N | E | k | scores | bias | dense | steps cold/warm/warm_mean | augmentations (max) "
        "| fallbacks | gap vs host |" + (" x topk |" if timed else ""),
        "|---:|---:|---:|---|---:|---|---|---|---|---:|" + ("---|" if timed else ""),
    ]
    for r in rows:
        steps = "/".join(f"{r[f'{n}_steps']:.1f}" for n in names)
        augmentations = "/".join(
            f"{r[f'{n}_augmentations']:.1f} ({r[f'{n}_augmentations_max']})" for n in names
        )
        fallbacks = "/".join(str(r[f"{n}_fallbacks"]) for n in names)
        gap = max(r[f"{n}_gap_vs_host"] for n in names)
        time_cells = (" " + "/".join(f"{r[f'{n}_x_topk']:.1f}" for n in names) + " |") if timed else ""
        lines.append(
            f"| {r['num_tokens']} | {r['num_experts']} | {r['k']} | {r['distribution']} | {r['bias']:.2f} | "
            f"{r['dense']} | {steps} | {augmentations} | {fallbacks} | {gap:.1e} |" + time_cells
        )
    return "\n".join(lines)


def run_cases(name: str, cases: list[dict], run: Callable[[dict, int, float], dict], budget_s: float):
    """(rows, rows left out) of ``run`` over ``cases``, with progress on stderr."""
    rows, left_out = [], []
    for i, case in enumerate(cases):
        row = run(case, i, budget_s)
        (left_out if row.get("left_out") else rows).append(row)
        cold = row.get("cold_x_topk", math.inf)
        print(f"  {name} {i + 1}/{len(cases)} {case} cold {cold:.1f}x", file=sys.stderr)
    return rows, left_out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", type=int, default=240, help="single-group shapes")
    parser.add_argument("--batches", type=int, default=80, help="batched shapes (32 groups each)")
    parser.add_argument("--device-kernel", type=int, default=0, metavar="CASES", help="device kernel cases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds of repeats per figure")
    parser.add_argument("--out", help="JSON output")
    parser.add_argument("--md", help="markdown output with the environment")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(SEED)
    single = [draw_shape(rng, batched=False) for _ in range(args.shapes)]
    batched = [draw_shape(rng, batched=True) for _ in range(args.batches)]
    rows, left_out = run_cases("single", single, single_case, args.budget)
    batch_rows, batch_left_out = run_cases("batched", batched, batched_case, args.budget)
    device_rows = []
    # the device cases are drawn apart (their own seed); under the interpreter (a CPU) only
    # groups of at most 256 tokens: it runs each operation of the kernel in numpy
    device_rng = random.Random(SEED + 1)
    small: list[dict] = []
    while len(small) < args.device_kernel:
        case = draw_shape(device_rng, batched=True)
        if torch.cuda.is_available() or case["num_tokens"] <= 256:
            small.append(case)
    for i, case in enumerate(small):
        device_rows.append(device_case(case, 50_000 + i, args.budget))
        print(f"  device {i + 1}/{len(small)} {case}", file=sys.stderr)
    single_figures, batch_figures = ("cold", "warm_optimum", "warm_next"), ("cold", "warm_mean")
    parts = []
    results: dict = {}
    if rows:
        results["single"] = dict(rows=rows, summary=summarize(rows, single_figures), left_out=left_out)
        title = f"Single groups ({len(left_out)} shapes left out: cold solve over {LEFT_OUT_S:.0f} s)"
        parts.append(format_summary(title, results["single"]["summary"], single_figures))
    if batch_rows:
        results["batched"] = dict(
            rows=batch_rows, summary=summarize(batch_rows, batch_figures), left_out=batch_left_out
        )
        title = (
            f"Batched ({GROUPS} groups per call; {len(batch_left_out)} shapes left out: cold solve over "
            f"{GROUPS * LEFT_OUT_S / 8:.0f} s)"
        )
        parts.append(format_summary(title, results["batched"]["summary"], batch_figures))
    if device_rows:
        results["device"] = dict(rows=device_rows)
        parts.append(format_device(device_rows))
    write_report("Solver sweep", "\n\n".join(parts), results, args.out, args.md, args.concurrent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
