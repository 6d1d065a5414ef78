"""Held-out loss, perplexity and bits per character, with batch or causal routing."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from maxscore.model import Decoder
from maxscore.parallel.topology import world_size
from maxscore.train.data import TokenStream


@torch.no_grad()
def evaluate(
    model: Decoder,
    stream: TokenStream,
    *,
    batch_size: int = 16,
    causal: bool = False,
    limit: int | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, float]:
    """Mean next-token loss over consecutive windows of ``stream`` (at most ``limit`` windows).

    ``bpc`` = total loss in bits / characters, the characters counted as the window tokens'
    share of the text's characters.  The model is left in the mode it was in.
    """
    was_training = model.training
    model.eval()
    windows = stream.windows(model.config.seq_len, limit)
    world = world_size()
    if world > 1:  # each rank takes an equal share (the last windows % world are left out)
        share = windows.shape[0] // world
        if share == 0:
            raise ValueError(f"{windows.shape[0]} evaluation windows cannot be shared by {world} ranks")
        windows = windows[dist.get_rank() * share : (dist.get_rank() + 1) * share]
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1], causal=causal).logits
        total += float(
            nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        )
        count += chunk[:, 1:].numel()
    model.train(was_training)
    if world > 1:
        summed = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        total, count = float(summed[0]), int(summed[1])
    loss = total / count
    characters = count * stream.characters / stream.tokens.numel()
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpc": total / (math.log(2) * characters),
        "tokens": count,
    }
