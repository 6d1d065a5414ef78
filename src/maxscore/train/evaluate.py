"""Held-out loss, perplexity and bits per character, with batch or causal routing."""

from __future__ import annotations

import math

import torch
from torch import nn

from maxscore.model import Decoder
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
    total, count = 0.0, 0
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        logits = model(chunk[:, :-1], causal=causal).logits
        total += float(
            nn.functional.cross_entropy(logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum")
        )
        count += chunk[:, 1:].numel()
    model.train(was_training)
    loss = total / count
    characters = count * stream.characters / stream.tokens.numel()
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpc": total / (math.log(2) * characters),
        "tokens": count,
    }
