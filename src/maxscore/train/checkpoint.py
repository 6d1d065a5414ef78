"""Checkpoints: written atomically (temporary file, then rename), read with ``weights_only=True``.

A checkpoint is self-contained: model and optimizer state, the step, the run's settings and its
tokenizer (as JSON strings), so ``maxscore eval`` needs nothing else.

A multi-process run writes one file per rank, ``checkpoint.rank<R>.pt`` (the rank's expert
shard and optimizer state with the shared parameters), resumable on the same world size;
when the run ends rank 0 also writes ``checkpoint.pt`` with the experts gathered (no optimizer
state), which ``maxscore eval`` and single-process code read like any other.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tokenizers import Tokenizer

from maxscore.model import Decoder
from maxscore.parallel.expert_parallel import expert_parameter_names
from maxscore.parallel.topology import Topology
from maxscore.train.config import TrainConfig
from maxscore.train.factory import hf_config_json, make_model

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    config: TrainConfig
    tokenizer: Tokenizer
    step: int
    model_state: dict
    optimizer_state: dict | None
    world_size: int = 1
    hf_config: str | None = None  # the HF model's config (JSON) of an ``hf_model`` run


def save_checkpoint(
    path: Path,
    model: Decoder,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    tokenizer: Tokenizer,
    world_size: int = 1,
) -> None:
    optimizer_state = optimizer.state_dict() if optimizer is not None else None
    payload = _payload(
        step, config, tokenizer, model.state_dict(), optimizer_state, world_size, hf_config_json(model)
    )
    _write(path, payload)


def _payload(
    step: int,
    config: TrainConfig,
    tokenizer: Tokenizer,
    model_state: dict,
    optimizer_state: dict | None,
    world_size: int,
    hf_config: str | None,
) -> dict:
    return {
        "format": 1,
        "step": step,
        "config": config.to_json(),
        "tokenizer": tokenizer.to_str(),
        "model": model_state,
        "optimizer": optimizer_state,
        "world_size": world_size,
        "hf_config": hf_config,
    }


def _write(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def checkpoint_path(out: Path, topology: Topology) -> Path:
    """This rank's resumable checkpoint in run directory ``out``."""
    return out / (f"checkpoint.rank{topology.rank}.pt" if topology.distributed else CHECKPOINT)


def save_run_checkpoint(
    out: Path,
    model: Decoder,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    tokenizer: Tokenizer,
    topology: Topology,
) -> None:
    """Every rank writes its own file (one file on a single process); ranks then wait for each other."""
    save_checkpoint(
        checkpoint_path(out, topology), model, optimizer, step, config, tokenizer, topology.world_size
    )
    if topology.distributed:
        dist.barrier()


def consolidated_state(model: Decoder, topology: Topology) -> dict:
    """The model's state with every expert shard gathered over the expert group (collective)."""
    state = model.state_dict()
    for name in sorted(expert_parameter_names(model)):
        shard = state[name].contiguous()
        parts = [torch.empty_like(shard) for _ in range(topology.expert_size)]
        dist.all_gather(parts, shard, group=topology.expert_group)
        state[name] = torch.cat(parts).cpu()
    return {name: value.cpu() if isinstance(value, torch.Tensor) else value for name, value in state.items()}


def write_consolidated(
    out: Path, state: dict, config: TrainConfig, tokenizer: Tokenizer, step: int, hf_config: str | None = None
) -> None:
    """``out/checkpoint.pt`` with the gathered model (rank 0 of a multi-process run)."""
    payload = _payload(step, config, tokenizer, state, None, 1, hf_config)
    _write(out / CHECKPOINT, payload)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Reads a checkpoint file (or ``DIR/checkpoint.pt`` for a run directory); no code is unpickled."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT
    if not path.is_file():
        raise ValueError(
            f"checkpoint {str(path)!r} does not exist; pass a checkpoint file or a run directory"
        )
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a truncated or foreign file: say so plainly
        raise ValueError(f"{str(path)!r} is not a readable maxscore checkpoint: {error}") from error
    if not isinstance(payload, dict) or payload.get("format") != 1:
        raise ValueError(f"{str(path)!r} is not a maxscore checkpoint (format 1)")
    return Checkpoint(
        config=TrainConfig.from_json(payload["config"]),
        tokenizer=Tokenizer.from_str(payload["tokenizer"]),
        step=int(payload["step"]),
        model_state=payload["model"],
        optimizer_state=payload.get("optimizer"),
        world_size=int(payload.get("world_size", 1)),
        hf_config=payload.get("hf_config"),
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Decoder, Checkpoint]:
    """The trained model of a checkpoint, in eval mode, and the checkpoint."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = make_model(checkpoint.config, checkpoint.hf_config).to(device)
    model.load_state_dict(checkpoint.model_state)
    return model.eval(), checkpoint
