"""Training runs: learning, determinism, exact resume, checkpoints, settings."""

from __future__ import annotations

import json

import pytest

from maxscore.routers import ROUTERS
from maxscore.train.checkpoint import load_checkpoint, load_model
from maxscore.train.config import PRESETS, make_config, parse_override
from maxscore.train.loop import learning_rate, train
from tests.conftest import losses, tiny_config


@pytest.mark.parametrize("router", [*sorted(ROUTERS), "dense"])
def test_loss_decreases_for_every_router(router, small_corpus_dir, tmp_path):
    extra = {"k": 1} if router == "switch" else {}
    final = train(
        tiny_config(small_corpus_dir, router=router, steps=30, log_every=1, **extra), tmp_path, progress=False
    )
    values = losses(tmp_path)
    assert len(values) == 30
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.5, values
    assert final["validation_batch"]["loss"] < values[0]
    if router != "dense":
        assert "dropped_fraction" in json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])


def test_same_seed_same_losses_and_other_seed_differs(small_corpus_dir, tmp_path):
    runs = [tmp_path / name for name in ("a", "b", "c")]
    for run, seed in zip(runs, (0, 0, 1), strict=True):
        train(tiny_config(small_corpus_dir, steps=10, seed=seed), run, progress=False)
    assert losses(runs[0]) == losses(runs[1])
    assert losses(runs[0]) != losses(runs[2])


@pytest.mark.parametrize("router", ["maxscore", "deepseek_v3"])
def test_resume_equals_uninterrupted(router, small_corpus_dir, tmp_path):
    config = tiny_config(small_corpus_dir, router=router, steps=20, log_every=1, accumulation=2)
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    train(config, whole, progress=False)
    assert train(config, parts, progress=False, stop_after=10) == {}
    assert load_checkpoint(parts).step == 10 and len(losses(parts)) == 10
    train(config, parts, progress=False)
    assert losses(parts) == losses(whole)  # bit for bit
    final_whole = json.loads((whole / "final.json").read_text())
    final_parts = json.loads((parts / "final.json").read_text())
    assert final_parts["test_batch"] == final_whole["test_batch"]


def test_resume_cleans_its_stale_temporary_files_and_says_which_settings_stand(
    small_corpus_dir, tmp_path, capsys
):
    config = tiny_config(small_corpus_dir, steps=12)
    assert train(config, tmp_path, progress=False, stop_after=6) == {}
    stale = tmp_path / "checkpoint.pt.tmp99999"  # a process killed while writing its checkpoint
    stale.write_bytes(b"half a checkpoint")
    capsys.readouterr()
    train(config, tmp_path, progress=False, stop_after=8)  # the same settings: nothing to say
    assert not stale.exists()
    assert "saved settings" not in capsys.readouterr().err
    train(tiny_config(small_corpus_dir, steps=30, lr=1e-3), tmp_path, progress=False)
    message = capsys.readouterr().err
    assert "resuming" in message and "steps=12 (given 30)" in message and "lr=0.003 (given 0.001)" in message
    assert load_checkpoint(tmp_path).step == 12  # the saved steps stood


def test_a_compiled_run_equals_the_eager_one_and_shares_its_checkpoints(small_corpus_dir, tmp_path):
    """``compile=True`` (``--compile``) compiles each decoder block with fullgraph=True: the same
    losses over 20 steps (within 1e-4), and a checkpoint the eager model loads (resumed eagerly,
    the run goes on with the same losses)."""
    eager, compiled = tmp_path / "eager", tmp_path / "compiled"
    train(tiny_config(small_corpus_dir, steps=20, log_every=1), eager, progress=False)
    config = tiny_config(small_corpus_dir, steps=20, log_every=1, compile=True)
    assert train(config, compiled, progress=False, stop_after=10) == {}
    assert json.loads((compiled / "config.json").read_text())["compile"] is True
    model, _ = load_model(compiled / "checkpoint.pt")  # an eager model, the same parameter names
    assert model.blocks[0].mlp.router.price_updates > 0
    train(config, compiled, progress=False)
    assert losses(compiled) == pytest.approx(losses(eager), abs=1e-4)


def test_checkpoint_is_self_contained(small_corpus_dir, tmp_path):
    train(tiny_config(small_corpus_dir, steps=10, router="maxscore_paper"), tmp_path, progress=False)
    model, checkpoint = load_model(tmp_path / "checkpoint.pt")
    assert checkpoint.step == 10 and checkpoint.config.model.moe.router == "maxscore_paper"
    assert model.blocks[0].mlp.router.schedule.num_steps == 10
    assert model.blocks[0].mlp.router.price_updates > 0
    assert checkpoint.tokenizer.decode(checkpoint.tokenizer.encode("Union").ids) == "Union"
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable maxscore checkpoint"):
        load_checkpoint(tmp_path / "broken.pt")


def test_learning_rate_schedule():
    config = make_config("tiny", lr=1.0, warmup=10, steps=110, min_lr_ratio=0.1)
    assert learning_rate(config, 0) == pytest.approx(0.1)
    assert learning_rate(config, 9) == pytest.approx(1.0)
    assert learning_rate(config, 60) == pytest.approx(0.55)
    assert learning_rate(config, 110) == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"k": 20}, "k must satisfy 1 <= k <= num_experts=16, got k=20"),
        ({"router": "top2"}, "router must be 'dense' or one of"),
        ({"lr": 0}, "lr must be a number > 0"),
        ({"colour": "red"}, r"unknown setting\(s\) \['colour'\]"),
        ({"precision": "int8"}, "precision must be one of"),
        ({"dim": 100, "heads": 3}, "must be a multiple of 2 x heads"),
        ({"compile": "yes"}, "compile must be true or false"),
    ],
)
def test_bad_settings(overrides, match):
    with pytest.raises(ValueError, match=match):
        make_config("tiny", **overrides)


def test_presets_and_overrides():
    with pytest.raises(ValueError, match="preset must be one of"):
        make_config("huge")
    assert parse_override("lr=1e-3") == ("lr", 1e-3) and parse_override("router=gshard") == (
        "router",
        "gshard",
    )
    assert parse_override('router_options={"method": "two_stage"}')[1] == {"method": "two_stage"}
    with pytest.raises(ValueError, match="key=value"):
        parse_override("lr")
    config = make_config("paper-162m")
    assert config.model.dim == 768 and config.model.moe.num_experts == 16 and config.model.seq_len == 512
    assert set(PRESETS) >= {"tiny", "small", "paper-162m", "paper-317m", "paper-599m", "paper-1205m"}
