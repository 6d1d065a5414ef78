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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from maxscore.model import Decoder
from maxscore.parallel.data_parallel import data_parallel, optimizer_step
from maxscore.parallel.expert_parallel import parallelize_moe
from maxscore.parallel.topology import Topology, check_same_on_all_ranks, make_topology, mean_over_ranks
from maxscore.routers import install_step_hook
from maxscore.routers.stats import RoutingStats
from maxscore.train.checkpoint import CHECKPOINT, checkpoint_path, load_checkpoint, save_run_checkpoint
from maxscore.train.config import TrainConfig
from maxscore.train.data import load_corpus
from maxscore.train.evaluate import evaluate
from maxscore.train.factory import make_model, pretrained_tokenizer, tokenizer_vocab_size
from maxscore.train.finish import finish
from maxscore.train.metrics import MetricsLog, progress_bar, summarize
from maxscore.train.tokenizer import encode, save_tokenizer, train_tokenizer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def with_schedule(config: TrainConfig) -> TrainConfig:
    """A SoftTopk schedule with no length of its own (``steps=None``) decays over the whole run."""
    moe = config.model.moe
    if moe is None or not moe.router_config.scheduled or moe.router_config.schedule.steps is not None:
        return config
    schedule = dataclasses.replace(moe.router_config.schedule, steps=config.steps)
    moe = dataclasses.replace(moe, router_config=dataclasses.replace(moe.router_config, schedule=schedule))
    return dataclasses.replace(config, model=dataclasses.replace(config.model, moe=moe))


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


@dataclass
class Run:
    """A run being trained: its settings, data, model and optimizer on this rank."""

    config: TrainConfig
    out: Path
    topology: Topology
    device: torch.device
    tokenizer: object
    streams: dict
    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    start: int
    log: MetricsLog | None

    @property
    def rows(self) -> slice:
        """This rank's rows of every (global) batch."""
        share = self.config.batch_size // self.topology.world_size
        return slice(self.topology.rank * share, (self.topology.rank + 1) * share)

    @property
    def tokens_per_step(self) -> int:
        return self.config.batch_size * self.config.accumulation * self.config.model.seq_len


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
    run = setup(config, Path(out_dir))
    config, topology = run.config, run.topology
    bar = progress_bar(progress and topology.is_main, config.steps, run.start, run.out.name)
    end = config.steps if stop_after is None else min(config.steps, run.start + stop_after)
    clock = time.perf_counter()
    for step in range(run.start, end):
        losses, stats = train_step(run, step)
        done = step + 1
        if done % config.log_every == 0 or done == config.steps or done % config.eval_every == 0:
            log_step(run, done, losses, stats, time.perf_counter() - clock, bar)
        if bar is not None:
            bar.update(1)
        if done % config.checkpoint_every == 0 or done == end:
            save_run_checkpoint(run.out, run.model, run.optimizer, done, config, run.tokenizer, topology)
    if bar is not None:
        bar.close()
    if end < config.steps:
        return {}
    with eager_evaluation(config):
        return finish(run.model, config, run.streams, run.out, run.device, topology, run.tokenizer)


def eager_evaluation(config: TrainConfig):
    """Evaluation of a compiled run runs its blocks eagerly: causal routing takes the dropless
    path, whose per-expert counts are read on the host (a graph break), and evaluation is not
    where the time goes."""
    return torch.compiler.set_stance("force_eager") if config.compile else contextlib.nullcontext()


def setup(config: TrainConfig, out: Path) -> Run:
    """Settings (a checkpoint's when resuming), data, tokenizer, model and optimizer of a run;
    rank 0 writes ``config.json`` and ``tokenizer.json``."""
    topology = make_topology(config.expert_parallel)
    resume = _load_resume(out, topology)
    if resume is not None:
        if topology.is_main:
            _say_saved_settings_stand(config, resume.config, out)
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
    if config.compile and topology.distributed:
        raise ValueError(
            "compile runs in one process for now: the multi-process layers (expert-parallel "
            "exchange, global routing) do not trace in one graph yet; train without --compile"
        )
    if config.compile:  # in place: the parameters and their names stay those of the eager model
        for block in model.blocks:
            block.compile(fullgraph=True)
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
    return Run(config, out, topology, device, tokenizer, streams, model, runner, optimizer, start, log)


