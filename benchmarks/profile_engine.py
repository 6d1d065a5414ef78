"""Where a device-engine call spends its time: torch.profiler tables of warm and cold
``solve(..., engine="device")`` calls and of a ``maxscore`` router's forward against ``gshard``'s.

    python benchmarks/profile_engine.py [--device cuda] [--calls 20] [--out DIR]

Per case: the wall time per call (``maxscore.bench.median_ms``: median, device work waited for), then the
profiler's operations by total host time (kernel launches, copies, synchronizations and the
engine's ranges: ``maxscore::route_kernel``, ``host::fallback``) with their device time.  With
``--out`` the tables and the Chrome traces of the small shape's calls and of the routers are written there.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from maxscore import MoELayer, solve
from maxscore.bench import make_scores, median_ms

TRACED = ("warm_64x", "cold_64x", "router_")  # the cases whose Chrome trace is written


def profiled(name: str, fn, device: str, calls: int, out: Path | None) -> str:
    for _ in range(3):  # compilation and caches out of the numbers
        fn()
    ms = median_ms(fn, budget_s=60.0, max_reps=calls)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(calls):
            with record_function(f"call::{name}"):
                fn()
        if device == "cuda":
            torch.cuda.synchronize()
    if out is not None and name.startswith(TRACED):
        prof.export_chrome_trace(str(out / f"trace_{name}.json"))
    table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=30, max_name_column_width=48)
    return f"## {name}: {ms:.3f} ms per call (median of {calls})\n\n{table}\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
    device, calls = args.device, args.calls
    cases = []
    for groups, tokens, experts, k in ((64, 512, 16, 2), (16, 4096, 64, 8)):
        scores = make_scores(tokens, experts, "std1+bias", groups=groups).to(device)
        prices = solve(scores, k, engine="host").prices
        shape = f"{groups}x{tokens}x{experts}x{k}"
        cases += [
            (f"topk_{shape}", partial(torch.topk, scores.reshape(-1, experts), k, dim=1)),
            (f"warm_{shape}", partial(solve, scores, k, engine="device", prices=prices)),
            (f"cold_{shape}", partial(solve, scores, k, engine="device")),
        ]
    x = torch.randn(8 * 512, 768, device=device)
    for name in ("gshard", "maxscore"):
        torch.manual_seed(0)
        router = MoELayer(768, 1536, 16, 2, router=name).to(device).train().router
        cases.append((f"router_{name}", partial(router, x, sequence_length=512)))
    reports = [profiled(name, fn, device, calls, args.out) for name, fn in cases]
    text = "\n".join(reports)
    print(text)
    if args.out is not None:
        (args.out / "profile_engine.txt").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
