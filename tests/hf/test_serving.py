"""``maxscore export --format``: folders that a process without maxscore loads with transformers
and that route, score and generate as maxscore's causal evaluation of the same checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

transformers = pytest.importorskip("transformers")

from maxscore.cli import main  # noqa: E402
from maxscore.hf.serving import serving_problems  # noqa: E402
from maxscore.routers.causal import CausalRule  # noqa: E402
from maxscore.train.checkpoint import load_model  # noqa: E402
from tests.conftest import run_options  # noqa: E402

PROMPT, NEW_TOKENS, SEQ_LEN = 12, 32, 48
# (run name, router, --set options, --format, the architecture written)
CASES = [
    ("maxscore", "maxscore", [], "auto", "Ernie4_5_MoeForCausalLM"),
    ("maxscore_cf125", "maxscore", ["capacity_factor=1.25"], "auto", "Ernie4_5_MoeForCausalLM"),
    ("maxscore_remote", "maxscore", [], "maxscore", "MaxScoreMoeForCausalLM"),
    ("sigmoid", "maxscore", ['router_options={"score_function": "sigmoid"}'], "auto", "Glm4MoeForCausalLM"),
    ("deepseek_v3", "deepseek_v3", [], "auto", "Glm4MoeForCausalLM"),
    ("paper", "maxscore_paper", [], "auto", "MaxScoreMoeForCausalLM"),
    ("quantile", "quantile", [], "auto", "MaxScoreMoeForCausalLM"),
]

# run in a fresh interpreter in which `import maxscore` fails
WITHOUT_MAXSCORE = textwrap.dedent(
    """
    import json, sys
    sys.modules["maxscore"] = None  # any import of maxscore now raises ImportError
    import torch
    from transformers import AutoModelForCausalLM

    for job in json.load(open(sys.argv[1])):
        inputs = torch.load(job["inputs"], weights_only=True)
        folder = job["folder"]
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32)
        model.eval()
        experts = {}

        def keep(i):
            def hook(module, args, out):
                experts[i] = out[2]  # returns None: the output stays
            return hook

        hooks = [layer.mlp.gate.register_forward_hook(keep(i)) for i, layer in enumerate(model.model.layers)]
        with torch.no_grad():
            logits = model(input_ids=inputs["tokens"], attention_mask=inputs["mask"]).logits
        for hook in hooks:
            hook.remove()
        prompt = inputs["prompt"]
        generated = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=job["new_tokens"],
            do_sample=False, pad_token_id=0,
        )
        torch.save(
            {"architecture": type(model).__name__, "logits": logits, "generated": generated,
             "experts": [experts[i].reshape(logits.shape[0], logits.shape[1], -1) for i in sorted(experts)]},
            job["result"],
        )
    """
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, small_corpus_dir):
    """Each case trained (6 steps), exported, and evaluated by the process without maxscore."""
    root = tmp_path_factory.mktemp("serving")
    jobs = []
    for name, router, settings, format, _ in CASES:
        run, folder = root / f"run_{name}", root / f"export_{name}"
        extra = [option for setting in [f"seq_len={SEQ_LEN}", *settings] for option in ("--set", setting)]
        assert (
            main(["train", *run_options(small_corpus_dir), *extra, "--router", router, "--out", str(run)])
            == 0
        )
        assert main(["export", "--checkpoint", str(run), "--out", str(folder), "--format", format]) == 0
        model, saved = load_model(run, "cpu")
        inputs = validation_inputs(saved.tokenizer, small_corpus_dir, model.config.vocab_size)
        torch.save(inputs, root / f"inputs_{name}.pt")
        jobs.append(
            {
                "folder": str(folder),
                "inputs": str(root / f"inputs_{name}.pt"),
                "new_tokens": NEW_TOKENS,
                "result": str(root / f"result_{name}.pt"),
            }
        )
    (root / "jobs.json").write_text(json.dumps(jobs))
    (root / "load.py").write_text(WITHOUT_MAXSCORE)
    done = subprocess.run(
        [sys.executable, str(root / "load.py"), str(root / "jobs.json")],
        capture_output=True,
        text=True,
        cwd=root,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return root


def validation_inputs(tokenizer, corpus, vocab_size: int) -> dict[str, torch.Tensor]:
    """Three windows of a held-out document, the last one right-padded; a prompt."""
    text = (corpus / "doc19.txt").read_text(encoding="utf-8")
    ids = torch.tensor(tokenizer.encode(text).ids[: 3 * SEQ_LEN])
    tokens = ids.view(3, SEQ_LEN).clone()
    mask = torch.ones_like(tokens)
    mask[2, SEQ_LEN - 10 :] = 0
    tokens[2, SEQ_LEN - 10 :] = 0
    assert int(tokens.max()) < vocab_size
    return {"tokens": tokens, "mask": mask, "prompt": ids[None, :PROMPT].clone()}


def maxscore_side(run, inputs):
    """maxscore's causal evaluation: experts per layer, logits, and greedy generation."""
    model, _ = load_model(run, "cpu")
    model.eval()
    experts = []
    hooks = [
        b.mlp.router.register_forward_hook(lambda m, a, out: experts.append(out.experts))
        for b in model.blocks
    ]
    valid = inputs["mask"].bool()
    with torch.no_grad():
        logits = model(inputs["tokens"], valid, causal=True).logits
        for hook in hooks:
            hook.remove()
        sequence = inputs["prompt"]
        for _ in range(NEW_TOKENS):
            step = model(sequence, causal=True).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, step], dim=1)
    shape = inputs["tokens"].shape
    return logits, [e.view(*shape, -1) for e in experts], sequence


