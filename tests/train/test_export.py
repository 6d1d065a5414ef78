"""``maxscore export``: HF directories that load offline, generate, and match ``maxscore eval``
(routed causally, as in generation); ``tests/hf/test_serving.py`` checks each format in a
process without maxscore."""

from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from maxscore.cli import main  # noqa: E402
from tests.conftest import run_options  # noqa: E402
from tests.hf.helpers import hf_loss  # noqa: E402


@pytest.mark.parametrize(
    ("router", "model_class"),
    [
        ("maxscore", "Ernie4_5_MoeForCausalLM"),
        ("maxscore_paper", "MaxScoreMoeForCausalLM"),
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
    remote = router == "maxscore_paper"  # raw SoftTopk weights: the modeling code in the folder
    assert ("auto_map" in config) is remote and (out / "modeling_maxscore_moe.py").is_file() is remote
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    assert type(model).__name__ == model_class
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("The state of the Union", return_tensors="pt")
    generated = model.generate(
        **prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.eos_token_id
    )
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
    text = small_corpus_dir / "doc03.txt"
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(run), "--data", str(text), "--causal"]) == 0
    expected = json.loads(capsys.readouterr().out)["loss"]
    assert hf_loss(out, text, seq_len=32, trust_remote_code=remote) == pytest.approx(expected, abs=1e-4)


def test_export_refuses_a_non_empty_folder(tmp_path, capsys, small_corpus_dir):
    run = tmp_path / "run"
    assert main(["train", *run_options(small_corpus_dir), "--router", "gshard", "--out", str(run)]) == 0
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "taken")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
