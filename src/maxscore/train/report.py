"""A markdown report with plots from finished runs (each a directory with ``final.json``).

Runs are grouped by router (seeds averaged: mean and half the spread).  Plots (PNG):
``loss.png`` training and validation loss, ``load_ratio.png`` sorted expert load/capacity at
the end (the paper's load-balance figure), ``affinity.png`` mean router score of the 1st and
2nd expert over training, ``dropped.png`` dropped fraction over training.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from maxscore.model import ModelConfig
from maxscore.train.paired import paired_rows, paired_table

PLOTS = ("loss.png", "load_ratio.png", "affinity.png", "dropped.png")


def find_runs(paths: list[str | Path]) -> list[Path]:
    """Run directories among ``paths`` and their subdirectories (those with ``final.json``)."""
    runs = []
    for path in map(Path, paths):
        if (path / "final.json").is_file():
            runs.append(path)
        elif path.is_dir():
            runs.extend(sorted(p.parent for p in path.glob("*/final.json")))
    if not runs:
        raise ValueError(f"no finished runs (directories with final.json) under {[str(p) for p in paths]}")
    return runs


def load_run(path: Path) -> dict:
    final = json.loads((path / "final.json").read_text())
    final["metrics"] = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    final["path"] = str(path)
    return final


def _mean_spread(values: list[float]) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    return f"{mean:.4f}" if len(values) == 1 else f"{mean:.4f} ± {(max(values) - min(values)) / 2:.4f}"


def _mean(values: list[float], fmt: str) -> str:
    return format(statistics.fmean(values), fmt) if values else "-"


def _test_metric(runs: list[dict], mode: str, field: str) -> list[float]:
    return [r[f"test_{mode}"][field] for r in runs if f"test_{mode}" in r]


def _last(runs: list[dict], key: str) -> list:
    return [r["last"][key] for r in runs if key in r["last"]]


def summary_table(groups: dict[str, list[dict]]) -> str:
    lines = [
        "| router | seeds | val loss | test ppl batch | test ppl causal | test bpc batch | test bpc causal "
        "| dropped | load/cap mean | load/cap min | affinity 1st / 2nd | tokens/s | params active / total |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for router, runs in groups.items():
        affinity = _last(runs, "affinity_by_rank")
        affinity_text = (
            " / ".join(f"{statistics.fmean(a[i] for a in affinity):.3f}" for i in range(len(affinity[0])))
            if affinity
            else "-"
        )
        lines.append(
            f"| {router} | {len(runs)} | {_mean_spread([r['validation_batch']['loss'] for r in runs])} "
            f"| {_mean(_test_metric(runs, 'batch', 'perplexity'), '.2f')} "
            f"| {_mean(_test_metric(runs, 'causal', 'perplexity'), '.2f')} "
            f"| {_mean(_test_metric(runs, 'batch', 'bpc'), '.4f')} "
            f"| {_mean(_test_metric(runs, 'causal', 'bpc'), '.4f')} "
            f"| {_mean(_last(runs, 'dropped_fraction'), '.2%')} "
            f"| {_mean(_last(runs, 'load_ratio_mean'), '.3f')} "
            f"| {_mean(_last(runs, 'load_ratio_min'), '.3f')} | {affinity_text} "
            f"| {_mean(_last(runs, 'tokens_per_s'), '.0f')} "
            f"| {runs[0]['active_parameters'] / 1e6:.2f}M / {runs[0]['parameters'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def _over_training(runs: list[dict], key: str) -> list[float]:
    """Each run's mean of ``key`` over its logged steps."""
    means = []
    for run in runs:
        values = [row[key] for row in run["metrics"] if key in row]
        if values:
            means.append(statistics.fmean(values))
    return means


