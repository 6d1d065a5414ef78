"""A routing fingerprint: the experts each built-in router picks on fixed inputs, as a digest.

Paired studies must not compare runs made before and after a change to the routing code unless
the routings are identical.  This test is that check: a change that alters a router's choice of
experts (solvers, routers, their defaults) changes that router's digest and fails here; update
``EXPECTED`` only for a deliberate routing change, and say so where runs are paired.  Combine
weights (normalization, SoftTopk) are not part of the digest: they change what a model learns,
not which experts a given score matrix picks.

The digests were first taken as one digest over all routers (commit ce1a31f); each router's
digest here was computed on a commit where that combined digest still held.

Deliberate changes: ``flow_only``, ``maxscore`` and ``maxscore_paper`` changed when their causal
routing gained its correction (``causal_offset``); their batch routings, in training and in
evaluation, hashed without the causal step, were identical before and after.  They changed
again when the exact core began to route slack capacity through a node of its repair (instead
of lowering non-full experts to price 0): the routings pick the same expert sets (the optimum
is unchanged), but the core returns other optimal dual prices (the dual is not unique where
the capacity has slack), so the order of a token's experts (by ``s - p``) and the averaged
prices, hence the causal routing, differ.  Runs that compare causal figures across that change
are not paired.  The same held when the price steps began to set a price whose target is the
floor straight to 0 (and the repair to move several of the slack node's units at once): same
expert sets in every batch routing, other dual prices, other causal routing.  And again when
small problems (under 2^16 scores) warm-started began to take price steps down to 1/64 of the
units, as large ones: the batch routings pick the same expert sets as before; ``flow_only``,
``maxscore`` and ``maxscore_paper`` list a token's experts in another order (by ``s - p``, at
other optimal prices) and route causally otherwise.

Each digest has two parts, ``<batch>/<causal>``: the batch routings (training forwards and an
evaluation) and the causal routing after them, so that a change to causal routing alone shows
as one.  The split digests were taken on commit 5522d37, where the single digests above held.
Deliberate change since: the causal correction of ``flow_only``, ``maxscore`` and
``maxscore_paper`` moved from the sign rule to the quantile rule (``causal_update``): their
batch digests are unchanged, their causal digests moved (with ``causal_update="sign"`` they
are the earlier ones).  Then the exact core began cold solves from quantile prices (each
expert's cap-th score less a common threshold) instead of prices 0: ``base``, ``flow_only``,
``maxscore`` and ``maxscore_paper`` pick the same expert sets in every batch routing (checked
token by token against the core before), list them in another order (other optimal dual
prices), and so route causally otherwise; the sign rule's causal digest moved with them.
Then ``flow_only``, ``maxscore`` and ``maxscore_paper`` began to warm-start the solver from the
last batch's mean prices (buffer ``warm_prices``) instead of the running average: the same
expert sets in every batch routing (compared sorted, token by token, before and after), listed
in another order (other optimal dual prices), so other averaged prices and causal routings.
Then the exact core began to start a batch's groups after the first two from those two's mean
optimal prices when these fit the first two better than the shared warm start (``lead_start``
in ``_core.c``): the same expert sets in every batch routing (compared sorted, token by token,
here and on 86,016 tokens of 42 captured training calls at E = 96, k = 8, each core in its own
process), listed in another order, so other averaged prices and causal routings; the sign
rule's causal digest moved too.  Then small problems (under 2^16 scores) started cold began to
take the quantile start only where prices 0 leave more excess than a quarter of the units:
``base``, ``flow_only``, ``maxscore`` and ``maxscore_paper`` pick the same expert sets in every
batch routing (compared the same way), in another order, and route causally otherwise.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from maxscore.routers import ROUTERS, make_router

EXPECTED = {
    "base": "8e4e2a947ed8eedc/691185954e98e971",
    "deepseek_v3": "6371320482b04599/874192eed63814ce",
    "dropless": "6d8ff3b08713ea82/691185954e98e971",
    "expert_choice": "b586353e2a99b61e/-",
    "flow_only": "7c66dcdd2971b66c/a417845720870405",
    "gshard": "91f65b0f8b013251/691185954e98e971",
    "iterative": "3beee47c9d371f74/691185954e98e971",
    "maxscore": "26602161666cb803/a417845720870405",
    "maxscore_paper": "120ba319c9665e0d/a417845720870405",
    "quantile": "e34b54697560e926/c1e94d7f116fd095",
    "sbase": "6583445214cf471a/691185954e98e971",
    "softtopk_only": "54e8c8b35ac41f71/691185954e98e971",
    "switch": "425ba7139cd9e481/479dfd2f5fc42ae7",
}
NUM_EXPERTS, LENGTH, SEQUENCES, DIM = 8, 32, 4, 16


def routing_digest(name: str) -> str:
    """``"<batch>/<causal>"``: the digest of the batch routings (training forwards and an
    evaluation), then of the causal routing after them (``-`` for a router without one)."""
    batch, causal = hashlib.sha256(), hashlib.sha256()
    torch.manual_seed(0)
    k = 1 if name == "switch" else 2
    router = make_router(name, DIM, NUM_EXPERTS, k)
    generator = torch.Generator().manual_seed(1)
    valid = torch.rand(SEQUENCES * LENGTH, generator=generator) > 0.2
    for step in range(3):  # training forwards move the averaged prices and biases
        x = torch.randn(SEQUENCES * LENGTH, DIM, generator=generator) * (1 + step)
        out = router(x, valid, sequence_length=LENGTH)
        batch.update(name.encode() + out.experts.numpy().tobytes())
        router.after_optimizer_step()
    router.eval()
    x = torch.randn(SEQUENCES * LENGTH, DIM, generator=generator)
    batch.update(router(x, sequence_length=LENGTH).experts.numpy().tobytes())
    if not router.has_causal_mode:
        return batch.hexdigest()[:16] + "/-"
    causal.update(router(x, sequence_length=LENGTH, causal=True).experts.numpy().tobytes())
    return batch.hexdigest()[:16] + "/" + causal.hexdigest()[:16]


def test_every_router_has_a_fingerprint():
    assert sorted(EXPECTED) == sorted(ROUTERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_routings_are_unchanged(name):
    assert routing_digest(name) == EXPECTED[name]


@pytest.mark.parametrize("name", ["flow_only", "maxscore", "maxscore_paper"])
def test_the_sign_rule_still_routes_as_before_the_quantile_rule(name, monkeypatch):
    """``causal_update="sign"`` (configs saved before the quantile rule) routes as it did."""
    original = make_router
    monkeypatch.setitem(globals(), "make_router", lambda *a, **o: original(*a, causal_update="sign", **o))
    assert routing_digest(name).endswith("/17c8a291bad63313")
