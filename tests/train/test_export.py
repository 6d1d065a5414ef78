"""``maxscore export``: HF directories that load offline, generate, and match ``maxscore eval``."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

import maxscore.hf  # noqa: E402, F401  (registers the MaxScore classes)
from maxscore.cli import main  # noqa: E402
from tests.conftest import run_options  # noqa: E402
from tests.hf.helpers import hf_loss  # noqa: E402


@pytest.mark.parametrize(
    ("router", "model_class"),
    [
        ("maxscore", "MaxScoreLlamaForCausalLM"),
        ("maxscore_paper", "MaxScoreLlamaForCausalLM"),
        ("dense", "LlamaForCausalLM"),
    ],
)
def test_export_loads_offline_generates_and_matches_eval(
    router, model_class, tmp_path, capsys, small_corpus_dir, monkeypatch
):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    args = ["train", *run_options(small_corpus_dir), "--router", router, "--out", str(run)]
    assert main(args) == 0
    out = tmp_path / "exported"
    assert main(["export", "--checkpoint", str(run), "--out", str(out)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [model_class]
    if router != "dense":  # the options stored resolved: the paper's schedule over the run's 6 steps
        options = config["router_options"]
        assert config["router"] == router and options["soft_topk"] is (router == "maxscore_paper")
        assert options["schedule"]["steps"] == (6 if router == "maxscore_paper" else None)
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(model).__name__ == model_class
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The state of the Union", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    text = small_corpus_dir / "doc03.txt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(text)]) == 0
    expected = json.loads(capsys.readouterr().out)["loss"]
    assert hf_loss(out, text, seq_len=32) == pytest.approx(expected, rel=5e-3)


def test_export_refuses_a_non_empty_folder(tmp_path, capsys, small_corpus_dir):
    run = tmp_path / "run"
    assert main(["train", *run_options(small_corpus_dir), "--router", "gshard", "--out", str(run)]) == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
