"""Upcycled HF models: dense equivalence, save/load round trip, generation with causal routing."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maxscore.gates import TemperatureScheduleConfig  # noqa: E402
from maxscore.hf import upcycle  # noqa: E402
from maxscore.routers import MaxScoreRouterConfig  # noqa: E402
from tests.hf.helpers import FAMILIES, SMALL, dense_model, tokens  # noqa: E402


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_expert_reproduces_the_dense_model(family):
    dense = dense_model(family)
    moe = upcycle(dense, num_experts=1, k=1).eval()
    assert type(moe).__name__.startswith("MaxScore") and isinstance(moe, transformers.PreTrainedModel)
    ids = tokens()
    torch.testing.assert_close(moe(ids).logits, dense(ids).logits, atol=1e-5, rtol=1e-5)


def test_experts_start_as_noisy_copies_and_the_model_trains():
    dense = dense_model("llama")
    moe = upcycle(dense, num_experts=4, k=2, noise=0.01)
    experts = moe.model.layers[0].mlp.moe.experts
    expected = dense.model.layers[0].mlp.up_proj.weight.detach().T
    assert not torch.equal(experts.w_up[0], experts.w_up[1])  # noise broke the symmetry
    torch.testing.assert_close(experts.w_up[2], expected, atol=0.05 * float(expected.std()), rtol=0)
    ids = tokens()
    out = moe(ids, labels=ids, output_router_logits=True)
    assert out.aux_loss.dim() == 0 and len(out.router_logits) == SMALL["num_hidden_layers"]
    assert out.router_logits[0].shape == (ids.numel(), 4)
    out.loss.backward()
    assert moe.model.layers[0].mlp.moe.router.gate.weight.grad.abs().sum() > 0
    stats = [
        layer.mlp.moe.router(torch.randn(24, 32), sequence_length=12).stats for layer in moe.model.layers
    ]
    assert all(s.dropped_fraction == 0 for s in stats)


def test_save_and_load_round_trip_with_router_state(tmp_path):
    moe = upcycle(
        dense_model("qwen2"), num_experts=4, k=2, noise=0.01, soft_topk=True, schedule={"steps": 100}
    )
    ids = tokens()
    moe.train()
    moe(ids, labels=ids)  # a training forward: the routers' dual prices move
    router = moe.model.layers[1].mlp.moe.router
    router.schedule.num_steps = 37
    moe.eval()
    moe.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(moe)
    loaded_router = loaded.model.layers[1].mlp.moe.router
    assert loaded_router.schedule.num_steps == 37 and loaded_router.temperature() == router.temperature()
    torch.testing.assert_close(loaded_router.prices, router.prices)
    assert router.prices.abs().sum() > 0
    torch.testing.assert_close(loaded(ids).logits, moe(ids).logits, atol=0, rtol=0)


def test_hf_configs_store_resolved_router_options_and_old_ones_load_as_saved(tmp_path):
    moe = upcycle(dense_model("llama"), num_experts=4, k=2, router="maxscore", method="two_stage")
    stored = moe.config.router_options
    assert stored == MaxScoreRouterConfig(method="two_stage").to_dict()  # complete, JSON-ready
    # a config saved with only some options: the others take the defaults they had then
    moe.config.router_options = {"schedule": {"steps": 40}}
    moe.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    config = loaded.model.layers[0].mlp.moe.router.config
    assert config.normalize is False and config.method == "exact"
    assert config.schedule == TemperatureScheduleConfig(start=4.0, end=1.0, steps=40, kind="linear")


def test_generate_with_and_without_cache_agree_in_causal_mode():
    moe = upcycle(dense_model("mistral"), num_experts=4, k=2, noise=0.05, causal_routing=True, router_std=0.5)
    moe.eval()
    prompt = tokens(batch=1, length=5)
    with_cache = moe.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    without = moe.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 13)
    assert torch.equal(with_cache, without)


def test_unsupported_architecture_names_the_supported_ones():
    config = transformers.MixtralConfig(**SMALL, num_local_experts=4)
    with pytest.raises(ValueError, match=r"\['llama', 'mistral', 'qwen2'\].*swap_router"):
        upcycle(config, num_experts=4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_upcycled_model_generates_on_cuda():
    moe = upcycle(dense_model("llama"), num_experts=4, k=2, noise=0.05, causal_routing=True).cuda().eval()
    prompt = tokens(batch=1, length=5).cuda()
    with_cache = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
    without = moe.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
