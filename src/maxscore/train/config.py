"""Training settings: presets from tiny (CPU minutes) to the paper's shapes, and overrides."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from maxscore._checks import check_int
from maxscore.model import ModelConfig
from maxscore.model.llama import MOE_SETTINGS, moe_from_flat
from maxscore.routers import MoEConfig

PRECISIONS = ("float32", "bfloat16", "float16")


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainConfig:
    """One training run.  ``batch_size`` sequences of ``model.seq_len`` tokens per micro-batch,
    ``accumulation`` micro-batches per optimizer step; AdamW with linear warmup then cosine decay
    to ``min_lr_ratio * lr``; evaluation every ``eval_every`` steps on ``eval_batches`` batches;
    the final evaluation on at most ``final_eval_windows`` windows per split (None: all).
    Multi-process runs: ``batch_size`` is the global batch, shared equally by the ranks; the
    experts are sharded over ``expert_parallel`` ranks (0: all ranks).  ``hf_model``: train an
    upcycled HF model instead of the built-in decoder (see ``maxscore.hf.adapter``).
    ``label`` names the configuration in reports (``maxscore compare`` sets it to the variant,
    e.g. ``flow_only:normalize=true``; default: the router name).  ``compile``: compile each
    decoder block with ``torch.compile(fullgraph=True)`` (the built-in decoder; checkpoints are
    the same as eager runs')."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 300
    batch_size: int = 16
    accumulation: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    final_eval_windows: int | None = None
    checkpoint_every: int = 100
    seed: int = 0
    data: str | None = None
    device: str = "auto"
    precision: str = "bfloat16"
    expert_parallel: int = 0
    hf_model: str | None = None
    label: str | None = None
    compile: bool = False

    def __post_init__(self) -> None:
        positive = (
            "steps",
            "batch_size",
            "accumulation",
            "log_every",
            "eval_every",
            "eval_batches",
            "checkpoint_every",
        )
        for name in positive:
            check_int(name, getattr(self, name))
        if self.final_eval_windows is not None and (
            isinstance(self.final_eval_windows, bool)
            or not isinstance(self.final_eval_windows, int)
            or self.final_eval_windows < 1
        ):
            raise ValueError(
                f"final_eval_windows must be an int >= 1 or None, got {self.final_eval_windows!r}"
            )
        if (
            isinstance(self.expert_parallel, bool)
            or not isinstance(self.expert_parallel, int)
            or self.expert_parallel < 0
        ):
            raise ValueError(
                f"expert_parallel must be an int >= 0 (0: all ranks), got {self.expert_parallel!r}"
            )
        check_int("warmup", self.warmup, 0)
        for name in ("lr", "clip"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.compile, bool):
            raise ValueError(f"compile must be true or false, got {self.compile!r}")
        if self.compile and self.hf_model is not None:
            raise ValueError("compile is for the built-in decoder; train an hf_model run without it")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        values = json.loads(text)
        return cls(**{**values, "model": ModelConfig.from_saved(values["model"])})


def _model(expert_hidden: int, **values) -> ModelConfig:
    return ModelConfig(moe=MoEConfig(expert_hidden=expert_hidden), **values)


# Paper shapes (PAPER.md §4): F = 8/3 D rounded to 64 (a LLaMA MLP's width; the paper gives
# activated sizes, not F), 16 experts, top-2, sequence 512, vocabulary 32000.
PRESETS: dict[str, TrainConfig] = {
    "tiny": TrainConfig(
        model=_model(vocab_size=4096, dim=128, layers=4, heads=4, seq_len=128, expert_hidden=256),
        steps=300,
        batch_size=16,
        lr=3e-3,
        warmup=30,
    ),
    "small": TrainConfig(
        model=_model(vocab_size=8192, dim=256, layers=6, heads=4, seq_len=256, expert_hidden=512),
        steps=2000,
        batch_size=16,
        lr=2e-3,
        warmup=100,
        eval_every=250,
        checkpoint_every=250,
    ),
    "paper-162m": TrainConfig(
        model=_model(vocab_size=32000, dim=768, layers=12, heads=12, seq_len=512, expert_hidden=2048),
        steps=30000,
        batch_size=32,
        lr=6e-4,
        warmup=2048,
        eval_every=1000,
        checkpoint_every=1000,
    ),
    "paper-317m": TrainConfig(
        model=_model(vocab_size=32000, dim=1128, layers=12, heads=12, seq_len=512, expert_hidden=3008),
        steps=30000,
        batch_size=32,
        lr=5e-4,
        warmup=2048,
        eval_every=1000,
        checkpoint_every=1000,
    ),
    "paper-599m": TrainConfig(
        model=_model(vocab_size=32000, dim=1608, layers=12, heads=12, seq_len=512, expert_hidden=4288),
        steps=30000,
        batch_size=32,
        lr=4e-4,
        warmup=2048,
        eval_every=1000,
        checkpoint_every=1000,
    ),
    "paper-1205m": TrainConfig(
        model=_model(vocab_size=32000, dim=2048, layers=16, heads=16, seq_len=512, expert_hidden=5440),
        steps=30000,
        batch_size=32,
        lr=3e-4,
        warmup=2048,
        eval_every=1000,
        checkpoint_every=1000,
    ),
}

# settings by name: the model's fields and its MoE layers' flat settings (``k``, ``router``, ...)
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} | set(MOE_SETTINGS)
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}


def make_config(preset: str, **overrides) -> TrainConfig:
    """A preset with overrides of any ``TrainConfig`` or ``ModelConfig`` field (by name).

    Raises:
        ValueError: unknown preset or field, or an invalid value.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    unknown = sorted(set(overrides) - MODEL_FIELDS - TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown setting(s) {unknown}; settings are {sorted(MODEL_FIELDS | TRAIN_FIELDS)}")
    base = PRESETS[preset]
    model_overrides = {k: v for k, v in overrides.items() if k in MODEL_FIELDS and k not in MOE_SETTINGS}
    flat = {k: v for k, v in overrides.items() if k in MOE_SETTINGS}
    if flat:  # --set k=..., router=dense, a variant's capacity_factor=...: over the preset's MoE
        model_overrides["moe"], model_overrides["dense_hidden"] = moe_from_flat(flat, base.model)
    model = dataclasses.replace(base.model, **model_overrides)
    return dataclasses.replace(base, model=model, **{k: v for k, v in overrides.items() if k in TRAIN_FIELDS})


def parse_override(text: str) -> tuple[str, object]:
    """``key=value`` with the value read as JSON when it parses (numbers, true, {...}), else a string."""
    if "=" not in text:
        raise ValueError(f"an override must look like key=value, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value
