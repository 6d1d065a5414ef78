"""The end of a run: the final evaluation over the whole validation and test splits, with batch
and causal routing, written atomically to ``final.json`` with the commit it ran at (and, for a
multi-process run, the consolidated ``checkpoint.pt``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch
from torch import nn

from maxscore.parallel.topology import Topology
from maxscore.routers import ROUTERS
from maxscore.train.checkpoint import consolidated_state, write_consolidated
from maxscore.train.config import TrainConfig
from maxscore.train.evaluate import evaluate
from maxscore.train.factory import hf_config_json


def finish(
    model: nn.Module,
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
    moe = config.model.moe
    if config.label is not None:
        label = config.label
    elif moe is None:
        label = f"dense MLP {config.model.dense_hidden}"
    else:
        label = moe.router_config.label(moe.router)
    final: dict = {
        "router": label,
        "seed": config.seed,
        "steps": config.steps,
        "commit": source_commit(),
        "hardware": hardware(device),
    }
    causal_modes = moe is not None and ROUTERS[moe.router].has_causal_mode
    for split in ("validation", "test"):
        for causal in (False, True) if causal_modes else (False,):
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
    temporary = out / f"final.json.tmp{os.getpid()}"  # a reader never sees half a file
    temporary.write_text(json.dumps(final, indent=1))
    os.replace(temporary, out / "final.json")
    return final


def hardware(device: torch.device) -> str:
    """The processor (or GPU) a run trained on: float results can differ between kinds."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


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
