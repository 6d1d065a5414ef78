"""The device engine of ``exact`` (run here on the CPU, as on CUDA: its Triton kernels in the
interpreter, and its plain torch twin) against the host core and the LP."""

from __future__ import annotations

import math

import pytest
import torch

import maxscore
from maxscore.bench import count_launches
from maxscore.solvers.exact import device
from tests.conftest import random_instance
from tests.solvers.helpers import kernels_run_here, needs_kernels


@pytest.fixture(params=["kernels", "torch"])
def backend(request, monkeypatch):
    """Runs a test on each implementation of the device engine's dense work."""
    if request.param == "kernels" and not kernels_run_here():
        pytest.skip("needs Triton (pip install '.[triton]')")
    if request.param == "torch":
        monkeypatch.setattr(device, "kernels_available", lambda _device: False)
    return request.param


CASES = [  # (kind, G, N, E, k, capacity_factor)
    ("peaked", 6, 256, 16, 2, 1.0),
    ("flat", 4, 512, 16, 2, 1.0),
    ("padding", 5, 128, 8, 2, 1.0),
    ("forbidden", 4, 96, 8, 2, 1.0),
    ("peaked", 3, 200, 12, 3, 1.5),
    ("peaked", 2, 64, 4, 4, 1.0),  # k = E
    ("peaked", 3, 32, 1, 1, 1.0),  # E = 1
    ("peaked", 2, 1024, 64, 8, 1.0),
    ("ties", 3, 96, 6, 2, 1.0),
]


def _groups(kind, num_groups, num_tokens, num_experts, k):
    pairs = [random_instance(7 + g, num_tokens, num_experts, kind, keep=k) for g in range(num_groups)]
    scores = torch.stack([s for s, _ in pairs])
    valid = None if pairs[0][1] is None else torch.stack([v for _, v in pairs])
    return scores, valid


def _same_experts(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.sort(-1).values, b.sort(-1).values)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_device_engine_equals_host_exact(case, backend):
    kind, num_groups, num_tokens, num_experts, k, capacity_factor = case
    scores, valid = _groups(kind, num_groups, num_tokens, num_experts, k)
    host = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid, engine="host")
    dev = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid, engine="device")
    assert dev.converged.all(), "every group certified"
    assert torch.equal(dev.capacity, host.capacity)
    assert torch.allclose(dev.score, host.score, rtol=1e-9, atol=1e-12)
    assert (dev.gap.abs() <= 1e-9 * dev.score.abs().clamp(min=1)).all()
    assert (dev.loads <= dev.capacity[:, None]).all()
    if kind != "ties":
        assert _same_experts(dev.experts, host.experts)  # continuous scores: no ties
    if valid is not None:
        assert (dev.experts[~valid] == -1).all()


def test_device_engine_with_ties_matches_the_lp(backend):
    scores, _ = _groups("ties", 3, 48, 6, 2)
    dev = maxscore.solve(scores, 2, engine="device")
    assert dev.converged.all()
    for g in range(3):
        reference = maxscore.solve(scores[g], 2, method="reference")
        assert math.isclose(float(dev.score[g]), reference.score, rel_tol=1e-9)
        held = dev.mask()[g]
        assert (held.sum(1) == 2).all() and (held.sum(0) <= int(dev.capacity[g])).all()


def test_single_problem_on_the_device_engine_keeps_the_plain_result(backend):
    scores, valid = random_instance(3, 300, 16, "padding")
    dev = maxscore.solve(scores, 2, valid=valid, engine="device")
    host = maxscore.solve(scores, 2, valid=valid)
    assert isinstance(dev.score, float) and isinstance(dev.gap, float) and isinstance(dev.capacity, int)
    assert dev.experts.shape == (300, 2) and dev.converged is True
    assert math.isclose(dev.score, host.score, rel_tol=1e-9)
    assert _same_experts(dev.experts, host.experts)


@pytest.mark.parametrize("engine", ["host", "device"])
def test_empty_groups_and_groups_of_padding_only(engine):
    empty = maxscore.solve(torch.rand(2, 0, 4), 1, engine=engine)
    assert empty.experts.shape == (2, 0, 1) and empty.loads.sum() == 0
    scores = torch.rand(3, 20, 5).softmax(-1)
    valid = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) > 0.3
    valid[1] = False  # a group of padding only: capacity 0, no expert for anyone
    result = maxscore.solve(scores, 2, valid=valid, engine=engine)
    assert result.capacity[1] == 0 and (result.experts[1] == -1).all() and result.loads[1].sum() == 0
    assert result.converged.all() and (result.loads <= result.capacity[:, None]).all()