@pytest.mark.parametrize(
    ("name", "router", "settings", "format", "architecture"), CASES, ids=[c[0] for c in CASES]
)
def test_export_without_maxscore_routes_scores_and_generates_as_maxscore(
    exported, name, router, settings, format, architecture
):
    inputs = torch.load(exported / f"inputs_{name}.pt", weights_only=True)
    result = torch.load(exported / f"result_{name}.pt", weights_only=True)
    assert result["architecture"] == architecture
    logits, experts, generated = maxscore_side(exported / f"run_{name}", inputs)
    valid = inputs["mask"].bool()
    for layer, (ours, theirs) in enumerate(zip(experts, result["experts"], strict=True)):
        same = torch.equal(ours[valid].sort(-1).values, theirs[valid].sort(-1).values)
        assert same, f"layer {layer}: other experts"
    torch.testing.assert_close(result["logits"][valid], logits[valid], atol=1e-4, rtol=0)
    assert torch.equal(result["generated"], generated)
    # the validation loss per token, as the run's causal evaluation computes it
    targets = inputs["tokens"][:, 1:][valid[:, 1:]]
    ours = torch.nn.functional.cross_entropy(logits[:, :-1][valid[:, 1:]], targets)
    theirs = torch.nn.functional.cross_entropy(result["logits"][:, :-1][valid[:, 1:]], targets)
    assert abs(float(ours - theirs)) < 1e-4
    config = json.loads((exported / f"export_{name}" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (architecture != "Glm4MoeForCausalLM")


def test_a_format_that_cannot_represent_the_run_is_refused(tmp_path, capsys, small_corpus_dir):
    run = tmp_path / "run"
    assert main(["train", *run_options(small_corpus_dir), "--router", "quantile", "--out", str(run)]) == 0
    for format in ("ernie4_5_moe", "glm4_moe"):
        assert (
            main(["export", "--checkpoint", str(run), "--out", str(tmp_path / format), "--format", format])
            == 2
        )
        error = capsys.readouterr().err
        assert "a bias on the logits" in error and "formats that can: ['maxscore']" in error
        assert not (tmp_path / format).exists()
    with pytest.raises(SystemExit):
        main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "x"), "--format", "onnx"])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err


def rule(**changes) -> CausalRule:
    values = dict(k=2, score_function="softmax", bias_E=torch.zeros(4), normalize=True) | changes
    return CausalRule(**values)


def test_serving_problems_name_each_reason():
    assert serving_problems(rule(), "ernie4_5_moe") == []
    assert serving_problems(rule(score_function="sigmoid", scaling=2.5, num_groups=2), "glm4_moe") == []
    assert (
        "SoftTopk combine weights (temperature 3.5"
        in serving_problems(rule(temperature=3.5), "ernie4_5_moe")[0]
    )
    assert serving_problems(rule(normalize=False), "ernie4_5_moe") == [
        "weights not renormalized (ernie4_5_moe always renormalizes)"
    ]
    assert serving_problems(rule(), "glm4_moe") == ["softmax scores (glm4_moe scores by sigmoid)"]
    assert serving_problems(rule(values="log_scores", temperature=2.0), "maxscore") == []
    with pytest.raises(ValueError, match="format must be one of"):
        serving_problems(rule(), "onnx")
