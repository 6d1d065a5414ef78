"""Checkpoints: written atomically (temporary file, then rename), read with ``weights_only=True``.

A checkpoint is self-contained: model and optimizer state, the step, the run's settings and its
tokenizer (as JSON strings), so ``maxscore eval`` needs nothing else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer

from maxscore.model import Decoder
from maxscore.train.config import TrainConfig

CHECKPOINT = "checkpoint.pt"


@dataclass(frozen=True, slots=True)
class Checkpoint:
    config: TrainConfig
    tokenizer: Tokenizer
    step: int
    model_state: dict
    optimizer_state: dict | None


def save_checkpoint(
    path: Path,
    model: Decoder,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    tokenizer: Tokenizer,
) -> None:
    payload = {
        "format": 1,
        "step": step,
        "config": config.to_json(),
        "tokenizer": tokenizer.to_str(),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(payload, temporary)
    os.replace(temporary, path)


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
    )


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Decoder, Checkpoint]:
    """The trained model of a checkpoint, in eval mode, and the checkpoint."""
    checkpoint = load_checkpoint(path, map_location=device)
    model = Decoder(checkpoint.config.model).to(device)
    model.load_state_dict(checkpoint.model_state)
    return model.eval(), checkpoint
