"""Independent checks of an Assignment (written against the problem, not the solver code)."""

from __future__ import annotations

import math

import pytest
import torch

from maxscore import Assignment


def check_feasible(
    assignment: Assignment, scores: torch.Tensor, k: int, valid, capacity: int, *, drops: bool
):
    """Distinct experts per row, allowed pairs only, loads recount, capacity, padding unused."""
    experts = assignment.experts
    num_tokens, num_experts = scores.shape
    assert experts.shape == (num_tokens, k) and experts.dtype == torch.int64
    valid_T = torch.ones(num_tokens, dtype=torch.bool) if valid is None else valid
    assert (experts[~valid_T] == -1).all(), "padding tokens must get no expert"
    assigned = experts >= 0
    if not drops:
        assert assigned[valid_T].all(), "a slot was dropped"
    rows = experts.clone()
    rows[~assigned] = num_experts + torch.arange(k).expand(num_tokens, k)[~assigned]  # unique fillers
    assert (rows.sort(1).values.diff(dim=1) != 0).all(), "a token got the same expert twice"
    picked = scores.double().gather(1, experts.clamp(min=0))
    assert torch.isfinite(picked[assigned]).all(), "a forbidden pair was assigned"
    loads = torch.bincount(experts[assigned], minlength=num_experts)
    assert torch.equal(loads, assignment.loads), "loads do not recount"
    assert (loads <= capacity).all(), "an expert is over capacity"
    assert math.isclose(assignment.score, float(picked[assigned].sum()), rel_tol=1e-9, abs_tol=1e-9)


def kernels_run_here() -> bool:
    """The device engine's Triton kernels run in this process (CUDA, or the interpreter that
    conftest turns on where there is no GPU)."""
    from maxscore.solvers.exact.device import kernels_available

    return kernels_available(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


needs_kernels = pytest.mark.skipif(not kernels_run_here(), reason="needs Triton (pip install '.[triton]')")
