"""Multi-process training: 2 gloo ranks with global routing train like one process, and resume."""

from __future__ import annotations

import json
import math

import pytest
import torch

from maxscore.parallel.launch import spawn
from maxscore.train.checkpoint import load_model
from maxscore.train.config import TrainConfig
from maxscore.train.loop import train
from tests.conftest import losses, tiny_config


def _train_rank(rank, world_size, config_json, out, stop_after):
    train(TrainConfig.from_json(config_json), out, progress=False, stop_after=stop_after)


@pytest.mark.distributed
def test_two_ranks_with_global_routing_equal_one_process_and_resume(small_corpus_dir, tmp_path):
    # balance_coef 0: the balance loss is a per-rank batch statistic (as in DDP generally)
    options = {"group": "global", "balance_coef": 0.0}
    config = tiny_config(
        small_corpus_dir, steps=20, log_every=1, checkpoint_every=10, router_options=options, device="cpu"
    )
    single, ranks = tmp_path / "single", tmp_path / "ranks"
    train(config, single, progress=False)
    spawn(_train_rank, 2, config.to_json(), str(ranks), 10)
    assert len(losses(ranks)) == 10 and (ranks / "checkpoint.rank1.pt").exists()
    with pytest.raises(ValueError, match="multi-process checkpoint"):
        train(config, ranks, progress=False)  # one process cannot resume a 2-rank run
    spawn(_train_rank, 2, config.to_json(), str(ranks), None)
    expected, got = losses(single), losses(ranks)
    assert len(got) == 20
    assert all(math.isclose(a, b, rel_tol=2e-4) for a, b in zip(got, expected, strict=True)), (got, expected)
    rows = [json.loads(line) for line in (ranks / "metrics.jsonl").read_text().splitlines()]
    assert all(row["dropped_fraction"] == 0 for row in rows)
    # the consolidated checkpoint holds every expert and reads like a single-process one
    model, checkpoint = load_model(ranks / "checkpoint.pt")
    reference, _ = load_model(single / "checkpoint.pt")
    assert checkpoint.step == 20 and model.blocks[0].mlp.experts.w_up.shape[0] == config.model.moe.num_experts
    for (name, value), (_, expected_value) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            torch.testing.assert_close(value, expected_value, atol=2e-3, rtol=1e-2, msg=name)
