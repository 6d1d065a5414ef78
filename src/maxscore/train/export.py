"""``maxscore export``: a trained run as an HF model directory (config, safetensors, tokenizer).

``--format`` (``maxscore.hf.serving``):

- ``auto`` (default): ``ernie4_5_moe`` for softmax gates with renormalized weights (the
  ``maxscore`` default), ``glm4_moe`` for sigmoid gates, else ``maxscore``;
- ``ernie4_5_moe`` / ``glm4_moe``: architectures transformers, vLLM and SGLang run natively;
  the routers' causal rule becomes their per-expert ``e_score_correction_bias``;
- ``maxscore``: any causal rule, with its modeling code in the folder (``auto_map``), loaded
  with ``trust_remote_code=True`` and no maxscore import.

A format that cannot represent the run is refused with the reason and the formats that can.  A
dense run (``moe=None``) becomes a plain ``LlamaForCausalLM``; an ``--hf-model`` run already is
an HF model and is written as one; a multi-process run exports its consolidated
``checkpoint.pt``.  The directory is written next to ``out`` and renamed into place, so a crash
leaves no half-written model, and a non-empty ``out`` is never overwritten.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from maxscore.train.checkpoint import load_model
from maxscore.train.tokenizer import END_OF_TEXT


def export_run(checkpoint: str | Path, out: str | Path, format: str = "auto") -> tuple[Path, str]:
    """Writes the run (a run folder or a checkpoint file) as an HF model directory ``out``;
    returns the folder and the format written (``auto`` resolved; ``llama`` for a dense run,
    ``hf`` for an ``--hf-model`` run)."""
    from transformers import PreTrainedTokenizerFast  # optional dependency: pip install 'maxscore[hf]'

    from maxscore.hf import serving

    if format not in ("auto",) + serving.FORMATS:
        raise ValueError(f"--format must be one of {('auto',) + serving.FORMATS}, got {format!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {str(out)!r} exists and is not empty; choose a new folder")
    model, saved = load_model(checkpoint, "cpu")
    model.eval()
    if saved.config.hf_model is not None or model.config.moe is None:
        kind = "hf" if saved.config.hf_model is not None else "llama"
        if format != "auto":
            raise ValueError(
                f"--format {format} is for the built-in decoder's MoE runs; this run "
                f"({'an --hf-model run' if kind == 'hf' else 'a dense model'}) exports with --format auto"
            )
        format, hf_model = kind, model.hf if kind == "hf" else serving.llama_model(model)
    else:
        hf_model, format = serving.serving_model(model, format)
    end_id = saved.tokenizer.token_to_id(END_OF_TEXT)
    if format != "hf" and end_id is not None:  # generation stops at the corpus's separator
        for config in (hf_model.config, hf_model.generation_config):
            config.eos_token_id = config.pad_token_id = end_id
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        hf_model.save_pretrained(staging, safe_serialization=True)
        if format == "maxscore":  # the modeling code travels with the weights
            shutil.copyfile(
                Path(serving.__file__).with_name(serving.REMOTE_CODE), staging / serving.REMOTE_CODE
            )
        end = END_OF_TEXT if end_id is not None else None
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=saved.tokenizer, eos_token=end, pad_token=end)
        tokenizer.model_max_length = saved.config.model.seq_len
        tokenizer.save_pretrained(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out, format