@pytest.mark.parametrize("engine", ["host", "device"])
def test_forbidden_pairs_that_leave_no_room_name_their_group(engine):
    scores = torch.rand(2, 4, 3)
    scores[1, :, 2] = -math.inf  # group 1: 4 tokens x 2 units on 2 experts of capacity 3
    with pytest.raises(ValueError, match=r"make the problem of group 1 infeasible"):
        maxscore.solve(scores, 2, capacity=3, engine=engine)


def test_warm_start_needs_no_repair_moves_and_stays_exact(backend):
    scores, _ = _groups("peaked", 4, 512, 16, 2)
    cold = maxscore.solve(scores, 2, engine="device")
    warm = maxscore.solve(scores, 2, engine="device", prices=cold.prices, price_iterations=0)
    assert warm.converged.all() and not warm.fallback.any()
    assert torch.allclose(warm.score, cold.score, rtol=1e-12)
    # the optimal prices left every fixed token where it was: the repair moved only candidates
    host = maxscore.solve(scores, 2, engine="host")
    assert torch.allclose(warm.score, host.score, rtol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_high_precision_scores(dtype, backend):
    scores, valid = _groups("padding", 3, 256, 16, 2)
    scores = scores.to(dtype)  # bfloat16: many exact ties after rounding
    host = maxscore.solve(scores, 2, valid=valid, engine="host")
    dev = maxscore.solve(scores, 2, valid=valid, engine="device")
    assert dev.converged.all()
    assert torch.allclose(dev.score, host.score, rtol=1e-9, atol=1e-12)
    assert (dev.loads <= dev.capacity[:, None]).all() and (dev.experts[~valid] == -1).all()


def test_groups_span_several_tiles(backend, monkeypatch):
    """Groups of more tokens than one tile holds (the kernel loops over tiles in every pass)."""
    from maxscore.solvers.exact import dense

    monkeypatch.setattr(dense, "INTERPRETER_TILE", 1024)  # 64 rows of 16 experts: 5 tiles
    scores, _ = _groups("peaked", 2, 300, 16, 2)
    host = maxscore.solve(scores, 2, engine="host")
    cold = maxscore.solve(scores, 2, engine="device")
    warm = maxscore.solve(scores, 2, engine="device", prices=host.prices)
    for dev in (cold, warm):
        assert dev.converged.all()
        assert torch.allclose(dev.score, host.score, rtol=1e-9)
        assert _same_experts(dev.experts, host.experts)


def test_fallback_groups_are_flagged_and_solved_on_the_host(monkeypatch, backend):
    # no price steps from a cold, biased start: far more excess than a repair budget of 16
    scores, _ = _groups("peaked", 4, 256, 16, 2)
    monkeypatch.setattr(device, "REPAIR_PER_EXPERT", 0)
    dev = maxscore.solve(scores, 2, engine="device", price_iterations=0)
    host = maxscore.solve(scores, 2, engine="host")
    assert dev.fallback.all()
    assert dev.converged.all()
    assert torch.allclose(dev.score, host.score, rtol=1e-12)
    assert _same_experts(dev.experts, host.experts)


def test_router_counts_no_fallbacks_and_reports_them():
    router = maxscore.routers.make_router("maxscore", dim=16, num_experts=8, k=2)
    out = router(torch.randn(4 * 32, 16), sequence_length=32)
    assert out.stats.as_dict()["solver_fallbacks"] == 0
    assert out.stats.solver_gap is not None and abs(float(out.stats.solver_gap)) < 1e-9


@pytest.mark.parametrize(
    ("mutate", "kwargs", "match"),
    [
        (
            lambda s: s.__setitem__((1, 4, 2), math.nan),
            {},
            r"NaN or \+inf at tokens \(group, token\) \[\(1, 4\)",
        ),
        (lambda s: s[0, 2, :3].fill_(-math.inf), {}, r"\(group, token\) \[\(0, 2\)\] have fewer than k=2"),
        (lambda s: None, dict(capacity=torch.tensor([6, 2, 6])), "capacity=2 is infeasible in group 1"),
        (lambda s: None, dict(prices=torch.zeros(5)), r"prices must be a float tensor of shape \[E\] or \[G"),
        (lambda s: None, dict(valid=torch.ones(3, 5, dtype=torch.bool)), r"valid must have shape \[G, N\]"),
        (lambda s: None, dict(engine="gpu"), "engine must be one of"),
        (lambda s: None, dict(prices=torch.tensor([0.0, math.nan, 0.0, 0.0])), "prices must be finite"),
    ],
)
@pytest.mark.parametrize("engine", ["host", "device"])
def test_bad_input_on_every_engine(mutate, kwargs, match, engine, backend):
    if engine == "host" and backend == "torch":
        pytest.skip("the host engine has one implementation")
    scores = torch.rand(3, 10, 4)
    mutate(scores)
    with pytest.raises(ValueError, match=match):
        maxscore.solve(scores, 2, **{"engine": engine, **kwargs})


@needs_kernels
def test_a_warm_call_launches_a_few_kernels():
    """The fused path: the kernels' launches and the few torch operations around them (the
    issue's budget is 30 per warm call), whatever the number of groups."""
    for num_groups in (2, 8):
        scores, valid = _groups("padding", num_groups, 64, 8, 2)
        cold = maxscore.solve(scores, 2, valid=valid, engine="device")
        launches, _ = count_launches(lambda s=scores, v=valid, p=cold.prices: maxscore.solve(
            s, 2, valid=v, engine="device", prices=p
        ))  # fmt: skip
        assert launches <= 10, launches


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_take_the_device_engine():
    scores, valid = _groups("padding", 8, 512, 16, 2)
    dev = maxscore.solve(scores.cuda(), 2, valid=valid.cuda())
    host = maxscore.solve(scores, 2, valid=valid)
    assert dev.experts.is_cuda and dev.converged.all()
    assert torch.allclose(dev.score.cpu(), host.score, rtol=1e-9)
    assert _same_experts(dev.experts.cpu(), host.experts)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_kernels
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_kernels_on_cuda_equal_the_host_engine(case, dtype):
    kind, num_groups, num_tokens, num_experts, k, capacity_factor = case
    scores, valid = _groups(kind, num_groups, num_tokens, num_experts, k)
    scores = scores.to(dtype)
    host = maxscore.solve(scores, k, capacity_factor=capacity_factor, valid=valid, engine="host")
    on_cuda = dict(capacity_factor=capacity_factor, valid=None if valid is None else valid.cuda())
    cold = maxscore.solve(scores.cuda(), k, **on_cuda)
    warm = maxscore.solve(scores.cuda(), k, prices=host.prices.cuda(), **on_cuda)
    for dev in (cold, warm):
        assert dev.experts.is_cuda and dev.converged.all()
        assert torch.allclose(dev.score.cpu(), host.score, rtol=1e-9, atol=1e-12)
        assert (dev.loads <= dev.capacity[:, None]).all()
    assert not warm.fallback.any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@needs_kernels
def test_a_warm_call_on_cuda_launches_few_kernels_and_one_copy_to_the_host():
    for shape in ((64, 512, 16, 2), (16, 4096, 64, 8)):
        num_groups, num_tokens, num_experts, k = shape
        scores, _ = _groups("peaked", num_groups, num_tokens, num_experts, k)
        scores = scores.cuda()
        cold = maxscore.solve(scores, k)
        launches, copies = count_launches(lambda s=scores, p=cold.prices, k=k: maxscore.solve(s, k, prices=p))
        assert launches <= 30 and copies == 1, (shape, launches, copies)


@needs_kernels
def test_a_kernel_that_fails_to_compile_sends_auto_to_the_host_engine(monkeypatch):
    from maxscore.solvers.exact import dense, kernels

    class Broken:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("out of resources")

            return launch

    monkeypatch.setattr(kernels, "route_kernel", Broken())
    monkeypatch.setattr(dense, "_FAILED", set())
    # as on a GPU: auto would pick the device engine for these scores
    monkeypatch.setattr(
        maxscore.solvers, "pick_engine", lambda engine, s: "host" if engine == "host" else "device"
    )
    scores, _ = _groups("peaked", 3, 64, 8, 2)
    with pytest.raises(dense.KernelError, match="route_kernel failed to compile or launch: out of resources"):
        maxscore.solve(scores, 2, engine="device")
    with pytest.warns(RuntimeWarning, match="falls back to the host engine"):
        routed = maxscore.solve(scores, 2)
    host = maxscore.solve(scores, 2, engine="host")
    assert torch.equal(routed.experts, host.experts) and not dense.kernels_available(scores.device)


@needs_kernels
def test_a_warm_start_at_the_optimum_certifies_float32_groups_without_the_host():
    """Peaked float32 scores with many near-zero margins at the optimal prices: the float64
    margins of the final routing certify every group (the float32 margin test handed half of
    them back to the host)."""
    scores, _ = _groups("peaked", 2, 1024, 64, 8)
    scores = scores.float()
    host = maxscore.solve(scores, 8, engine="host")
    warm = maxscore.solve(scores, 8, engine="device", prices=host.prices)
    assert not warm.fallback.any() and warm.converged.all()
    assert torch.allclose(warm.score, host.score, rtol=1e-9, atol=1e-12)


@needs_kernels
@pytest.mark.parametrize("kind", ["padding", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_warm_start_at_the_host_optimum_stays_on_the_device(kind, dtype):
    """At the host's optimal prices the kernel's routing breaks ties its own way, which can leave
    an expert with a price above 0 just below capacity: the repair mends that before any price
    is lowered (lowering first rerouted a whole group: 56 augmentations, a fallback)."""
    scores, valid = _groups(kind, 5, 128, 8, 2)
    scores = scores.to(dtype)
    host = maxscore.solve(scores, 2, valid=valid, engine="host")
    warm = maxscore.solve(scores, 2, valid=valid, engine="device", prices=host.prices)
    assert not warm.fallback.any() and warm.converged.all()
    assert torch.allclose(warm.score, host.score, rtol=1e-9, atol=1e-12)


def test_groups_whose_fixed_tokens_are_all_padding_certify_on_the_device(backend):
    """Two valid tokens among 16, both preferring expert 0: the repair moves one (its prices
    change) and the fixed tokens, all padding, have infinite margins: certified, no fallback."""
    scores = torch.full((2, 16, 4), 0.1)
    scores[:, :, 0] = 0.6
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :2] = True
    dev = maxscore.solve(scores, 1, valid=valid, engine="device")
    host = maxscore.solve(scores, 1, valid=valid, engine="host")
    assert not dev.fallback.any() and dev.converged.all()
    assert torch.allclose(dev.score, host.score, rtol=1e-9)


@needs_kernels
def test_the_fused_kernel_repairs_on_the_device_without_the_host_core(monkeypatch):
    """Group 0's tokens each prefer a different expert, so the routing at zero prices is optimal;
    group 1 puts a few more tokens on expert 0 than it holds, so its repair moves them.  Neither
    calls the host core, and both equal the host engine's optimum."""
    from maxscore.solvers.exact import dense

    generator = torch.Generator().manual_seed(3)
    scores = torch.rand(2, 64, 8, generator=generator)
    scores[0, torch.arange(64), torch.arange(64) % 8] += 2.0
    scores[0, torch.arange(64), (torch.arange(64) + 1) % 8] += 1.0
    scores[1, :20, 0] += 2.0  # 20 tokens want expert 0 (capacity 16): 4 augmentations or more
    calls = []

    def spy(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the host core ran")

    monkeypatch.setattr(device, "run_core_batch", spy)
    monkeypatch.setattr(dense, "run_core_batch", spy)
    dev = maxscore.solve(scores, 2, engine="device", price_iterations=0)
    assert calls == [] and dev.converged.all() and not dev.fallback.any()
    monkeypatch.undo()
    host = maxscore.solve(scores, 2, engine="host")
    assert torch.allclose(dev.score, host.score, rtol=1e-12)
    assert _same_experts(dev.experts, host.experts)
    assert torch.equal(dev.prices[0], torch.zeros(8, dtype=dev.prices.dtype))
    assert (dev.prices[1] >= 0).all() and dev.prices[1, 0] > 0  # expert 0's price rose
