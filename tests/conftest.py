"""Shared fixtures: seeded random routing instances, a small corpus on disk, tiny training settings."""

from __future__ import annotations

import json
import math
import os

import torch

# without a GPU, the device engine's Triton kernels run in Triton's interpreter (set before the
# kernels are first imported: Triton reads it when it compiles them)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from maxscore.train.config import make_config
from maxscore.train.data import load_corpus

KINDS = ("peaked", "flat", "ties", "forbidden", "padding")


def assert_top_k(values_TE: torch.Tensor, experts_TK: torch.Tensor) -> None:
    """Each row's experts are distinct and hold a top-k of its values: every chosen value is at
    least every value left out (checked directly, not by calling torch.topk)."""
    num_experts = values_TE.shape[1]
    assert (experts_TK.sort(1).values.diff(dim=1) != 0).all(), "a row chose an expert twice"
    chosen_TE = torch.zeros_like(values_TE, dtype=torch.bool).scatter_(1, experts_TK, True)
    lowest_chosen_T = values_TE.masked_fill(~chosen_TE, math.inf).min(1).values
    highest_other_T = values_TE.masked_fill(chosen_TE, -math.inf).max(1).values
    assert (lowest_chosen_T >= highest_other_T).all(), "a row left out a higher value"
    assert experts_TK.shape[1] <= num_experts


def random_instance(seed: int, num_tokens: int, num_experts: int, kind: str, keep: int = 0):
    """(scores [T, E] float32, valid [T] bool or None) of a given distribution kind.

    peaked: softmax of N(0, 3^2) logits plus a per-expert bias (imbalanced load);
    flat: softmax of N(0, 0.3^2) logits; ties: scores quantized to 4 levels (many exact ties);
    forbidden: peaked with ~15% of pairs set to -inf, except each token's `keep` best experts;
    padding: peaked with ~25% invalid tokens.
    """
    generator = torch.Generator().manual_seed(seed)
    std = 0.3 if kind == "flat" else 3.0
    logits = torch.randn(num_tokens, num_experts, generator=generator) * std
    if kind != "flat":
        logits += torch.randn(num_experts, generator=generator)
    scores = logits.softmax(-1)
    valid = None
    if kind == "ties":
        scores = torch.randint(0, 4, (num_tokens, num_experts), generator=generator).float() / 4
    elif kind == "forbidden":
        forbid = torch.rand(num_tokens, num_experts, generator=generator) < 0.15
        if keep:
            forbid.scatter_(1, torch.topk(scores, keep, dim=1).indices, False)
        scores = scores.masked_fill(forbid, -math.inf)
    elif kind == "padding":
        valid = torch.rand(num_tokens, generator=generator) > 0.25
    return scores, valid


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# settings for training runs that take seconds on a CPU
TINY = dict(
    vocab_size=384,
    dim=32,
    layers=2,
    heads=2,
    seq_len=32,
    num_experts=4,
    k=2,
    expert_hidden=32,
    batch_size=4,
    lr=3e-3,
    warmup=5,
    log_every=5,
    eval_every=10,
    eval_batches=2,
    checkpoint_every=10,
    device="cpu",
)


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory):
    """20 documents: the first 8000 characters of the first 20 bundled speeches."""
    folder = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(load_corpus().documents[:20]):
        (folder / f"doc{i:02d}.txt").write_text(text[:8000], encoding="utf-8")
    return folder


@pytest.fixture(autouse=True)
def _tokenizer_cache(tmp_path_factory, monkeypatch):
    """Trained tokenizers are cached in the session's temporary folder, not in the home folder."""
    monkeypatch.setenv("MAXSCORE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def tiny_config(data, **overrides):
    """The tiny preset shrunk to test size (``TINY``) on ``data``, with overrides."""
    return make_config("tiny", **{**TINY, "data": str(data), **overrides})


def losses(run_dir) -> list[float]:
    """The training losses a run logged, in order."""
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


TINY_SETTINGS = [  # the command-line twin of TINY
    "vocab_size=384",
    "dim=32",
    "layers=2",
    "heads=2",
    "seq_len=32",
    "num_experts=4",
    "expert_hidden=32",
    "batch_size=4",
    "warmup=2",
    "log_every=2",
    "eval_every=4",
    "eval_batches=1",
    'device="cpu"',
]


def run_options(data) -> list[str]:
    """``maxscore train/compare`` options for a 6-step run at test size on ``data``."""
    options = ["--preset", "tiny", "--steps", "6", "--data", str(data), "--quiet"]
    for setting in TINY_SETTINGS:
        options += ["--set", setting]
    return options
