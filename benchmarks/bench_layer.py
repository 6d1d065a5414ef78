"""MoE layer benchmark: forward+backward time of ``MoELayer`` for every router, vs ``gshard``.

    python benchmarks/bench_layer.py [--quick] [--out results.json] [--md results.md]

The paper's smallest configuration (D 768, F 1536, E 16, k 2, 8 sequences x 512 tokens,
float32, capacity_factor 1, per-sequence routing groups).  Every router runs on the same
input and the same expert weights; the runs are interleaved round by round so that drift in
the machine's speed hits every router alike, and each time is the median over the rounds.
Also reported: the router's own forward time, "routing x gshard" = (gshard's layer time +
this router's forward time - gshard's router forward time) / gshard's layer time, i.e. the
layer ratio if only the routing differed (the expert matmuls dominate and vary by +-10%
between runs on a small machine), the dropped fraction and the load spread.
``paper_hungarian`` is the authors' design (two-stage: exact top-1 under capacity, then a
Hungarian matching per 512-token sequence on the CPU) with SoftTopk weights.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from maxscore import MoEConfig, MoELayer
from maxscore.bench import paper_design, write_report
from maxscore.routers import ROUTERS
from maxscore.routers.groups import Selection
from maxscore.routers.maxscore import MaxScoreRouter

PAPER_DESIGN = "paper_hungarian"
BASELINE = "gshard"


class PaperDesignRouter(MaxScoreRouter):
    """MaxScore with the authors' two-stage Hungarian design as the solver (k = 2 only)."""

    def select(self, scores_TE, logits_TE, valid_T, groups, capacity_G) -> Selection:
        begin = time.perf_counter()
        routed = paper_design(scores_TE.detach().cpu(), self.k, group=groups.size)
        experts_TK = routed.experts.to(scores_TE.device)
        return Selection(experts_TK=experts_TK, solver_ms=(time.perf_counter() - begin) * 1e3)


def make_layer(name: str, dim: int, hidden: int, num_experts: int, k: int) -> MoELayer:
    if name == PAPER_DESIGN:
        router = PaperDesignRouter(dim, MoEConfig(num_experts=num_experts, k=k))
        return MoELayer(dim, hidden, num_experts, k, router=router)
    return MoELayer(dim, hidden, num_experts, 1 if name == "switch" else k, router=name)


def layer_input(layer: MoELayer, batch: int, length: int, bias: float, seed: int) -> torch.Tensor:
    """N(0, 1) hidden states plus a shared direction that adds ``bias`` x N(0, 1) to each expert's logit."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, layer.dim, generator=generator)
    if bias:
        target_E = torch.randn(layer.num_experts, generator=generator) * bias
        x += torch.linalg.pinv(layer.router.gate.weight.detach()) @ target_E
    return x


def bench_layer(
    routers, *, dim, hidden, num_experts, k, batch, length, bias, rounds, seed=0, progress=None, device="cpu"
):
    torch.manual_seed(seed)
    layers = {name: make_layer(name, dim, hidden, num_experts, k) for name in routers}
    reference = layers[BASELINE]
    for layer in layers.values():  # the same gate and experts everywhere
        layer.experts.load_state_dict(reference.experts.state_dict())
        layer.router.gate.load_state_dict(reference.router.gate.state_dict())
    x = layer_input(reference, batch, length, bias, seed).to(device)
    for layer in layers.values():
        layer.to(device)
    x_TD = x.reshape(-1, dim)
    times = {name: [] for name in routers}
    router_times = {name: [] for name in routers}
    last = {}
    for round_index in range(rounds + 1):  # round 0 warms up
        for name, layer in layers.items():
            if progress:
                progress(f"round {round_index}/{rounds} {name}")
            _sync(device)
            begin = time.perf_counter()
            out = layer(x)
            (out.output.square().mean() + out.aux_loss).backward()
            _sync(device)
            elapsed = time.perf_counter() - begin
            layer.zero_grad(set_to_none=True)
            begin = time.perf_counter()
            with torch.no_grad():
                layer.router(x_TD, sequence_length=length)
            _sync(device)
            router_elapsed = time.perf_counter() - begin
            if round_index:
                times[name].append(elapsed * 1e3)
                router_times[name].append(router_elapsed * 1e3)
            last[name] = out.stats
    base_ms = statistics.median(times[BASELINE])
    base_router_ms = statistics.median(router_times[BASELINE])
    rows = []
    for name in routers:
        ms = statistics.median(times[name])
        router_ms = statistics.median(router_times[name])
        ratio = last[name].load_ratio()
        rows.append(
            {
                "router": name,
                "k": layers[name].k,
                "ms": ms,
                "ratio_to_gshard": ms / base_ms,
                "router_ms": router_ms,
                # the layer time if only the routing differed from gshard's: robust to matmul noise
                "routing_ratio_to_gshard": (base_ms + router_ms - base_router_ms) / base_ms,
                "times_ms": times[name],
                "dropped_fraction": last[name].dropped_fraction,
                "dropped_later": last[name].as_dict()["dropped_later"],
                "load_ratio_min": float(ratio.min()),
                "load_ratio_max": float(ratio.max()),
            }
        )
    return rows


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def format_table(rows, title: str) -> str:
    lines = [
        f"**{title}**",
        "",
        "| router | k | fwd+bwd ms | x gshard | router fwd ms | routing x gshard | dropped "
        "| dropped later | load/cap min | max |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['router']} | {r['k']} | {r['ms']:.0f} | {r['ratio_to_gshard']:.3f} "
            f"| {r['router_ms']:.1f} | {r['routing_ratio_to_gshard']:.3f} | "
            f"{r['dropped_fraction']:.2%} | {r['dropped_later']:.2%} | {r['load_ratio_min']:.2f} | "
            f"{r['load_ratio_max']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a small configuration, 2 rounds")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", help="JSON output")
    parser.add_argument("--md", help="markdown output with the environment")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--routers", help="comma-separated router names (default: every router and the paper's design)"
    )
    args = parser.parse_args()
    config = dict(dim=768, hidden=1536, num_experts=16, k=2, batch=8, length=512)
    if args.quick:
        config.update(dim=128, hidden=256, batch=4, length=256)
    routers = (*ROUTERS, PAPER_DESIGN) if args.routers is None else tuple(args.routers.split(","))
    unknown = sorted(set(routers) - {*ROUTERS, PAPER_DESIGN})
    if unknown or "gshard" not in routers:
        parser.error(f"--routers: unknown {unknown} (and gshard, the baseline, must be among them)")
    results, tables = {}, []
    for label, bias in (("std1", 0.0), ("std1+bias", 1.0)):
        rows = bench_layer(
            routers,
            **config,
            bias=bias,
            rounds=2 if args.quick else args.rounds,
            device=args.device,
            progress=lambda m, label=label: print(f"  {label} {m}", file=sys.stderr, flush=True),
        )
        results[label] = rows
        shape = ", ".join(f"{key} {value}" for key, value in config.items())
        tables.append(format_table(rows, f"{shape}; router logits {label}"))
    title = f"MoE layer benchmark ({args.device})"
    text = "\n\n".join(tables)
    write_report(title, text, {"config": config, "results": results}, args.out, args.md, args.concurrent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