def balance_table(groups: dict[str, list[dict]]) -> str:
    """Distance to the exact optimum at capacity factor 1 (training batches, mean over the logged
    steps and at the last one) and the balance of causal routing; empty when no run logged it."""
    if not any("opt_gap" in r["last"] for runs in groups.values() for r in runs):
        return ""
    lines = [
        "| router | gap to optimum, mean / last | slots over capacity 1, mean / last "
        "| largest load / mean, mean / last | causal load max / min | val loss causal |",
        "|---|---|---|---|---|---:|",
    ]
    for router, runs in groups.items():

        def pair(key: str, fmt: str, runs: list[dict] = runs) -> str:
            return f"{_mean(_over_training(runs, key), fmt)} / {_mean(_last(runs, key), fmt)}"

        causal = [r["causal_load"] for r in runs if "causal_load" in r]
        causal_text = (
            f"{_mean([c['max'] for c in causal], '.3f')} / {_mean([c['min'] for c in causal], '.3f')}"
            if causal
            else "-"
        )
        causal_loss = [r["validation_causal"]["loss"] for r in runs if "validation_causal" in r]
        lines.append(
            f"| {router} | {pair('opt_gap', '.2e')} | {pair('over_capacity', '.2%')} "
            f"| {pair('load_max_over_mean', '.3f')} | {causal_text} | {_mean(causal_loss, '.4f')} |"
        )
    return "\n".join(lines)


def _series(runs: list[dict], key: str, index: int | None = None) -> tuple[list[int], list[float]]:
    """Mean over seeds of ``key`` per logged step (steps where every seed logged it)."""
    per_step: dict[int, list[float]] = defaultdict(list)
    for run in runs:
        for row in run["metrics"]:
            if key in row:
                per_step[row["step"]].append(row[key] if index is None else row[key][index])
    steps = sorted(s for s, v in per_step.items() if len(v) == len(runs))
    return steps, [statistics.fmean(per_step[s]) for s in steps]


