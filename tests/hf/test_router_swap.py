"""MaxScore routing swapped into HF MoE models: format kept, loads at capacity, no drops."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maxscore.hf import load_swapped, swap_router  # noqa: E402
from tests.hf.helpers import MODELS, SMALL, moe_model, tokens  # noqa: E402


def _record_indices(model) -> list:
    seen = []
    for module in model.modules():
        if type(module).__name__.lower().endswith("topkrouter"):
            module.register_forward_hook(lambda _m, _a, out: seen.append(out[2].detach()))
    return seen


@pytest.mark.parametrize("name", sorted(MODELS))
def test_swapped_model_keeps_formats_fills_capacity_and_trains(name):
    model = moe_model(name)
    ids = tokens(length=16)
    before = model(ids, labels=ids)
    swap_router(model, capacity_factor=1.0)
    seen = _record_indices(model)
    after = model(ids, labels=ids)
    assert after.logits.shape == before.logits.shape
    aux_before, aux_after = getattr(before, "aux_loss", None), getattr(after, "aux_loss", None)
    assert (aux_after is None) == (aux_before is None)  # DeepSeek-V3 has none
    if aux_before is not None:
        assert aux_after.shape == aux_before.shape
    logits_before, logits_after = (
        getattr(before, "router_logits", None),
        getattr(after, "router_logits", None),
    )
    assert (logits_after is None) == (logits_before is None)  # older DeepSeek-V3 outputs have none
    if logits_before is not None:
        assert len(logits_after) == len(logits_before)
        assert logits_after[0].shape == logits_before[0].shape
    assert len(seen) == SMALL["num_hidden_layers"]
    capacity = 2 * ids.numel() // 4  # k * tokens / E: every expert exactly full
    for indices in seen:
        assert (indices >= 0).all()  # no token dropped
        assert torch.bincount(indices.flatten(), minlength=4).tolist() == [capacity] * 4
        assert (indices.sort(1).values.diff(dim=1) != 0).all()  # distinct experts per token
    after.loss.backward()
    gates = [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "weight")]
    assert all(g.weight.grad.abs().sum() > 0 for g in gates)


def test_plain_top_k_differs_from_maxscore_where_top_k_overloads():
    model = moe_model("mixtral")
    ids = tokens(length=16)
    plain = _record_indices(model)
    model(ids)
    swap_router(model)
    swapped = _record_indices(model)
    model(ids)
    plain_loads = torch.bincount(plain[0].flatten(), minlength=4)
    assert plain_loads.max() > 16  # plain top-k overloads an expert on this batch
    assert torch.bincount(swapped[-1].flatten(), minlength=4).max() == 16


def test_save_swap_and_reload(tmp_path):
    model = moe_model("qwen3_moe")
    swap_router(model, soft_topk=True, schedule={"steps": 10})
    ids = tokens(length=16)
    model.train()
    model(ids, labels=ids)  # prices move
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_swapped(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_settings_are_stored_resolved_and_older_ones_load(tmp_path):
    model = moe_model("qwen3_moe")
    swap_router(model, soft_topk=True, schedule={"steps": 10})
    stored = model.config.maxscore_routing["schedule"]
    assert stored == {"start": 4.0, "end": 1.0, "steps": 10, "kind": "linear"}
    # settings saved before the schedule was stored resolved (and before groups were a setting)
    model.config.maxscore_routing = {
        "capacity_factor": 1.0,
        "method": "exact",
        "soft_topk": True,
        "schedule": None,
        "causal_routing": False,
    }
    model.save_pretrained(tmp_path)
    loaded = load_swapped(tmp_path)
    router = next(m.router for m in loaded.modules() if hasattr(m, "router"))
    assert router.config.group == "batch" and router.config.schedule.num_steps == 30000
    assert router.temperature() == 4.0


def test_unsupported_architecture_and_double_swap_raise():
    with pytest.raises(
        ValueError, match=r"supports \['deepseek_v3', 'mixtral', 'olmoe', 'qwen2_moe', 'qwen3_moe'\]"
    ):
        swap_router(transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL)))
    with pytest.raises(ValueError, match="group must be 'sequence' or 'batch'"):
        swap_router(moe_model("olmoe"), group="global")
    model = swap_router(moe_model("olmoe"))
    with pytest.raises(ValueError, match="already MaxScore"):
        swap_router(model)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_swapped_model_on_cuda_fills_capacity():
    model = moe_model("mixtral").cuda()
    swap_router(model)
    seen = _record_indices(model)
    ids = tokens(length=16).cuda()
    out = model(ids, labels=ids)
    out.loss.backward()
    assert seen[0].device.type == "cuda"
    assert torch.bincount(seen[0].flatten(), minlength=4).tolist() == [16] * 4


def _balance_gradient(model, ids) -> torch.Tensor:
    """The gates' gradient of the training loss minus that of the LM loss alone."""
    gates = [m for m in model.modules() if hasattr(m, "router") and hasattr(m, "weight")]
    out = model(ids, labels=ids)
    total = torch.autograd.grad(out.loss, [g.weight for g in gates], retain_graph=True)
    lm = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
    plain = torch.autograd.grad(lm, [g.weight for g in gates], allow_unused=True)
    return torch.stack(
        [(t - (p if p is not None else 0)).abs().sum() for t, p in zip(total, plain, strict=True)]
    )


