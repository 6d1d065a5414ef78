"""Held-out loss, perplexity and bits per character, with batch or causal routing."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from maxscore.model import Decoder
from maxscore.parallel.topology import world_size
from maxscore.routers import check_routing
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
    share of the text's characters.  With causal routing (every token routed alone, no
    capacity) an MoE model also reports ``load_share_max`` / ``load_share_min``: over layers and
    experts, the expert's load as a share of the capacity its routing groups would have under
    batch routing (1.0 = exactly full; serving causally needs the spread to be small).  The
    model is left in the mode it was in.
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
    loads_YE = capacity_Y = None
    for chunk in windows.split(batch_size):
        chunk = chunk.to(device)
        output = model(chunk[:, :-1], causal=causal)
        total += float(
            nn.functional.cross_entropy(
                output.logits.float().flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum"
            )
        )
        count += chunk[:, 1:].numel()
        if causal and output.stats:
            layer_loads = torch.stack([s.loads for s in output.stats]).double()
            layer_capacity = torch.stack([s.capacity_G.sum() for s in output.stats]).double()
            loads_YE = layer_loads if loads_YE is None else loads_YE + layer_loads
            capacity_Y = layer_capacity if capacity_Y is None else capacity_Y + layer_capacity
    model.train(was_training)
    check_routing(model)  # bad input the routers recorded on an accelerator
    if world > 1:
        summed = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(summed)
        total, count = float(summed[0]), int(summed[1])
        if loads_YE is not None:
            dist.all_reduce(loads_YE)
            dist.all_reduce(capacity_Y)
    loss = total / count
    characters = count * stream.characters / stream.tokens.numel()
    result = {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bpc": total / (math.log(2) * characters),
        "tokens": count,
    }
    if loads_YE is not None:
        share_YE = loads_YE / capacity_Y.clamp(min=1)[:, None]
        result["load_share_max"] = float(share_YE.max())
        result["load_share_min"] = float(share_YE.min())
    return result
