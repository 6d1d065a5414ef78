"""The training loop: AdamW, warmup + cosine, clipping, accumulation, logging, checkpoints, resume.

A run directory holds ``config.json``, ``tokenizer.json``, ``metrics.jsonl`` (one JSON object
per logged step: ``step``, ``loss``, learning rate, tokens/s, routing statistics, and
``val_loss`` at evaluation steps), ``checkpoint.pt`` (atomic) and, when the run ends,
``final.json`` (validation and test loss, perplexity and bpc with batch and causal routing,
the last routing statistics).  Batches are a function of (seed, step, micro-batch), so a run
resumed from its checkpoint reproduces the uninterrupted run's losses bit for bit on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import subprocess
import time
from pathlib import Path

import torch
from torch import nn

from maxscore.model import DENSE, Decoder
from maxscore.parallel.data_parallel import data_parallel, optimizer_step
from maxscore.parallel.expert_parallel import parallelize_moe
from maxscore.parallel.topology import Topology, check_same_on_all_ranks, make_topology, mean_over_ranks
from maxscore.routers import ROUTERS, install_step_hook
from maxscore.routers.stats import RoutingStats
from maxscore.train.checkpoint import (
    CHECKPOINT,
    checkpoint_path,
    consolidated_state,
    load_checkpoint,
    save_run_checkpoint,
    write_consolidated,
)
from maxscore.train.config import TrainConfig
from maxscore.train.data import load_corpus
from maxscore.train.evaluate import evaluate
from maxscore.train.models import hf_config_json, make_model
from maxscore.train.tokenizer import encode, save_tokenizer, train_tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def with_schedule(config: TrainConfig) -> TrainConfig:
    """SoftTopk's temperature decays over the whole run unless the router options say otherwise
    (a schedule given as a dict without ``steps`` also takes the run's length)."""
    model = config.model
    given = model.router_options.get("schedule")
    scheduled = model.router != DENSE and ROUTERS[model.router].has_schedule
    if not scheduled or (given is not None and not isinstance(given, dict)):
        return config
    if isinstance(given, dict) and "steps" in given:
        return config
    options = {**model.router_options, "schedule": {"steps": config.steps, **(given or {})}}
    return dataclasses.replace(config, model=dataclasses.replace(model, router_options=options))


def initial_model(config: TrainConfig, hf_config=None) -> nn.Module:
    """The run's model at step 0: seeded by ``config.seed`` alone, so every router of a seed
    starts from the same weights (paired comparisons)."""
    torch.manual_seed(config.seed)
    return make_model(config, hf_config)


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def batch_generator(config: TrainConfig, step: int, micro: int) -> torch.Generator:
    return torch.Generator().manual_seed(config.seed * 1_000_003 + step * 1_009 + micro)


def summarize(stats: list[RoutingStats]) -> dict:
    """Routing statistics averaged over the MoE layers (host-side)."""
    if not stats:
        return {}
    rows = [s.as_dict() for s in stats]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    k = len(rows[0]["affinity_by_rank"])
    summary = {
        "dropped_fraction": mean("dropped_fraction"),
        "dropped_first": mean("dropped_first"),
        "dropped_later": mean("dropped_later"),
        "load_ratio_mean": mean("load_ratio_mean"),
        "load_ratio_min": min(r["load_ratio_min"] for r in rows),
        "load_ratio_max": max(r["load_ratio_max"] for r in rows),
        "load_ratio_sorted": [
            sum(r["load_ratio_sorted"][i] for r in rows) / len(rows)
            for i in range(len(rows[0]["load_ratio_sorted"]))
        ],
        "affinity_by_rank": [sum(r["affinity_by_rank"][i] for r in rows) / len(rows) for i in range(k)],
        "entropy": mean("entropy"),
    }
    solver = [r["solver_ms"] for r in rows if r["solver_ms"] is not None]
    if solver:
        summary["solver_ms"] = sum(solver)
    fallbacks = [r["solver_fallbacks"] for r in rows if r["solver_fallbacks"] is not None]
    if fallbacks:
        summary["solver_fallbacks"] = sum(fallbacks)
    return summary


class MetricsLog:
    """``metrics.jsonl``: one object per logged step; on resume the steps after the checkpoint go."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = _tensorboard(path.parent)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def train(
    config: TrainConfig, out_dir: str | Path, *, progress: bool = True, stop_after: int | None = None
) -> dict:
    """Trains (or resumes) the run in ``out_dir``; returns ``final.json``'s content.

    ``stop_after`` ends the process's work after that many steps (the checkpoint is written),
    as if interrupted; the run resumes from there when called again.  Under an initialized
    process group (``torchrun``, or ``maxscore train --nproc``) every rank calls it: each takes
    its share of every batch (``batch_size`` is the global batch), the experts are sharded over
    ``config.expert_parallel`` ranks and the rest is data parallel; rank 0 writes the logs.
    """
    out = Path(out_dir)
    topology = make_topology(config.expert_parallel)
    resume = _load_resume(out, topology)
    if resume is not None:
        config = resume.config
    config = with_schedule(config)
    check_same_on_all_ranks("training configuration", config.to_json())
    if config.batch_size % topology.world_size:
        raise ValueError(
            f"batch_size={config.batch_size} (the global batch) must be divisible by the world size "
            f"{topology.world_size}"
        )
    device = resolve_device(config.device)
    if device.type == "cuda" and topology.distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    corpus = load_corpus(config.data)
    tokenizer = resume.tokenizer if resume is not None else _shared_tokenizer(corpus, config, topology)
    streams = {split: encode(tokenizer, corpus.split(split)) for split in ("train", "validation", "test")}
    if topology.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(json.loads(config.to_json()), indent=1))
        save_tokenizer(tokenizer, out / "tokenizer.json")

    model = initial_model(config, resume.hf_config if resume is not None else None).to(device)
    runner = _parallelize(model, topology)
    optimizer = make_optimizer(model, config)
    install_step_hook(optimizer, model)
    start = 0
    if resume is not None:
        model.load_state_dict(resume.model_state)
        if resume.optimizer_state is not None:  # None: a finished run's consolidated model
            optimizer.load_state_dict(resume.optimizer_state)
        start = resume.step
    log = MetricsLog(out / "metrics.jsonl", start) if topology.is_main else None
    amp = dict(
        device_type=device.type,
        dtype=getattr(torch, config.precision),
        enabled=device.type == "cuda" and config.precision != "float32",
    )
    tokens_per_step = config.batch_size * config.accumulation * config.model.seq_len
    share = config.batch_size // topology.world_size
    rows = slice(topology.rank * share, (topology.rank + 1) * share)
    bar = _progress_bar(progress and topology.is_main, config.steps, start, out.name)
    end = config.steps if stop_after is None else min(config.steps, start + stop_after)
    clock = time.perf_counter()
    for step in range(start, end):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        loss_sum, aux_sum = 0.0, 0.0
        for micro in range(config.accumulation):
            batch = (
                streams["train"]
                .batch(config.batch_size, config.model.seq_len, batch_generator(config, step, micro))[rows]
                .to(device)
            )
            last = micro == config.accumulation - 1
            with _no_sync(runner, last):  # forward and backward: DDP reduces on the last one
                with torch.autocast(**amp):
                    result = runner(batch[:, :-1])
                    loss = nn.functional.cross_entropy(
                        result.logits.float().flatten(0, 1), batch[:, 1:].flatten()
                    )
                ((loss + result.aux_loss) / config.accumulation).backward()
            loss_sum += float(loss.detach()) / config.accumulation
            aux_sum += float(result.aux_loss.detach()) / config.accumulation
        optimizer_step(model, optimizer, config.clip, topology)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps or done % config.eval_every == 0:
            loss_sum, aux_sum = mean_over_ranks([loss_sum, aux_sum], device)
            elapsed = time.perf_counter() - clock
            row = {
                "step": done,
                "loss": loss_sum,
                "aux_loss": aux_sum,
                "lr": learning_rate(config, step),
                "tokens": done * tokens_per_step,
            }
            row["tokens_per_s"] = tokens_per_step * (done - start) / max(elapsed, 1e-9)
            row.update(summarize(result.stats))
            if done % config.eval_every == 0 or done == config.steps:
                row["val_loss"] = evaluate(
                    model,
                    streams["validation"],
                    batch_size=config.batch_size,
                    limit=config.eval_batches * config.batch_size,
                    device=device,
                )["loss"]
            if log is not None:
                log.write(row)
            if bar is not None:
                bar.set_postfix(
                    loss=f"{loss_sum:.3f}",
                    tok_s=f"{row['tokens_per_s']:.0f}",
                    drop=f"{row.get('dropped_fraction', 0.0):.1%}",
                )
        if bar is not None:
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == end:
            save_run_checkpoint(out, model, optimizer, done, config, tokenizer, topology)
    if bar is not None:
        bar.close()
    if end < config.steps:
        return {}
    return finish(model, config, streams, out, device, topology, tokenizer)


def _load_resume(out: Path, topology: Topology):
    path = checkpoint_path(out, topology)
    if not path.exists():
        if topology.distributed and (out / CHECKPOINT).exists() and not (out / "final.json").exists():
            raise ValueError(
                f"{out} holds a single-process checkpoint; resume it without torchrun (world size 1)"
            )
        if not topology.distributed and (out / "checkpoint.rank0.pt").exists():
            raise ValueError(
                f"{out} holds a multi-process checkpoint; resume it with its world size "
                "(torchrun --nproc_per_node=N or maxscore train --nproc N)"
            )
        return None
    resume = load_checkpoint(path)
    if resume.world_size != topology.world_size:
        raise ValueError(
            f"{path} was saved by a run of world size {resume.world_size}; resume it with the same "
            f"world size (torchrun --nproc_per_node={resume.world_size}), not {topology.world_size}"
        )
    return resume


def _shared_tokenizer(corpus, config: TrainConfig, topology: Topology):
    """Rank 0 trains (or reads) the cached tokenizer first; the others then read the cache.

    An ``hf_model`` directory with a ``tokenizer.json`` brings its own tokenizer."""
    vocab_size = config.model.vocab_size
    if config.hf_model is not None:
        from maxscore.hf.training import hf_tokenizer, hf_vocab_size

        own = hf_tokenizer(config.hf_model)
        if own is not None:
            return own
        vocab_size = hf_vocab_size(config.hf_model)
    if topology.is_main:
        tokenizer = train_tokenizer(corpus, vocab_size)
    if topology.distributed:
        torch.distributed.barrier()
    return tokenizer if topology.is_main else train_tokenizer(corpus, vocab_size)


def _parallelize(model: Decoder, topology: Topology) -> nn.Module:
    """Experts sharded over the expert-parallel group, the rest wrapped in DDP (multi-process)."""
    if not topology.distributed:
        return model
    if model.config.router != DENSE:
        parallelize_moe(model, expert_group=topology.expert_group)
    return data_parallel(model)


def _no_sync(runner: nn.Module, last: bool):
    """DDP reduces gradients on the last micro-batch of a step only."""
    if last or not hasattr(runner, "no_sync"):
        return contextlib.nullcontext()
    return runner.no_sync()


def finish(
    model: Decoder,
    config: TrainConfig,
    streams: dict,
    out: Path,
    device: torch.device,
    topology: Topology | None = None,
    tokenizer=None,
) -> dict:
    """Final evaluation (validation and test, batch and causal routing) written to ``final.json``
    (by rank 0; a multi-process run also writes the consolidated ``checkpoint.pt``)."""
    topology = topology or Topology()
    method = config.model.router_options.get("method")
    label = config.label or config.model.router + (f"@{method}" if method else "")
    final: dict = {"router": label, "seed": config.seed, "steps": config.steps, "commit": source_commit()}
    modes = (False,) if config.model.router == DENSE else (False, True)
    for split in ("validation", "test"):
        for causal in modes:
            if causal and not ROUTERS[config.model.router].has_causal_mode:
                continue
            key = f"{split}_{'causal' if causal else 'batch'}"
            final[key] = evaluate(
                model,
                streams[split],
                batch_size=config.batch_size,
                causal=causal,
                limit=config.final_eval_windows,
                device=device,
            )
    if "validation_causal" in final and "load_share_max" in final["validation_causal"]:
        causal = final["validation_causal"]
        final["causal_load"] = {"max": causal["load_share_max"], "min": causal["load_share_min"]}
    if topology.distributed:
        state = consolidated_state(model, topology)
    if not topology.is_main:
        return final
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final["last"] = rows[-1] if rows else {}
    final["parameters"] = model.num_parameters()
    final["active_parameters"] = model.num_parameters(active=True)
    if topology.distributed:
        final["world_size"] = topology.world_size
        write_consolidated(out, state, config, tokenizer, config.steps, hf_config_json(model))
    (out / "final.json").write_text(json.dumps(final, indent=1))
    return final


def source_commit() -> str | None:
    """The git commit of the installed source (``None`` outside a git checkout)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = result.stdout.strip()
    return commit if result.returncode == 0 and commit else None


def _progress_bar(enabled: bool, total: int, initial: int, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True)
