"""Expert-parallel training throughput and the cost of global routing.

    python benchmarks/bench_parallel.py [--presets tiny,small] [--worlds 1,2] [--steps 5]
                                        [--rounds 1] [--routers maxscore] [--device cpu|cuda]
                                        [--compile] [--out results.json] [--md results.md]

For each preset (its model and global batch), routing (``sequence``: each rank solves its own
sequences, the paper's option A; ``global``: one exact routing over all ranks' tokens, option
B) and world size: training steps (forward, backward, gradient reduction, clipping, AdamW) on
random tokens, with the experts sharded over all ranks and the rest data parallel (DDP).
Reported: median step time (over the steps of every round: ``--rounds R`` measures each
configuration of a preset R times, interleaved, so that a slow spell of a shared machine hits
them all alike), tokens/s, the ratio to world size 1 of the same routing ("x world 1"), the
ratio of global to per-rank routing at the same world size ("x sequence"), and for
global routing the collectives (the gathered scores of small problems; otherwise all-reduces
of [E] or [E, E] summaries, a candidate round, rarely rounds of [E, E] costs) and bytes per
step it adds on each rank (every MoE layer's ``solve_global``, summed) and its augmenting
paths.  World size 1 uses every core in one process; world size W
uses W processes of (cores / W) threads, gloo on the CPU, NCCL on GPUs (one GPU per rank).
``--routers gshard,maxscore,flow_only`` measures each router's training throughput (global
routing only for the MaxScore family); "x gshard" divides by gshard's tokens/s in the same run.
``--compile`` adds, on one process and per-rank routing, each configuration with every decoder
block compiled (``torch.compile(fullgraph=True)``, as ``maxscore train --compile``; the warm-up
steps hold the compilation): "x eager" divides its tokens/s by the eager run's, and "x gshard"
compares compiled with compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from torch import nn

from maxscore.bench import write_report
from maxscore.model import Decoder
from maxscore.parallel.data_parallel import data_parallel, optimizer_step
from maxscore.parallel.expert_parallel import parallelize_moe
from maxscore.parallel.launch import spawn
from maxscore.parallel.topology import make_topology
from maxscore.routers.maxscore import MaxScoreRouter
from maxscore.train.config import make_config
from maxscore.train.loop import make_optimizer

WARMUP = 3  # steps left out: the routers' averaged prices (the warm start) settle
GLOBAL_ROUTERS = ("maxscore", "flow_only")


def run_steps(preset: str, router: str, group: str, steps: int, device: str, compiled: bool = False) -> dict:
    """Times training steps in this process (one rank of the current process group, or alone)."""
    config = make_config(
        preset, router=router, router_options={"group": group}, device=device, precision="float32"
    )
    topology = make_topology()
    if device == "cuda" and topology.distributed:
        device = f"cuda:{torch.cuda.current_device()}"
    torch.manual_seed(0)
    model = Decoder(config.model).to(device)
    if compiled:
        for block in model.blocks:
            block.compile(fullgraph=True)
    runner = model
    if topology.distributed:
        parallelize_moe(model, expert_group=topology.expert_group)
        runner = data_parallel(model)
    optimizer = make_optimizer(model, config)
    share = config.batch_size // topology.world_size
    rows = slice(topology.rank * share, (topology.rank + 1) * share)
    routers = [m for m in model.modules() if isinstance(m, MaxScoreRouter)]
    times, reduces, sent, augmentations = [], [], [], []
    for step in range(WARMUP + steps):
        generator = torch.Generator().manual_seed(step)
        shape = (config.batch_size, config.model.seq_len + 1)
        batch = torch.randint(0, config.model.vocab_size, shape, generator=generator)[rows].to(device)
        _sync(device)
        begin = time.perf_counter()
        result = runner(batch[:, :-1])
        loss = nn.functional.cross_entropy(result.logits.flatten(0, 1), batch[:, 1:].flatten())
        (loss + result.aux_loss).backward()
        optimizer_step(model, optimizer, config.clip, topology)
        _sync(device)
        if step >= WARMUP:
            times.append(time.perf_counter() - begin)
            solves = [r.last_global for r in routers if r.last_global is not None]
            reduces.append(sum(s.collectives for s in solves))
            sent.append(sum(s.bytes_sent for s in solves))
            augmentations.append(sum(s.augmentations for s in solves))
    step_s = statistics.median(times)
    return {
        "preset": preset,
        "router": router,
        "routing": group,
        "mode": "compiled" if compiled else "eager",
        "world_size": topology.world_size,
        "threads_per_rank": torch.get_num_threads(),
        "device": device,
        "tokens_per_step": config.batch_size * config.model.seq_len,
        "step_ms": step_s * 1e3,
        "tokens_per_s": config.batch_size * config.model.seq_len / step_s,
        "collectives_per_step": statistics.mean(reduces),
        "bytes_per_step": statistics.mean(sent),
        "augmentations_per_step": statistics.mean(augmentations),
        "step_ms_all": [t * 1e3 for t in times],
    }


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rank(
    rank: int,
    world_size: int,
    preset: str,
    router: str,
    group: str,
    steps: int,
    device: str,
    threads: int,
    out: str,
):
    torch.set_num_threads(threads)
    row = run_steps(preset, router, group, steps, device)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(row, f)


def measure(
    preset: str,
    router: str,
    group: str,
    world_size: int,
    steps: int,
    device: str,
    cores: int,
    compiled: bool = False,
) -> dict:
    if world_size == 1:
        torch.set_num_threads(cores)
        return run_steps(preset, router, group, steps, device, compiled)
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "row.json")
        backend = "nccl" if device == "cuda" else "gloo"
        threads = max(1, cores // world_size)
        spawn(_rank, world_size, preset, router, group, steps, device, threads, out, backend=backend)
        with open(out) as f:
            return json.load(f)


def pooled(runs: list[dict]) -> dict:
    """One row from rounds of the same configuration: the median over all their steps."""
    times = [t for run in runs for t in run["step_ms_all"]]
    step_ms = statistics.median(times)
    return {
        **runs[0],
        "rounds": len(runs),
        "step_ms": step_ms,
        "tokens_per_s": runs[0]["tokens_per_step"] / step_ms * 1e3,
        "step_ms_all": times,
        **{
            name: statistics.mean(run[name] for run in runs)
            for name in ("collectives_per_step", "bytes_per_step", "augmentations_per_step")
        },
    }


def format_table(rows: list[dict]) -> str:
    lines = [
        "| preset | router | routing | mode | world | threads/rank | step ms | tokens/s | x world 1 "
        "| x sequence | x gshard | x eager | collectives/step | KiB sent/step | augmenting paths/step |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    key = lambda r: (r["preset"], r["router"], r["routing"], r["mode"])  # noqa: E731
    base = {key(r): r["tokens_per_s"] for r in rows if r["world_size"] == 1}
    gshard = {
        (r["preset"], r["routing"], r["mode"], r["world_size"]): r["tokens_per_s"]
        for r in rows
        if r["router"] == "gshard"
    }
    sequence = {
        (r["preset"], r["router"], r["mode"], r["world_size"]): r["tokens_per_s"]
        for r in rows
        if r["routing"] == "sequence"
    }
    eager = {
        (r["preset"], r["router"], r["routing"], r["world_size"]): r["tokens_per_s"]
        for r in rows
        if r["mode"] == "eager"
    }
    for r in rows:
        ratio = r["tokens_per_s"] / base[key(r)] if key(r) in base else None
        reference = gshard.get((r["preset"], r["routing"], r["mode"], r["world_size"]))
        versus = "" if reference is None else f"{r['tokens_per_s'] / reference:.2f}"
        local = sequence.get((r["preset"], r["router"], r["mode"], r["world_size"]))
        per_rank = "" if local is None else f"{r['tokens_per_s'] / local:.2f}"
        plain = eager.get((r["preset"], r["router"], r["routing"], r["world_size"]))
        compiled = "" if plain is None or r["mode"] == "eager" else f"{r['tokens_per_s'] / plain:.2f}"
        lines.append(
            f"| {r['preset']} | {r['router']} | {r['routing']} | {r['mode']} | {r['world_size']} | "
            f"{r['threads_per_rank']} | {r['step_ms']:.0f} | {r['tokens_per_s']:.0f} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} | {per_rank} | {versus} | {compiled} | "
            f"{r['collectives_per_step']:.0f} | {r['bytes_per_step'] / 1024:.1f} | "
            f"{r['augmentations_per_step']:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--worlds", default="1,2")
    parser.add_argument("--routings", default="sequence,global")
    parser.add_argument("--routers", default="maxscore", help="comma-separated router names")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every configuration of a preset this many times, interleaved, and pool the steps",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks"
    )
    parser.add_argument(
        "--compile", action="store_true", help="also each one-process, per-rank configuration compiled"
    )
    parser.add_argument("--out", help="write the rows as JSON")
    parser.add_argument("--md", help="write a markdown report")
    parser.add_argument("--concurrent", default="nothing", help="what else ran meanwhile, for the report")
    args = parser.parse_args(argv)
    rows = []
    for preset in args.presets.split(","):
        configs = [
            (router, group, world_size, compiled)
            for router in args.routers.split(",")
            for group in args.routings.split(",")
            if group != "global" or router in GLOBAL_ROUTERS
            for world_size in (int(w) for w in args.worlds.split(","))
            for compiled in (False, True)
            if not compiled or (args.compile and world_size == 1 and group != "global")
        ]
        measured = {config: [] for config in configs}
        for round_ in range(args.rounds):  # interleaved: a slow spell of the machine hits every configuration
            for router, group, world_size, compiled in configs:
                mode = "compiled" if compiled else "eager"
                label = f"{preset} {router} {group} {mode} world {world_size} round {round_ + 1}"
                print(f"  {label} ...", file=sys.stderr, flush=True)
                row = measure(
                    preset, router, group, world_size, args.steps, args.device, args.cores, compiled
                )
                measured[router, group, world_size, compiled].append(row)
        rows += [pooled(runs) for runs in measured.values()]
    title = "Expert-parallel training throughput"
    write_report(title, format_table(rows), rows, args.out, args.md, args.concurrent)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