def plot(groups: dict[str, list[dict]], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (train_axis, val_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for router, runs in groups.items():
        train_axis.plot(*_series(runs, "loss"), label=router)
        val_axis.plot(*_series(runs, "val_loss"), marker="o", label=router)
    for axis, title in ((train_axis, "training loss"), (val_axis, "validation loss")):
        axis.set(xlabel="step", ylabel="loss", title=title)
        axis.legend(fontsize=8)
    _save(figure, out / "loss.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for router, runs in groups.items():
        ratios = [r["last"]["load_ratio_sorted"] for r in runs if "load_ratio_sorted" in r["last"]]
        if ratios:
            mean = [statistics.fmean(values) for values in zip(*ratios, strict=True)]
            axis.plot(range(1, len(mean) + 1), mean, marker=".", label=router)
    axis.axhline(1.0, color="gray", linewidth=0.8)
    axis.set(
        xlabel="expert (sorted by load)", ylabel="load / capacity", title="expert load at the end of training"
    )
    axis.legend(fontsize=8)
    _save(figure, out / "load_ratio.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for router, runs in groups.items():
        if any("affinity_by_rank" in row for row in runs[0]["metrics"]):
            (line,) = axis.plot(*_series(runs, "affinity_by_rank", 0), label=f"{router} 1st")
            if len(runs[0]["metrics"][-1].get("affinity_by_rank", [])) > 1:
                axis.plot(
                    *_series(runs, "affinity_by_rank", 1),
                    linestyle="--",
                    color=line.get_color(),
                    label=f"{router} 2nd",
                )
    axis.set(xlabel="step", ylabel="mean router score", title="affinity of the 1st and 2nd expert")
    axis.legend(fontsize=8)
    _save(figure, out / "affinity.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for router, runs in groups.items():
        if any("dropped_fraction" in row for row in runs[0]["metrics"]):
            axis.plot(*_series(runs, "dropped_fraction"), label=router)
    axis.set(xlabel="step", ylabel="dropped fraction of choices", title="dropped tokens")
    axis.legend(fontsize=8)
    _save(figure, out / "dropped.png")
    plt.close("all")
    return list(PLOTS)


def _plain_rows(groups: dict[str, list[dict]]) -> list[dict]:
    return [
        {
            "label": label,
            "seeds": sorted(run["seed"] for run in runs),
            "val_loss": statistics.fmean(run["validation_batch"]["loss"] for run in runs),
        }
        for label, runs in groups.items()
    ]


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_paired(rows: list[dict], baseline: str, out: Path) -> str:
    """``paired.png``: every configuration's per-seed validation differences to the baseline
    (dots) and their interval (bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["label"] != baseline and r["val_differences"]]
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(rows) + 1.5))
    for y, row in enumerate(rows):
        axis.scatter(row["val_differences"], [y] * len(row["val_differences"]), s=12, color="tab:blue")
        if "val_diff" in row and math.isfinite(row["val_diff_low"]):
            axis.plot([row["val_diff_low"], row["val_diff_high"]], [y, y], color="black", linewidth=1)
            axis.plot([row["val_diff"]], [y], marker="|", color="black", markersize=10)
    axis.axvline(0.0, color="gray", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    axis.set(xlabel=f"validation loss - {baseline} (same seed)", title="paired differences (dots: seeds)")
    _save(figure, out / "paired.png")
    plt.close(figure)
    return "paired.png"


def write_report(
    paths: list[str | Path],
    out: str | Path,
    title: str = "Routing comparison",
    baseline: str | None = None,
) -> str:
    """Writes ``results.md``, ``results.json`` and the plots to ``out``; returns the markdown.

    ``baseline`` (a configuration label; default ``gshard`` when present) adds the paired
    differences of every configuration to it, with Student-t intervals (``paired.png`` too).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, list[dict]] = defaultdict(list)
    for run in map(load_run, find_runs(paths)):
        groups[run["router"]].append(run)
    groups = dict(groups)
    if baseline is None and "gshard" in groups:
        baseline = "gshard"
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not among the runs' configurations {sorted(groups)}")
    plots = plot(groups, out)
    rows = [] if baseline is None else paired_rows(groups, baseline)
    paired = paired_table(rows, baseline) + "\n\n" if rows else ""
    if rows:
        plots.append(plot_paired(rows, baseline, out))
    (out / "results.json").write_text(
        json.dumps({"baseline": baseline, "configurations": rows or _plain_rows(groups)}, indent=1)
    )
    balance = balance_table(groups)
    if balance:
        balance = (
            "Distance to the optimum: each training batch's routing against the exact optimum of "
            "the same routing groups at capacity factor 1 (gap = (OPT - score) / |OPT|, negative "
            "where a router overloads experts), averaged over layers; causal = the validation split "
            "routed token by token, the largest and smallest expert load over the capacity of batch "
            "routing.\n\n" + balance + "\n\n"
        )
    config = json.loads((Path(groups[next(iter(groups))][0]["path"]) / "config.json").read_text())
    model = ModelConfig.from_saved(config["model"])  # saved nested or (older runs) flat
    moe = model.moe
    mlp = (
        f"dense MLP {model.dense_hidden}"
        if moe is None
        else f"{moe.num_experts} experts, top-{moe.k}, capacity factor {moe.capacity_factor}"
    )
    text = (
        f"# {title}\n\n"
        f"Model: dim {model.dim}, {model.layers} layers, {mlp}, sequence {model.seq_len}, "
        f"vocabulary {model.vocab_size}; "
        f"{config['steps']} steps of {config['batch_size'] * config['accumulation']} sequences; data "
        f"{config['data'] or 'bundled State of the Union corpus'}.\n"
        "Losses in nats per token; spread = half the range over seeds; statistics (dropped, load, affinity) "
        "from the last logged step, averaged over layers; causal = every token routed alone (MaxScore: "
        "top-k of score - averaged dual prices - causal correction).\n\n"
        f"{summary_table(groups)}\n\n{balance}{paired}" + "\n".join(f"![{p}]({p})" for p in plots) + "\n"
    )
    (out / "results.md").write_text(text)
    return text