def train_step(run: Run, step: int) -> tuple[tuple[float, float], list[RoutingStats]]:
    """One optimizer step over ``accumulation`` micro-batches: ((loss, aux loss) on this rank,
    the last micro-batch's routing statistics)."""
    config, device = run.config, run.device
    for group in run.optimizer.param_groups:
        group["lr"] = learning_rate(config, step)
    amp = dict(
        device_type=device.type,
        dtype=getattr(torch, config.precision),
        enabled=device.type == "cuda" and config.precision != "float32",
    )
    loss_sum, aux_sum = 0.0, 0.0
    for micro in range(config.accumulation):
        generator = batch_generator(config, step, micro)
        batch = run.streams["train"].batch(config.batch_size, config.model.seq_len, generator)[run.rows]
        batch = batch.to(device)
        last = micro == config.accumulation - 1
        with _no_sync(run.runner, last):  # forward and backward: DDP reduces on the last one
            with torch.autocast(**amp):
                result = run.runner(batch[:, :-1])
                loss = nn.functional.cross_entropy(
                    result.logits.float().flatten(0, 1), batch[:, 1:].flatten()
                )
            ((loss + result.aux_loss) / config.accumulation).backward()
        loss_sum += float(loss.detach()) / config.accumulation
        aux_sum += float(result.aux_loss.detach()) / config.accumulation
    optimizer_step(run.model, run.optimizer, config.clip, run.topology)
    return (loss_sum, aux_sum), result.stats


def log_step(run: Run, done: int, losses: tuple[float, float], stats: list, elapsed: float, bar) -> None:
    """A ``metrics.jsonl`` row after ``done`` steps (losses averaged over ranks, routing
    statistics, tokens/s since this process started, and ``val_loss`` at evaluation steps)."""
    config = run.config
    loss, aux = mean_over_ranks(list(losses), run.device)
    row = {
        "step": done,
        "loss": loss,
        "aux_loss": aux,
        "lr": learning_rate(config, done - 1),
        "tokens": done * run.tokens_per_step,
        "tokens_per_s": run.tokens_per_step * (done - run.start) / max(elapsed, 1e-9),
    }
    row.update(summarize(stats))
    if done % config.eval_every == 0 or done == config.steps:
        with eager_evaluation(config):
            row["val_loss"] = evaluate(
                run.model,
                run.streams["validation"],
                batch_size=config.batch_size,
                limit=config.eval_batches * config.batch_size,
                device=run.device,
            )["loss"]
    if run.log is not None:
        run.log.write(row)
    if bar is not None:
        drop = f"{row.get('dropped_fraction', 0.0):.1%}"
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{row['tokens_per_s']:.0f}", drop=drop)


def _say_saved_settings_stand(given: TrainConfig, saved: TrainConfig, out: Path) -> None:
    """One line on stderr when a resumed run was given other settings than it saved."""
    given_values, saved_values = json.loads(given.to_json()), json.loads(saved.to_json())
    differing = [name for name in saved_values if given_values.get(name) != saved_values[name]]
    if differing:
        shown = ", ".join(
            f"{name}={json.dumps(saved_values[name])} (given {json.dumps(given_values.get(name))})"
            for name in differing
        )
        print(
            f"resuming {out} with its saved settings: {shown}; a run keeps the settings it started "
            "with (its schedules depend on them); train into a new --out to use others",
            file=sys.stderr,
            flush=True,
        )


def _load_resume(out: Path, topology: Topology):
    path = checkpoint_path(out, topology)
    # a process killed while writing leaves its temporary file; this rank's own are stale now
    for stale in out.glob(f"{path.name}.tmp*") if out.is_dir() else ():
        stale.unlink(missing_ok=True)
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
    """The model's own tokenizer (``pretrained_tokenizer``), or the harness's BPE: rank 0 trains
    (or reads) the cached one first; the others then read the cache."""
    own = pretrained_tokenizer(config)
    if own is not None:
        return own
    vocab_size = tokenizer_vocab_size(config)
    if topology.is_main:
        tokenizer = train_tokenizer(corpus, vocab_size)
    if topology.distributed:
        torch.distributed.barrier()
    return tokenizer if topology.is_main else train_tokenizer(corpus, vocab_size)


def _parallelize(model: Decoder, topology: Topology) -> nn.Module:
    """Experts sharded over the expert-parallel group, the rest wrapped in DDP (multi-process)."""
    if not topology.distributed:
        return model
    if model.config.moe is not None:
        parallelize_moe(model, expert_group=topology.expert_group)
    return data_parallel(model)


def _no_sync(runner: nn.Module, last: bool):
    """DDP reduces gradients on the last micro-batch of a step only."""
    if last or not hasattr(runner, "no_sync"):
        return contextlib.nullcontext()
    return runner.no_sync()
