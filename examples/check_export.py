"""Checks an exported model against its run: the test split's loss, routed causally.

    python examples/check_export.py RUN FOLDER      # RUN: the run folder, FOLDER: its export

Here (with maxscore) the run's test split is cut into the windows of its final evaluation; a
fresh Python process in which ``import maxscore`` fails loads FOLDER with transformers and
scores them; the mean loss per token is compared with the run's causal test loss
(``final.json``).  Exits 1 when they differ by more than 1e-4 nats per token.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from maxscore.train.checkpoint import load_model
from maxscore.train.data import load_corpus
from maxscore.train.tokenizer import encode

SCORE_WITHOUT_MAXSCORE = """
import json, sys
sys.modules["maxscore"] = None  # any import of maxscore now raises ImportError
import torch
from transformers import AutoModelForCausalLM

folder, windows_file, batch_size = sys.argv[1], sys.argv[2], int(sys.argv[3])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
windows = torch.load(windows_file, weights_only=True)
total, count = 0.0, 0
with torch.no_grad():
    for chunk in windows.split(batch_size):
        logits = model(input_ids=chunk[:, :-1]).logits
        targets = chunk[:, 1:].flatten()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets, reduction="sum")
        total, count = total + float(loss), count + chunk[:, 1:].numel()
print(json.dumps({"architecture": type(model).__name__, "loss": total / count, "tokens": count}))
"""


def main(run: str, folder: str) -> int:
    model, saved = load_model(run, "cpu")
    config = saved.config
    expected = json.loads((Path(run) / "final.json").read_text())["test_causal"]["loss"]
    stream = encode(saved.tokenizer, load_corpus(config.data).split("test"))
    windows = stream.windows(model.config.seq_len, config.final_eval_windows)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "windows.pt"
        torch.save(windows, path)
        command = [sys.executable, "-c", SCORE_WITHOUT_MAXSCORE, folder, str(path), str(config.batch_size)]
        done = subprocess.run(command, capture_output=True, text=True, cwd=scratch)
    if done.returncode != 0:
        print(done.stderr[-3000:], file=sys.stderr)
        return 1
    served = json.loads(done.stdout.strip().splitlines()[-1])
    difference = served["loss"] - expected
    print(
        f"{served['architecture']}, without maxscore: test loss {served['loss']:.6f} over {served['tokens']} "
        f"tokens; the run's causal test loss {expected:.6f}; difference {difference:+.2e} nats per token"
    )
    return 0 if abs(difference) <= 1e-4 else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
