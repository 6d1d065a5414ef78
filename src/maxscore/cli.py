"""The ``maxscore`` command line: argparse subcommands; ``main(argv) -> int``."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from collections.abc import Sequence


def _solve_bench(args: argparse.Namespace) -> int:
    from maxscore.bench import (
        DISTRIBUTIONS,
        QUICK_SIZES,
        SIZES,
        bench_batched,
        bench_solvers,
        format_table,
        rows_as_dicts,
    )

    sizes = QUICK_SIZES if args.quick else SIZES
    distributions = ("std1", "std1+bias") if args.quick else tuple(DISTRIBUTIONS)

    def progress(message: str) -> None:
        print(f"  running {message} ...", file=sys.stderr, flush=True)

    budget = 0.3 if args.quick else 1.0
    rows = bench_batched(budget_s=budget, progress=progress)
    rows += bench_solvers(sizes, distributions, budget_s=budget, paper=not args.no_paper, progress=progress)
    print(format_table(rows))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows_as_dicts(rows), f, indent=1)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def _overrides(args: argparse.Namespace) -> dict:
    """The settings given on the command line (``--set KEY=VALUE`` and the named flags)."""
    from maxscore.train.config import parse_override

    overrides = dict(parse_override(text) for text in args.set or [])
    for name in ("steps", "data", "device", "hf_model"):
        if getattr(args, name, None) is not None:
            overrides[name] = getattr(args, name)
    if getattr(args, "compile", False):
        overrides["compile"] = True
    return overrides


def _config(args: argparse.Namespace, **fixed):
    from maxscore.train.config import make_config

    return make_config(args.preset, **{**_overrides(args), **fixed})


def _train(args: argparse.Namespace) -> int:
    from maxscore.parallel.launch import launched_by_torchrun

    config = _config(args, router=args.router, seed=args.seed)
    if args.nproc is not None:
        return _train_spawned(args, config)
    if not launched_by_torchrun():
        return _print_final(_run_train(config, args.out, not args.quiet))
    from maxscore.parallel.launch import destroy_process_group, init_process_group

    init_process_group(timeout_s=args.dist_timeout)
    try:
        final = _run_train(config, args.out, not args.quiet, args.dist_timeout)
    finally:
        destroy_process_group()
    return _print_final(final) if int(os.environ["RANK"]) == 0 else 0


def _run_train(config, out: str, progress: bool, timeout_s: float | None = None) -> dict:
    from maxscore.parallel.launch import explain_timeouts
    from maxscore.train.loop import train

    with explain_timeouts(timeout_s) if timeout_s is not None else contextlib.nullcontext():
        return train(config, out, progress=progress)


def _train_rank(rank: int, world_size: int, config_json: str, out: str, progress: bool, timeout_s: float):
    from maxscore.train.config import TrainConfig

    final = _run_train(TrainConfig.from_json(config_json), out, progress and rank == 0, timeout_s)
    if rank == 0:
        _print_final(final)


def _train_spawned(args: argparse.Namespace, config) -> int:
    import torch.multiprocessing as mp

    from maxscore.parallel.launch import default_backend, spawn

    if args.nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {args.nproc}")
    backend = default_backend() if config.device != "cpu" else "gloo"
    try:
        spawn(
            _train_rank,
            args.nproc,
            config.to_json(),
            args.out,
            not args.quiet,
            args.dist_timeout,
            backend=backend,
            timeout_s=args.dist_timeout,
        )
    except mp.ProcessRaisedException as error:
        text = str(error).strip().splitlines()
        print(f"maxscore train: a rank failed:\n{text[-1] if text else error}", file=sys.stderr)
        return 2 if text and text[-1].startswith("ValueError") else 1
    return 0


def _print_final(final: dict) -> int:
    print(json.dumps({key: value for key, value in final.items() if key != "last"}, indent=1))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from maxscore.train.loop import train
    from maxscore.train.report import write_report
    from maxscore.train.variants import parse_variants

    variants = parse_variants(args.routers)
    steps = _config(args).steps
    base_options = _overrides(args).get("router_options") or {}  # options of every variant
    if not isinstance(base_options, dict):
        raise ValueError(f"--set router_options must be a JSON object of options, got {base_options!r}")
    configs = {}
    for seed in range(args.seeds):  # seed-major: an interrupted comparison still covers every router
        for variant in variants:  # every setting is checked before the first run starts
            overrides = variant.overrides(steps)
            if "router_options" in overrides:
                overrides["router_options"] = {**base_options, **overrides["router_options"]}
            configs[variant.folder, seed] = _config(
                args, router=variant.router, seed=seed, label=variant.label, **overrides
            )
    out = Path(args.out)
    for (folder, seed), config in configs.items():
        run = out / f"{folder}-s{seed}"
        if (run / "final.json").is_file():  # resume: finished runs are kept
            print(f"== {config.label}, seed {seed}: finished, skipped", file=sys.stderr, flush=True)
            continue
        print(f"== {config.label}, seed {seed}", file=sys.stderr, flush=True)
        train(config, run, progress=not args.quiet)
    report_dir = Path(args.report) if args.report else out
    print(
        write_report(
            [out / f"{folder}-s{seed}" for folder, seed in configs], report_dir, baseline=args.baseline
        )
    )
    print(f"wrote {report_dir / 'results.md'}, results.json and the plots", file=sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import torch

    from maxscore.train.data import load_corpus
    from maxscore.train.evaluate import evaluate
    from maxscore.train.loop import resolve_device
    from maxscore.train.tokenizer import encode

    device = resolve_device(args.device or "auto")
    from maxscore.train.checkpoint import load_model

    model, checkpoint = load_model(args.checkpoint, device)
    corpus = load_corpus(args.data if args.data else checkpoint.config.data)
    documents = list(corpus.documents) if args.data else corpus.split(args.split)
    stream = encode(checkpoint.tokenizer, documents)
    with torch.no_grad():
        result = evaluate(
            model, stream, batch_size=checkpoint.config.batch_size, causal=args.causal, device=device
        )
    split = "all" if args.data else args.split
    print(json.dumps({**result, "split": split, "causal": args.causal, "step": checkpoint.step}))
    return 0


def _export(args: argparse.Namespace) -> int:
    from maxscore.train.export import export_run

    out, format = export_run(args.checkpoint, args.out, args.format)
    how = {
        "maxscore": "AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)",
        "hf": "`import maxscore.hf` then AutoModelForCausalLM.from_pretrained(folder)",
    }.get(format, "AutoModelForCausalLM.from_pretrained(folder), or `vllm serve folder`")
    print(f"wrote {out} ({format}): load it with {how}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from maxscore.train.report import write_report

    print(write_report(args.runs, args.out or args.runs[0], baseline=args.baseline))
    return 0


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", help="tiny, small, paper-162m, ... (default tiny)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: the preset's)")
    parser.add_argument(
        "--data", help="a text file or a directory of *.txt files (default: the bundled corpus)"
    )
    parser.add_argument("--device", help="auto (default), cpu or cuda")
    parser.add_argument("--out", required=True, help="run directory")
    parser.add_argument(
        "--set", action="append", metavar="KEY=VALUE", help="override any setting, e.g. lr=1e-3"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile each decoder block with torch.compile(fullgraph=True) (checkpoints as eager runs')",
    )


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

    train = sub.add_parser(
        "train", help="train one model", description="Trains (or resumes) one run in --out."
    )
    _add_run_options(train)
    train.add_argument("--router", default="maxscore", help="a router name or 'dense' (default maxscore)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument(
        "--hf-model",
        help="train an upcycled HF model: a dense Llama/Qwen2/Mistral directory (weights are upcycled) "
        "or its config.json (fresh weights); needs pip install 'maxscore[hf]'",
    )
    train.add_argument(
        "--nproc",
        type=int,
        help="start N local processes (gloo on CPU, NCCL on GPUs): experts sharded over them, "
        "the rest data parallel; or launch with torchrun --nproc_per_node=N -m maxscore train ...",
    )
    train.add_argument(
        "--dist-timeout",
        type=float,
        default=300.0,
        help="seconds a rank waits for the others in a collective before it stops (default 300)",
    )
    train.set_defaults(run=_train)

    compare = sub.add_parser(
        "compare",
        help="train several routers x seeds on equal tokens and write a report",
        description="Trains every router variant for every seed into --out/<variant>-s<seed> (runs "
        "that finished are kept: an interrupted comparison resumes), then writes results.md, "
        "results.json and the plots.  A variant is ROUTER[@METHOD][:KEY=VALUE]..., e.g. "
        "'maxscore@two_stage', 'gshard:normalize=false', 'maxscore:soft_topk=true:schedule.steps=10%%', "
        "'flow_only:capacity_factor=1.25'; 'switch' runs with k=1.  Within a seed every variant starts "
        "from the same weights and sees the same batches: results list paired differences to --baseline.",
    )
    _add_run_options(compare)
    compare.add_argument(
        "--routers",
        default="maxscore,gshard,dense",
        help="comma-separated variants ROUTER[@METHOD][:KEY=VALUE]... or 'dense' "
        "(default maxscore,gshard,dense)",
    )
    compare.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 (default 1)")
    compare.add_argument(
        "--baseline", help="variant the paired differences refer to (default: gshard when compared)"
    )
    compare.add_argument("--report", help="folder for results.md/json and plots (default: --out)")
    compare.set_defaults(run=_compare)

    evaluate = sub.add_parser("eval", help="evaluate a checkpoint: loss, perplexity, bits per character")
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    evaluate.add_argument(
        "--data", help="a text file or directory to evaluate (default: the run's test split)"
    )
    evaluate.add_argument("--split", default="test", choices=("train", "validation", "test"))
    evaluate.add_argument("--causal", action="store_true", help="route every token alone (generation mode)")
    evaluate.add_argument("--device", help="auto (default), cpu or cuda")
    evaluate.set_defaults(run=_eval)

    export = sub.add_parser(
        "export",
        help="write a trained run as an HF model directory (config, safetensors, tokenizer)",
        description="Exports a run (folder or checkpoint file) for transformers and the serving engines, "
        "routed causally (token by token) as in generation: MoE runs as Ernie4_5_MoeForCausalLM "
        "(softmax gates, renormalized weights), Glm4MoeForCausalLM (sigmoid gates) or, for any other "
        "rule, a model with its modeling code in the folder (trust_remote_code=True); dense runs as "
        "LlamaForCausalLM, --hf-model runs as their HF class.  Needs pip install 'maxscore[hf]'.",
    )
    export.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    export.add_argument(
        "--format",
        default="auto",
        choices=("auto", "ernie4_5_moe", "glm4_moe", "maxscore"),
        help="auto (default): ernie4_5_moe for softmax gates with renormalized weights, glm4_moe for "
        "sigmoid gates, else maxscore (remote code)",
    )
    export.add_argument("--out", required=True, help="a new (or empty) folder")
    export.set_defaults(run=_export)

    report = sub.add_parser("report", help="markdown report and plots from finished runs")
    report.add_argument("runs", nargs="+", help="run directories, or folders holding them")
    report.add_argument("--out", help="output folder (default: the first argument)")
    report.add_argument(
        "--baseline", help="label of the configuration paired differences are taken to (default: gshard)"
    )
    report.set_defaults(run=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except ValueError as error:  # bad settings or inputs: one clear line, exit status 2
        print(f"maxscore {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
