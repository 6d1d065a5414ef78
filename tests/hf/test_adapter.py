"""The training harness on an upcycled HF model (``maxscore train --hf-model``)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maxscore.cli import main  # noqa: E402
from maxscore.train.checkpoint import load_model  # noqa: E402
from maxscore.train.loop import train  # noqa: E402
from tests.conftest import losses, tiny_config  # noqa: E402
from tests.hf.helpers import hf_loss  # noqa: E402

HF = dict(
    model_type="llama",
    vocab_size=384,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=64,
)


def test_fresh_hf_config_trains_and_its_checkpoint_evaluates(small_corpus_dir, tmp_path):
    config_file = tmp_path / "llama.json"
    config_file.write_text(json.dumps(HF))
    config = tiny_config(small_corpus_dir, steps=30, log_every=1, hf_model=str(config_file))
    final = train(config, tmp_path / "run", progress=False)
    values = losses(tmp_path / "run")
    assert sum(values[-5:]) / 5 < sum(values[:5]) / 5 - 0.5, values
    assert final["validation_batch"]["loss"] < values[0]
    model, checkpoint = load_model(tmp_path / "run")
    assert checkpoint.hf_config is not None and type(model.hf).__name__ == "MaxScoreLlamaForCausalLM"
    row = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["dropped_fraction"] == 0 and row["load_ratio_min"] == 1.0


def test_cli_upcycles_a_saved_dense_model(small_corpus_dir, tmp_path, capsys):
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**{k: v for k, v in HF.items() if k != "model_type"})
    )
    dense.save_pretrained(tmp_path / "dense")
    argv = ["train", "--preset", "tiny", "--steps", "4", "--data", str(small_corpus_dir), "--device", "cpu"]
    argv += ["--hf-model", str(tmp_path / "dense"), "--out", str(tmp_path / "run"), "--quiet"]
    argv += [
        "--set",
        "seq_len=32",
        "--set",
        "batch_size=4",
        "--set",
        "num_experts=4",
        "--set",
        "final_eval_windows=8",
    ]
    assert main(argv) == 0
    model, _ = load_model(tmp_path / "run")
    assert model.hf.model.layers[0].mlp.moe.experts.w_up.shape == (4, 32, 32)
    assert json.loads(capsys.readouterr().out)["steps"] == 4


def test_an_hf_model_run_exports_as_its_hf_class(small_corpus_dir, tmp_path, capsys):
    config_file = tmp_path / "llama.json"
    config_file.write_text(json.dumps(HF))
    train(tiny_config(small_corpus_dir, steps=4, hf_model=str(config_file)), tmp_path / "run", progress=False)
    assert (
        main(
            ["export", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--out", str(tmp_path / "hf")]
        )
        == 0
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(loaded).__name__ == "MaxScoreLlamaForCausalLM"
    text = small_corpus_dir / "doc05.txt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(text)]) == 0
    expected = json.loads(capsys.readouterr().out)["loss"]
    seq_len = tiny_config(small_corpus_dir).model.seq_len
    assert hf_loss(tmp_path / "hf", text, seq_len=seq_len) == pytest.approx(expected, rel=5e-3)
