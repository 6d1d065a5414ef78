"""Saved run configs: router options are stored resolved, and older saves load as trained."""

from __future__ import annotations

import dataclasses
import json

import torch
from tokenizers import Tokenizer, models

from maxscore import MoEConfig
from maxscore.model import Decoder, ModelConfig
from maxscore.routers import FlowOnlyRouterConfig, GShardRouterConfig, MaxScoreRouterConfig
from maxscore.train.checkpoint import load_model
from maxscore.train.config import TrainConfig, make_config
from maxscore.train.loop import with_schedule

SHAPE = dict(vocab_size=64, dim=16, layers=2, heads=2, seq_len=8)
FLAT = dict(num_experts=4, k=2, expert_hidden=16, capacity_factor=1.0)


def _old_checkpoint(path, router: str, options: dict, state: dict) -> None:
    """A checkpoint as written before router options were typed (a partial options dict) and
    before the MoE settings were one ``moe`` config (flat fields)."""
    config = dataclasses.asdict(TrainConfig(model=ModelConfig(**SHAPE, moe=None)))
    config["model"] = {**SHAPE, "rope_base": 10000.0, **FLAT, "router": router, "router_options": options}
    payload = {
        "format": 1,
        "step": 250,
        "config": json.dumps(config),
        "tokenizer": Tokenizer(models.BPE()).to_str(),
        "model": state,
        "optimizer": None,
        "world_size": 1,
        "hf_config": None,
    }
    torch.save(payload, path)


def test_a_checkpoint_saved_with_the_old_default_loads_with_the_old_behaviour(tmp_path):
    torch.manual_seed(0)
    old_default = {"normalize": False, "soft_topk": True, "schedule": {"steps": 250}}  # as trained then
    trained = Decoder(
        ModelConfig(**SHAPE, moe=MoEConfig(**FLAT, router="maxscore", router_config=old_default))
    )
    _old_checkpoint(tmp_path / "old.pt", "maxscore", {"schedule": {"steps": 250}}, trained.state_dict())
    model, checkpoint = load_model(tmp_path / "old.pt")
    options = checkpoint.config.model.moe.router_config
    assert options.normalize is False and options.soft_topk is True  # the defaults when it was saved
    assert (options.schedule.start, options.schedule.end, options.schedule.kind) == (4.0, 1.0, "linear")
    assert options.schedule.steps == 250
    routers = [block.mlp.router for block in model.blocks]
    assert all(r.config == options for r in routers)
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(tokens).logits, trained.eval()(tokens).logits, rtol=0, atol=0)


def test_a_flow_only_checkpoint_with_its_old_schedule_counter_loads(tmp_path):
    torch.manual_seed(0)
    trained = Decoder(ModelConfig(**SHAPE, moe=MoEConfig(**FLAT, router="flow_only")))
    state = trained.state_dict()
    for name in list(state):  # flow_only kept an unused SoftTopk step counter
        if name.endswith("router.prices"):
            state[name.replace("prices", "schedule.step_count")] = torch.tensor(250)
    _old_checkpoint(tmp_path / "old.pt", "flow_only", {}, state)
    model, checkpoint = load_model(tmp_path / "old.pt")
    # saved before the causal correction's quantile rule: it keeps the sign rule
    assert checkpoint.config.model.moe.router_config == FlowOnlyRouterConfig(causal_update="sign")
    tokens = torch.randint(0, 64, (2, 8))
    torch.testing.assert_close(model(tokens).logits, trained.eval()(tokens).logits, rtol=0, atol=0)


def test_configs_store_every_option_and_round_trip():
    config = make_config("tiny", router="gshard", router_options={"normalize": False})
    assert config.model.moe.router_config == GShardRouterConfig(normalize=False)
    stored = json.loads(config.to_json())["model"]["moe"]["router_config"]
    assert stored == dataclasses.asdict(GShardRouterConfig(normalize=False))
    assert TrainConfig.from_json(config.to_json()) == config
    # another router's options never carry over; a dense model has none
    assert make_config("tiny", router="gshard").model.moe.router_config == GShardRouterConfig()
    assert make_config("tiny", router="dense").model.moe is None


def test_the_schedule_spans_the_run_unless_given_a_length():
    config = with_schedule(make_config("tiny", steps=120, router="maxscore_paper"))
    assert config.model.moe.router_config.schedule.steps == 120
    options = {"soft_topk": True, "schedule": {"steps": 30000, "start": 2}}
    given = make_config("tiny", steps=120, router_options=options)
    assert with_schedule(given).model.moe.router_config.schedule.steps == 30000
    # without SoftTopk (maxscore's default) there is no schedule to fit to the run
    plain = make_config("tiny", steps=120)
    assert with_schedule(plain) == plain and plain.model.moe.router_config.schedule.steps is None
    typed = MaxScoreRouterConfig(soft_topk=True)
    assert with_schedule(make_config("tiny", steps=50, router_options=typed)).model.moe.router_config == (
        dataclasses.replace(typed, schedule=dataclasses.replace(typed.schedule, steps=50))
    )
