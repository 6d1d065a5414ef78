"""Paired-seed comparisons: per-seed differences to a baseline and their Student-t interval.

Within a seed every configuration starts from the same weights and sees the same batches, so
the difference ``loss(config, seed) - loss(baseline, seed)`` removes the seed's own luck; the
interval is ``mean +- t_(1 - a/2, n - 1) * sd / sqrt(n)`` over the n seeds both ran.
"""

from __future__ import annotations

import math
import statistics


def _incomplete_beta(x: float, a: float, b: float, x_complement: float | None = None) -> float:
    """The regularized incomplete beta function I_x(a, b) (continued fraction, modified Lentz).

    ``x_complement`` is ``1 - x`` computed by the caller without cancellation (near x = 1).
    """
    xc = 1.0 - x if x_complement is None else x_complement
    if x <= 0.0:
        return 0.0
    if xc <= 0.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(xc, b, a, x)
    log_front = a * math.log(x) + b * math.log(xc) - math.log(a) - _log_beta(a, b)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5, t * t / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The t with ``t_cdf(t, df) = p`` (bisection to 1e-12), for 0 < p < 1 and df >= 1."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = -1.0, 1.0
    while t_cdf(low, df) > p:
        low *= 2
    while t_cdf(high, df) < p:
        high *= 2
    while high - low > 1e-12 * max(1.0, abs(high)):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


def paired_interval(differences: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high) of the Student-t interval of paired differences (n - 1 dof).

    With one difference the interval is unbounded (``-inf, inf``): one seed says nothing about
    the spread.
    """
    n = len(differences)
    if n == 0:
        raise ValueError("paired_interval needs at least one difference")
    mean = statistics.fmean(differences)
    if n == 1:
        return mean, -math.inf, math.inf
    half = t_quantile(0.5 + confidence / 2, n - 1) * statistics.stdev(differences) / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_rows(groups: dict[str, list[dict]], baseline: str, confidence: float = 0.95) -> list[dict]:
    """Per configuration: seeds, mean validation and test loss, and the paired differences to
    ``baseline`` (validation and test) with their interval ends."""
    reference = {run["seed"]: run for run in groups[baseline]}
    rows = []
    for label, runs in groups.items():
        row: dict = {
            "label": label,
            "seeds": sorted(run["seed"] for run in runs),
            "val_loss": statistics.fmean(run["validation_batch"]["loss"] for run in runs),
            "test_loss": statistics.fmean(run["test_batch"]["loss"] for run in runs),
        }
        paired = [run for run in runs if run["seed"] in reference]
        for split, key in (("val", "validation_batch"), ("test", "test_batch")):
            diffs = [run[key]["loss"] - reference[run["seed"]][key]["loss"] for run in paired]
            row[f"{split}_differences"] = diffs
            if label != baseline and diffs:
                mean, low, high = paired_interval(diffs, confidence)
                row.update({f"{split}_diff": mean, f"{split}_diff_low": low, f"{split}_diff_high": high})
        rows.append(row)
    return sorted(rows, key=lambda r: r["val_loss"])


def paired_table(rows: list[dict], baseline: str, confidence: float = 0.95) -> str:
    """Markdown: configurations by mean validation loss, with paired differences to the baseline."""
    level = f"{confidence:.0%}"
    lines = [
        f"Paired differences to `{baseline}` (same seed: same initial weights and batches); "
        f"{level} Student-t interval over the seeds, n - 1 degrees of freedom.  Selection reads "
        "the validation columns; the test columns are for reporting.\n",
        f"| configuration | seeds | val loss | Δ val vs baseline [{level}] | test loss "
        f"| Δ test vs baseline [{level}] |",
        "|---|---:|---:|---|---:|---|",
    ]

    def interval(row: dict, split: str) -> str:
        if f"{split}_diff" not in row:
            return "—"
        mean, low, high = row[f"{split}_diff"], row[f"{split}_diff_low"], row[f"{split}_diff_high"]
        if not math.isfinite(low):
            return f"{mean:+.4f} (one seed: no interval)"
        return f"{mean:+.4f} [{low:+.4f}, {high:+.4f}]"

    for row in rows:
        lines.append(
            f"| {row['label']} | {len(row['seeds'])} | {row['val_loss']:.4f} | {interval(row, 'val')} "
            f"| {row['test_loss']:.4f} | {interval(row, 'test')} |"
        )
    return "\n".join(lines)
