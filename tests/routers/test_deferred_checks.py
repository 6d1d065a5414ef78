"""Deferred checks (``validate="deferred"``): the device engine finishes every group on the device
and returns the bad input it found instead of raising; a router records it and
``check_routing`` raises it at the check point, with the eager check's message, the router's
module name and the group.  Run here on the CPU as on CUDA: the device engine's kernels in
Triton's interpreter, and the routers told to defer as they do on an accelerator."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch._dynamo as dynamo

import maxscore
from maxscore import MoELayer, check_routing, step_routers
from maxscore.routers.base import GatedRouter
from maxscore.solvers.exact import device
from tests.conftest import random_instance
from tests.solvers.helpers import needs_kernels

pytestmark = needs_kernels


@pytest.fixture
def on_device(monkeypatch):
    """The routers defer their checks and the exact solves take the device engine, as on CUDA."""
    monkeypatch.setattr(GatedRouter, "defers_checks", lambda self, _: self.config.validate == "deferred")
    device_engine = lambda engine, _: "host" if engine == "host" else "device"  # noqa: E731
    monkeypatch.setattr(maxscore.solvers, "pick_engine", device_engine)


def _groups(num_groups, num_tokens, num_experts, k):
    pairs = [random_instance(7 + g, num_tokens, num_experts, "peaked", keep=k) for g in range(num_groups)]
    return torch.stack([s for s, _ in pairs])


def test_deferred_solves_finish_every_group_on_the_device(monkeypatch):
    # a cold start with no price steps: far more units to move than the eager repair budget
    # (16 with REPAIR_PER_EXPERT = 0), which sends every group to the host core
    scores = _groups(4, 256, 16, 2)
    monkeypatch.setattr(device, "REPAIR_PER_EXPERT", 0)
    eager = maxscore.solve(scores, 2, engine="device", price_iterations=0)
    deferred = maxscore.solve(scores, 2, engine="device", price_iterations=0, validate="deferred")
    host = maxscore.solve(scores, 2, engine="host")
    assert eager.fallback.all() and eager.issues is None
    assert not deferred.fallback.any() and deferred.converged.all()
    assert torch.equal(deferred.issues, torch.zeros(4, 4, dtype=torch.int32))
    assert torch.allclose(deferred.score, host.score, rtol=1e-12)
    assert torch.equal(deferred.experts.sort(-1).values, host.experts.sort(-1).values)
    assert (deferred.loads <= deferred.capacity[:, None]).all()


def _set_nan(scores):
    scores[1, 4, 2] = math.nan


def _forbid(scores):
    scores[0, 2, :3] = -math.inf


@pytest.mark.parametrize(
    ("mutate", "kwargs", "issue", "match"),
    [
        (_set_nan, {}, (1, 0, 5), r"NaN or \+inf at tokens \(group, token\) \[\(1, 4\)"),
        (_forbid, {}, (0, 1, 3), r"\(group, token\) \[\(0, 2\)\] have fewer than k=2"),
        (None, dict(capacity=torch.tensor([6, 2, 6])), (1, 2, 1), "capacity=2 is infeasible in group 1"),
        (None, dict(prices=torch.tensor([0.0, math.nan, 0.0, 0.0])), (0, 3, 1), "prices must be finite"),
    ],
)
def test_deferred_bad_input_comes_back_flagged_and_raises_at_the_check(mutate, kwargs, issue, match):
    scores = torch.rand(3, 10, 4)
    if mutate is not None:
        mutate(scores)
    with pytest.raises(ValueError, match=match):
        maxscore.solve(scores, 2, engine="device", **kwargs)
    deferred = maxscore.solve(scores, 2, engine="device", validate="deferred", **kwargs)
    group, column, value = issue
    assert deferred.issues[group, column] == value
    assert deferred.issues.count_nonzero() == (3 if column == 3 else 1)  # bad prices: every group

    # the record a router keeps, and the message the check raises
    record = maxscore.routers.checks.new_record()
    capacity = kwargs.get("capacity", deferred.capacity)
    maxscore.routers.checks.record_solver(record, deferred.issues, capacity, None, 10)
    with pytest.raises(ValueError, match=match):
        raise ValueError(maxscore.routers.checks.message(record.tolist(), 2, 4))


def test_validate_is_checked():
    with pytest.raises(ValueError, match="validate must be one of"):
        maxscore.solve(torch.rand(10, 4), 2, validate="later")
    with pytest.raises(ValueError, match="validate must be 'deferred' or 'eager'"):
        maxscore.make_router("maxscore", 16, 8, 2, validate="never")


def _model(validate="deferred"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(MoELayer(16, 32, 8, 2, router="maxscore", validate=validate))
    return model


def test_a_router_records_non_finite_logits_and_the_step_raises_them(on_device):
    model = _model()
    x = torch.randn(4, 32, 16)
    model(x)
    step_routers(model)  # nothing recorded: no error
    x[2, 5, 3] = math.nan
    model(x)  # no error at the call
    expected = r"^0\.router: router logits contain NaN or inf \(group 2, token 5\): the layer input"
    with pytest.raises(ValueError, match=expected):
        step_routers(model)
    check_routing(model)  # the record was cleared when raised
    with pytest.raises(ValueError, match="router logits contain NaN or inf"):
        _model("eager")(x)  # the eager mode raises at the call


def test_a_router_records_an_infeasible_capacity(on_device):
    router = maxscore.make_router("maxscore", 16, 8, 2)
    logits = torch.randn(64, 8)
    router.route(logits, sequence_length=32, capacity=3)  # 8 x 3 < 2 x 32
    with pytest.raises(ValueError, match=r"^router: capacity=3 is infeasible in group 0"):
        check_routing(router)


def test_deferred_checks_trace_in_one_graph(on_device):
    model = _model()
    x = torch.randn(4, 32, 16)
    explained = dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    dynamo.reset()
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True)  # the same warm prices as eager
    eager = model(x)
    out = compiled(x)
    assert torch.equal(out.routing.experts, eager.routing.experts)
    torch.testing.assert_close(out.output, eager.output)
    x[1, 7, 0] = math.inf
    compiled(x)
    with pytest.raises(ValueError, match=r"router logits contain NaN or inf \(group 1, token 7\)"):
        check_routing(compiled)
    dynamo.reset()
