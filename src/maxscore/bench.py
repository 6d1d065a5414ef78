"""Solver benchmark: speed and quality of every method against ``torch.topk`` in the same run.

Used by ``maxscore solve-bench`` and ``benchmarks/bench_solvers.py``.  Times are medians of
repeated calls of the public ``solve`` (validation included); ratios divide by the median time
of ``torch.topk`` on the same scores, measured in the same run.  Batched rows solve G routing
groups ([G, N, E] scores) in one call, against ``torch.topk`` over the same [G * N, E] scores
(and, as a baseline, one ``solve`` call per group).  The device column times the exact
method's device engine (``engine="device"``) on CUDA scores; ``benchmarks/bench_engine.py``
measures it in detail (and its launches on a CPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

import torch

from maxscore.solvers import Assignment, solve

SIZES = ((512, 16, 2), (4096, 64, 2), (4096, 64, 8), (16384, 128, 8))
QUICK_SIZES = ((512, 16, 2), (4096, 64, 2))
BATCHED_SIZES = ((64, 512, 16, 2),)  # (G, N, E, k): a layer's routing groups
# name -> (logit std, per-expert bias std): the bias makes the load imbalanced
DISTRIBUTIONS = {"std1": (1.0, 0.0), "std3": (3.0, 0.0), "std1+bias": (1.0, 1.0), "std3+bias": (3.0, 1.0)}
METHODS = ("exact", "two_stage", "sinkhorn", "iterative", "greedy", "topk")
PAPER_DESIGN = "paper_hungarian"  # two-stage with an O(T^3) Hungarian per 512-token group


@dataclass(frozen=True, slots=True)
class BenchRow:
    num_tokens: int
    num_experts: int
    k: int
    distribution: str
    method: str
    ms: float
    ratio_to_topk: float
    gap_vs_exact: float  # (exact score - score) / exact score; 0 = optimal
    dropped_fraction: float
    max_load_ratio: float
    certificate_gap: float | None
    groups: int = 1
    device_ratio: float | None = None  # exact only: the device engine, x topk


def make_scores(
    num_tokens: int, num_experts: int, distribution: str, seed: int = 0, groups: int | None = None
) -> torch.Tensor:
    """Softmax of Gaussian logits (std from ``DISTRIBUTIONS``) plus a per-expert bias shared by
    all tokens; [N, E], or [G, N, E] with ``groups``."""
    std, bias = DISTRIBUTIONS[distribution]
    generator = torch.Generator().manual_seed(seed)
    shape = (num_tokens, num_experts) if groups is None else (groups, num_tokens, num_experts)
    logits = torch.randn(shape, generator=generator) * std
    logits += torch.randn(num_experts, generator=generator) * bias
    return logits.softmax(-1)


def median_ms(fn: Callable[[], object], budget_s: float = 1.0, max_reps: int = 50) -> float:
    """Median wall time of ``fn`` over up to ``max_reps`` calls within about ``budget_s``
    (CUDA work is waited for)."""

    def timed() -> float:
        begin = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    timed()  # warm-up
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < 3 or time.perf_counter() - start < budget_s):
        times.append(timed())
    return statistics.median(times) * 1e3


def paper_design(scores: torch.Tensor, k: int, group: int = 512) -> Assignment:
    """The authors' CPU design (top-2 only): top-1 under capacity, then per group of ``group``
    tokens an O(group^3) Hungarian matching (``scipy.optimize.linear_sum_assignment``) of the
    tokens' second units to the group's residual expert slots, own first expert excluded."""
    from scipy.optimize import linear_sum_assignment

    if k != 2:
        raise ValueError(f"the paper's design covers k=2 only, got k={k}")
    num_tokens, num_experts = scores.shape
    experts = torch.full((num_tokens, 2), -1, dtype=torch.int64)
    for start in range(0, num_tokens, group):
        chunk = scores[start : start + group]
        first = solve(chunk, 1, capacity_factor=2.0, method="exact")  # capacity 2T/E as for k=2
        residual = first.capacity - first.loads
        slot_expert = torch.repeat_interleave(torch.arange(num_experts), residual)
        cost = -chunk.double()[:, slot_expert]
        cost[first.experts[:, 0][:, None] == slot_expert[None, :]] = 1e9
        rows, cols = linear_sum_assignment(cost.numpy())
        experts[start + rows, 0] = first.experts[rows, 0]
        experts[start + rows, 1] = slot_expert[cols]
    loads = torch.bincount(experts.flatten(), minlength=num_experts)
    score = float(scores.double().gather(1, experts).sum())
    capacity = math.ceil(2 * min(group, num_tokens) / num_experts)
    return Assignment(experts=experts, loads=loads, score=score, capacity=capacity, method=PAPER_DESIGN)


def bench_solvers(
    sizes: Iterable[tuple[int, int, int]] = SIZES,
    distributions: Iterable[str] = tuple(DISTRIBUTIONS),
    methods: Iterable[str] = METHODS,
    *,
    paper: bool = True,
    budget_s: float = 1.0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """Runs every method on every (size, distribution); capacity_factor 1.0.

    ``paper`` adds the paper's Hungarian design at k = 2, T <= 512 when scipy is installed
    (on the CPU only).
    """
    if paper:
        try:
            import scipy.optimize  # noqa: F401
        except ImportError:
            paper = False
            if progress:
                progress("scipy is not installed: skipping the paper's Hungarian design")
    rows: list[BenchRow] = []
    for num_tokens, num_experts, k in sizes:
        for distribution in distributions:
            scores = make_scores(num_tokens, num_experts, distribution).to(device)
            case = dict(num_tokens=num_tokens, num_experts=num_experts, k=k, distribution=distribution)
            topk_ms = median_ms(lambda s=scores, k=k: torch.topk(s, k, dim=1), budget_s)
            optimum = solve(scores, k).score
            runs: list[tuple[str, Callable[[], Assignment]]] = [
                (m, lambda m=m, s=scores, k=k: solve(s, k, method=m)) for m in methods
            ]
            if paper and k == 2 and num_tokens <= 512 and device == "cpu":
                runs.append((PAPER_DESIGN, lambda s=scores: paper_design(s, 2)))
            for method, run in runs:
                if progress:
                    progress(f"{num_tokens}x{num_experts} k={k} {distribution} {method}")
                result = run()
                row = _timed_row(case, method, run, scores, topk_ms, budget_s)
                rows.append(
                    dataclasses.replace(
                        row,
                        gap_vs_exact=(optimum - result.score) / abs(optimum),
                        dropped_fraction=result.dropped_fraction,
                        max_load_ratio=float(result.loads.max()) / result.capacity,
                        certificate_gap=result.gap,
                    )
                )
            rows.append(_topk_row(case, topk_ms))
    return rows


def _topk_row(case: dict, topk_ms: float, groups: int = 1) -> BenchRow:
    """The baseline row: ``torch.topk`` on the same scores."""
    return BenchRow(
        **case,
        method="torch.topk",
        ms=topk_ms,
        ratio_to_topk=1.0,
        gap_vs_exact=math.nan,
        dropped_fraction=0.0,
        max_load_ratio=math.nan,
        certificate_gap=None,
        groups=groups,
    )


def _timed_row(
    case: dict,
    method: str,
    run: Callable[[], object],
    scores: torch.Tensor,
    topk_ms: float,
    budget_s: float,
    groups: int = 1,
) -> BenchRow:
    """``method``'s median time in ms and in units of ``torch.topk``'s (for ``exact`` also its
    device engine's), with the loads of a routing that fills every expert (callers replace the
    quality columns they measure)."""
    ms = median_ms(run, budget_s)
    device_ratio = None
    if method == "exact" and scores.is_cuda:  # on a CPU: benchmarks/bench_engine.py
        device_ratio = median_ms(lambda: solve(scores, case["k"], engine="device"), budget_s) / topk_ms
    return BenchRow(
        **case,
        method=method,
        ms=ms,
        ratio_to_topk=ms / topk_ms,
        gap_vs_exact=math.nan,
        dropped_fraction=0.0,
        max_load_ratio=1.0,
        certificate_gap=None,
        groups=groups,
        device_ratio=device_ratio,
    )


def bench_batched(
    sizes: Iterable[tuple[int, int, int, int]] = BATCHED_SIZES,
    distributions: Iterable[str] = ("std1", "std1+bias"),
    *,
    budget_s: float = 1.0,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> list[BenchRow]:
    """G routing groups per call, cold start: batched ``exact``, its device engine, and one
    ``solve`` per group, against ``torch.topk`` over the same [G * N, E] scores."""
    rows: list[BenchRow] = []
    for groups, num_tokens, num_experts, k in sizes:
        for distribution in distributions:
            scores = make_scores(num_tokens, num_experts, distribution, groups=groups).to(device)
            case = dict(num_tokens=num_tokens, num_experts=num_experts, k=k, distribution=distribution)
            flat = scores.reshape(-1, num_experts)
            topk_ms = median_ms(lambda f=flat, k=k: torch.topk(f, k, dim=1), budget_s)
            runs = {
                "exact": lambda s=scores, k=k: solve(s, k),
                "exact, one call per group": lambda s=scores, k=k: [solve(g, k) for g in s],
            }
            optimum = solve(scores, k, engine="host").score.sum().item()
            for method, run in runs.items():
                if progress:
                    progress(f"{groups}x{num_tokens}x{num_experts} k={k} {distribution} {method}")
                result = run()
                score = result.score.sum().item() if method == "exact" else sum(a.score for a in result)
                row = _timed_row(case, method, run, scores, topk_ms, budget_s, groups)
                rows.append(dataclasses.replace(row, gap_vs_exact=(optimum - score) / abs(optimum)))
            rows.append(_topk_row(case, topk_ms, groups))
    return rows


# operations that only make views or allocate: no work is launched for them
METADATA_OPS = frozenset(
    "aten::" + name
    for name in (
        "view alias as_strided expand expand_as slice select unsqueeze squeeze reshape _reshape_alias "
        "t transpose permute detach detach_ lift_fresh flatten unflatten narrow split unbind empty "
        "empty_strided empty_like resize_ result_type contiguous numpy from_numpy _unsafe_view "
        "resolve_conj resolve_neg"
    ).split()
)
KERNEL_RANGE = "maxscore::"  # the device engine's kernel launches (record_function ranges)
HOST_RANGE = "host::"  # the device engine's host work (its repair without Triton, fallbacks)


def count_launches(fn: Callable[[], object]) -> tuple[int, int]:
    """(launches, device-to-host copies) of one call of ``fn``.

    On CUDA: the kernels the profiler saw, and its device-to-host memcpys.  On a CPU (a proxy):
    the profiler's leaf operations, views and allocations excluded (``METADATA_OPS``), each
    Triton launch counted once (its ``maxscore::*_kernel`` range; the interpreter's own work
    inside it is not counted), the engine's host work (its ``host::`` range) left out, and -1
    for the copies (a CPU cannot tell them apart).
    """
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        fn()
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    if cuda:
        device_events = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        copies = sum("Memcpy DtoH" in e.name for e in device_events)
        kernels = sum(
            not e.name.startswith("Memcpy") and not e.name.startswith("Memset") for e in device_events
        )
        return kernels, copies

    def inside_range(event) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith((KERNEL_RANGE, HOST_RANGE)):
                return True
            parent = parent.cpu_parent
        return False

    def launches(event) -> bool:
        if event.name.startswith(KERNEL_RANGE):
            return True
        if not event.name.startswith("aten::") or event.name in METADATA_OPS or event.cpu_children:
            return False
        return event.name != "aten::to"  # a leaf "to" converted nothing (a real one calls _to_copy)

    return sum(launches(event) and not inside_range(event) for event in events), -1


def format_table(rows: Iterable[BenchRow]) -> str:
    """A markdown table of benchmark rows."""
    lines = [
        "| G | T | E | k | scores | method | ms | x topk | device engine x topk | gap vs exact | dropped "
        "| max load/cap | certificate |",
        "|---:|---:|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        gap = "-" if math.isnan(r.gap_vs_exact) else f"{r.gap_vs_exact:.2e}"
        load = "-" if math.isnan(r.max_load_ratio) else f"{r.max_load_ratio:.2f}"
        cert = "-" if r.certificate_gap is None else f"{r.certificate_gap:.1e}"
        dev = "-" if r.device_ratio is None else f"{r.device_ratio:.1f}"
        lines.append(
            f"| {r.groups} | {r.num_tokens} | {r.num_experts} | {r.k} | {r.distribution} | {r.method} | "
            f"{r.ms:.3f} | {r.ratio_to_topk:.1f} | {dev} | {gap} | {r.dropped_fraction:.2%} | {load} "
            f"| {cert} |"
        )
    return "\n".join(lines)


def rows_as_dicts(rows: Iterable[BenchRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def environment(concurrent: str = "nothing") -> str:
    """Markdown lines with the hardware, versions, commit and command of a benchmark run, and
    what else ran on the machine meanwhile (``concurrent``)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "unknown"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"- hardware: {cpu}, {torch.get_num_threads()} torch threads\n"
        f"- python {platform.python_version()}, torch {torch.__version__}\n"
        f"- commit {commit}\n"
        f"- command: `python {' '.join(sys.argv)}`\n"
        f"- also running: {concurrent}\n"
    )


def write_report(
    title: str, table: str, results: object, out: str | None, md: str | None, concurrent: str = "nothing"
) -> None:
    """Prints ``table``; writes ``results`` as JSON to ``out`` and a dated markdown report (title,
    environment, table) to ``md`` when given."""
    print(table)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    if md:
        with open(md, "w") as f:
            f.write(f"# {title}\n\n{environment(concurrent)}\n{table}\n")
