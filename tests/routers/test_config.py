"""Typed router configs: one frozen dataclass per router, built from options, dicts or JSON."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import maxscore
from maxscore.gates import TemperatureScheduleConfig
from maxscore.routers import (
    ROUTERS,
    FlowOnlyRouterConfig,
    GatedRouter,
    GatedRouterConfig,
    GShardRouterConfig,
    MaxScoreRouterConfig,
    SBaseRouterConfig,
    make_router,
    router_config,
    router_options,
)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_router_declares_a_frozen_config_that_round_trips_through_json(name):
    router = make_router(name, 16, 4, 1 if name == "switch" else 2)
    config = router.config
    assert isinstance(config, ROUTERS[name].config_class) and isinstance(config, GatedRouterConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.group = "batch"
    assert set(config.to_dict()) == set(router_options(name))
    again = router_config(name, json.loads(json.dumps(config.to_dict())))
    assert again == config and type(again) is type(config)


def test_router_defaults_live_in_their_configs():
    assert router_config("gshard").normalize is True and router_config("switch").normalize is False
    assert router_config("deepseek_v3").score_function == "sigmoid"
    assert router_config("expert_choice").balance_coef == 0.0
    # maxscore: normalized flow weights, SoftTopk off; maxscore_paper: raw SoftTopk 4 -> 1 over the run
    maxscore, paper = router_config("maxscore"), router_config("maxscore_paper")
    assert maxscore.normalize is True and maxscore.soft_topk is False and not maxscore.scheduled
    assert make_router("maxscore", 8, 4, 2).temperature() == 1.0
    assert paper.normalize is False and paper.soft_topk is True and paper.scheduled
    assert paper.schedule == TemperatureScheduleConfig(start=4.0, end=1.0, steps=None)
    # S-BASE picks its score function by k, as the paper does
    assert make_router("sbase", 8, 4, 1).score_function == "sigmoid"
    assert make_router("sbase", 8, 4, 2).score_function == "softmax"
    assert make_router("sbase", 8, 4, 1, score_function="softmax").score_function == "softmax"


def test_options_dicts_and_configs_build_the_same_router_config():
    typed = MaxScoreRouterConfig(
        method="two_stage", soft_topk=True, schedule=TemperatureScheduleConfig(start=2.0)
    )
    from_dict = router_config(
        "maxscore", {"method": "two_stage", "soft_topk": True, "schedule": {"start": 2.0}}
    )
    from_options = make_router(
        "maxscore", 8, 4, 2, method="two_stage", soft_topk=True, schedule={"start": 2}
    ).config
    assert typed == from_dict == from_options
    # options set over a given config; the config itself is unchanged
    over = make_router("maxscore", 8, 4, 2, config=typed, normalize=False).config
    assert over.normalize is False and over.method == "two_stage" and typed.normalize is True


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: router_config("gshard", temperature=2.0), r"unknown option\(s\) \['temperature'\]"),
        (lambda: router_config("flow_only", schedule={"start": 2}), r"unknown option\(s\) \['schedule'\]"),
        (lambda: router_config("maxscore", schedule={"begin": 2}), r"schedule field\(s\) \['begin'\]"),
        (lambda: router_config("maxscore", normalize="yes"), "normalize must be true or false"),
        (lambda: router_config("maxscore", soft_topk=1), "soft_topk must be true or false"),
        (lambda: router_config("maxscore", schedule={"start": 2}), "soft_topk is false, so no schedule"),
        (lambda: router_config("maxscore", method="greedy"), "method must be one of"),
        (lambda: router_config("maxscore", group="global", method="sinkhorn"), "exact solver only"),
        (lambda: router_config("gshard", group="world"), "group must be one of"),
        (lambda: router_config("gshard", balance_coef=-1.0), "balance_coef must be a finite number >= 0"),
        (lambda: router_config("sbase", iterations=0), "iterations must be an int >= 1"),
        (lambda: router_config("deepseek_v3", scaling=0.0), "scaling must be a number > 0"),
        (lambda: router_config("gshard", score_function="auto"), "score_function must be one of"),
        (lambda: router_config("gshard", FlowOnlyRouterConfig()), "must be a GShardRouterConfig"),
        (lambda: router_config("gshard", "normalize=true"), "or a dict of its options"),
        (lambda: make_router("gshard", 8, 4, 2, group="global"), "for GShardRouter"),
    ],
)
def test_bad_router_configs_are_named_value_errors(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_flow_only_has_no_schedule_and_labels_its_method():
    router = make_router("flow_only", 8, 4, 2, method="two_stage")
    assert not hasattr(router, "schedule") and router.temperature() == 1.0
    assert router.config.label("flow_only") == "flow_only@two_stage"
    assert GShardRouterConfig().label("gshard") == "gshard" and SBaseRouterConfig().score_function == "auto"


def test_saved_dicts_take_the_defaults_they_were_saved_with():
    # a dict read from a file without an option keeps the behaviour it was trained with
    saved = router_config("maxscore", {"schedule": {"steps": 250}}, saved=True)
    assert saved.normalize is False and saved.soft_topk is True
    assert saved.schedule == TemperatureScheduleConfig(start=4.0, end=1.0, steps=250, kind="linear")
    assert router_config("maxscore", {}, saved=True).schedule.steps == 30000  # no run length then
    # a complete dict written before soft_topk existed had SoftTopk on
    complete = router_config("maxscore_paper", normalize=True).to_dict()
    del complete["soft_topk"]
    assert router_config("maxscore", complete, saved=True).soft_topk is True
    # a complete dict (what is written now) is read back as written
    for written in (
        router_config("maxscore"),
        router_config("maxscore", soft_topk=True, schedule={"start": 2.0}),
    ):
        assert router_config("maxscore", written.to_dict(), saved=True) == written


def test_moe_config_types_the_router_options_and_checks_its_settings():
    moe = maxscore.MoEConfig(
        num_experts=8, k=2, capacity_factor=1.25, router="gshard", router_config={"z_coef": 0.1}
    )
    assert isinstance(moe.router_config, GShardRouterConfig) and moe.router_config.z_coef == 0.1
    assert moe.to_dict()["router_config"]["z_coef"] == 0.1 and moe.capacity_factor == 1.25
    for bad, match in (
        (dict(k=9, num_experts=8), "k must satisfy"),
        (dict(capacity_factor=0.0), "capacity_factor must be"),
        (dict(router="topk"), "router must be one of"),
        (dict(router_config={"temperature": 2.0}), r"unknown option\(s\) \['temperature'\]"),
        (dict(expert_hidden=0), "expert_hidden must be an int >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            maxscore.MoEConfig(**bad)


def test_every_router_is_built_by_the_one_constructor():
    """No registered router writes out its own constructor: their extras go in ``setup``."""
    for cls in ROUTERS.values():
        writers = [c.__name__ for c in cls.__mro__ if "__init__" in vars(c) and issubclass(c, GatedRouter)]
        assert writers == ["GatedRouter"], (cls.__name__, writers)


@pytest.mark.parametrize("name", ["maxscore", "deepseek_v3", "sbase", "gshard"])
def test_the_old_constructor_form_warns_and_builds_the_same_router(name):
    torch.manual_seed(0)
    moe = maxscore.MoEConfig(
        num_experts=4, k=2, capacity_factor=1.5, router=name, router_config={"z_coef": 0.01}
    )
    new = ROUTERS[name](8, moe)
    with pytest.warns(DeprecationWarning, match=r"\(dim, num_experts, k, \.\.\.\) .* is deprecated"):
        old = ROUTERS[name](8, 4, 2, 1.5, z_coef=0.01)
    assert old.config == new.config and old.moe == new.moe
    assert sorted(old.state_dict()) == sorted(new.state_dict())


def test_base_layers_router_keeps_its_old_name():
    from maxscore.routers import BaseLayersRouter, BaseRouter

    assert BaseRouter is BaseLayersRouter and ROUTERS["base"] is BaseLayersRouter
