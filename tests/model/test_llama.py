"""The built-in decoder: causality, padding, the FLOP-matched dense baseline, bad lengths."""

from __future__ import annotations

import warnings

import pytest
import torch

from maxscore import MoEConfig
from maxscore.model import Decoder, ModelConfig

SHAPE = dict(vocab_size=64, dim=32, layers=2, heads=4, seq_len=16)


def model(router: str = "maxscore") -> Decoder:
    torch.manual_seed(0)
    if router == "dense":  # FLOP-matched to k = 2 experts of width 16
        return Decoder(ModelConfig(**SHAPE, moe=None, dense_hidden=32)).eval()
    return Decoder(
        ModelConfig(**SHAPE, moe=MoEConfig(num_experts=4, k=2, expert_hidden=16, router=router))
    ).eval()


def tokens(seed: int, batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 64, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("router", ["dense", "maxscore", "gshard"])
def test_later_tokens_do_not_change_earlier_logits_with_causal_routing(router):
    decoder = model(router)
    ids = tokens(1)
    changed = ids.clone()
    changed[:, 10:] = tokens(2)[:, 10:]
    with torch.no_grad():
        before = decoder(ids, causal=True).logits
        after = decoder(changed, causal=True).logits
    torch.testing.assert_close(after[:, :10], before[:, :10], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, 10:], before[:, 10:])


def test_padding_content_does_not_reach_valid_tokens():
    decoder = model("maxscore")
    ids = tokens(3)
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[:, 12:] = False  # right padding
    other = ids.clone()
    other[:, 12:] = tokens(4)[:, 12:]
    with torch.no_grad():
        first = decoder(ids, valid).logits[:, :12]
        second = decoder(other, valid).logits[:, :12]
    torch.testing.assert_close(second, first, atol=1e-6, rtol=0)


def test_dense_baseline_matches_the_active_parameters_of_k_experts():
    moe, dense = model("maxscore"), model("dense")
    gates = sum(block.mlp.router.gate.weight.numel() for block in moe.blocks)
    assert moe.num_parameters(active=True) - gates == dense.num_parameters()
    assert moe.num_parameters() > moe.num_parameters(active=True)


def test_the_tied_output_projection_is_the_embedding():
    decoder = model("dense")
    ids = tokens(5)
    with torch.no_grad():
        hidden = decoder.embed(ids)
        for block in decoder.blocks:
            hidden = block(hidden, decoder.cos, decoder.sin, None, False)[0]
        expected = decoder.norm(hidden) @ decoder.embed.weight.T
        torch.testing.assert_close(decoder(ids).logits, expected)


def test_sequences_longer_than_seq_len_are_refused():
    with pytest.raises(ValueError, match="exceeds the model's seq_len=16"):
        model("dense")(tokens(6, length=17))


def test_the_flat_form_warns_and_converts_once():
    flat = dict(num_experts=4, k=2, expert_hidden=16, capacity_factor=1.25, router="gshard")
    with pytest.warns(DeprecationWarning, match=r"ModelConfig\(\.\.\.\) with the flat MoE settings"):
        old = ModelConfig(**SHAPE, **flat, router_options={"normalize": False})
    new = ModelConfig(
        **SHAPE,
        moe=MoEConfig(
            num_experts=4, k=2, expert_hidden=16, capacity_factor=1.25, router="gshard",
            router_config={"normalize": False},
        ),
    )  # fmt: skip
    assert old == new
    with pytest.warns(DeprecationWarning, match="moe=None"):
        dense = ModelConfig(**SHAPE, router="dense", k=2, expert_hidden=16)
    assert dense.moe is None and dense.dense_hidden == 32  # k x expert_hidden: the FLOPs of k experts
    assert ModelConfig(**SHAPE, moe=None).dense_hidden == MoEConfig().k * MoEConfig().expert_hidden


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"moe": {"k": 2}}, "moe must be a maxscore.MoEConfig or None"),
        ({"moe": MoEConfig(), "dense_hidden": 64}, "dense_hidden is the MLP width of a dense model"),
        ({"moe": None, "dense_hidden": 0}, "dense_hidden must be an int >= 1"),
        (
            {"router": "dense", "router_options": {"normalize": True}},
            "router='dense' takes no router_options",
        ),
        ({"router": "top2"}, "router must be 'dense' or one of"),
    ],
)
def test_bad_model_configs_are_named(values, match):
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ModelConfig(**SHAPE, **values)
