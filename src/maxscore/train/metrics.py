"""What a run logs: routing statistics averaged over layers, ``metrics.jsonl`` (and TensorBoard
when it is installed), and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path

from maxscore.routers.stats import RoutingStats, optimality


def summarize(stats: list[RoutingStats]) -> dict:
    """Routing statistics averaged over the MoE layers (host-side)."""
    if not stats:
        return {}
    rows = [s.as_dict() for s in stats]
    mean = lambda key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    k = len(rows[0]["affinity_by_rank"])
    summary = {
        "dropped_fraction": mean("dropped_fraction"),
        "dropped_first": mean("dropped_first"),
        "dropped_later": mean("dropped_later"),
        "load_ratio_mean": mean("load_ratio_mean"),
        "load_ratio_min": min(r["load_ratio_min"] for r in rows),
        "load_ratio_max": max(r["load_ratio_max"] for r in rows),
        "load_ratio_sorted": [
            sum(r["load_ratio_sorted"][i] for r in rows) / len(rows)
            for i in range(len(rows[0]["load_ratio_sorted"]))
        ],
        "affinity_by_rank": [sum(r["affinity_by_rank"][i] for r in rows) / len(rows) for i in range(k)],
        "entropy": mean("entropy"),
    }
    solver = [r["solver_ms"] for r in rows if r["solver_ms"] is not None]
    if solver:
        summary["solver_ms"] = sum(solver)
    fallbacks = [r["solver_fallbacks"] for r in rows if r["solver_fallbacks"] is not None]
    if fallbacks:
        summary["solver_fallbacks"] = sum(fallbacks)
    measured = [optimality(s) for s in stats if s.group_size is not None]
    if measured:  # the distance to the exact optimum at capacity factor 1, per layer averaged
        summary.update({key: sum(m[key] for m in measured) / len(measured) for key in measured[0]})
    return summary


class MetricsLog:
    """``metrics.jsonl``: one object per logged step; on resume the steps after the checkpoint go."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        kept = []
        if resume_step and path.exists():
            kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
        path.write_text("".join(line + "\n" for line in kept))
        self.tensorboard = _tensorboard(path.parent)

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tensorboard.add_scalar(key, value, row["step"])


def _tensorboard(folder: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(str(folder / "tensorboard"))


def progress_bar(enabled: bool, total: int, initial: int, label: str):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=label, unit="step", dynamic_ncols=True)