@pytest.mark.parametrize("aux_loss", ["routing", "off", "hf"])
def test_the_aux_loss_switch(aux_loss):
    from maxscore.routers.losses import load_balancing_loss

    model = moe_model("mixtral").train()
    coefficient = model.config.router_aux_loss_coef
    assert coefficient > 0
    swap_router(model, aux_loss=aux_loss)
    ids = tokens(length=16)
    extra = _balance_gradient(model, ids)
    if aux_loss == "off":
        assert model.router_aux_loss_coef == 0 and (extra < 1e-6).all()
    elif aux_loss == "hf":  # HF's own, recomputed from the logits' top-k
        assert model.router_aux_loss_coef == coefficient and (extra > 1e-6).any()
    else:  # HF's off; the Switch loss of MaxScore's routing with HF's coefficient instead
        assert model.router_aux_loss_coef == 0
        gate = next(m for m in model.modules() if hasattr(m, "router") and hasattr(m, "weight"))
        assert gate.aux_loss_coef == coefficient
        x = torch.randn(32, gate.weight.shape[1])
        gate.sequence_length, gate.attention_mask = 16, None
        weights = gate(x)[1]
        probs = torch.softmax(x @ gate.weight.T, dim=-1)
        expected = torch.autograd.grad(
            coefficient * load_balancing_loss(probs[None], gate(x)[2][None]), gate.weight
        )[0]
        got = (
            torch.autograd.grad(weights.sum(), gate.weight)[0]
            - torch.autograd.grad((gate.router(x, sequence_length=16).weights).sum(), gate.weight)[0]
        )
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-4)


def test_deepseek_v3_prices_start_from_its_correction_bias(tmp_path):
    model = moe_model("deepseek_v3").eval()
    biases = []
    for module in model.modules():
        if hasattr(module, "e_score_correction_bias"):
            bias = torch.linspace(-0.3, 0.5, module.e_score_correction_bias.numel())
            module.e_score_correction_bias.copy_(bias)
            biases.append(bias)
    swap_router(model)
    routers = [m.router for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    assert routers and len(routers) == len(biases)
    for router, bias in zip(routers, biases, strict=True):
        torch.testing.assert_close(router.prices, bias.mean() - bias)  # top-k of score - prices
    ids = tokens(length=12)
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path / "swapped")
    loaded = load_swapped(tmp_path / "swapped").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, before)
    for router, bias in zip(
        [m.router for m in loaded.modules() if hasattr(m, "e_score_correction_bias")], biases, strict=True
    ):
        torch.testing.assert_close(router.prices, bias.mean() - bias)
