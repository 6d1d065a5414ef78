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
"""

from __future__ import annotations

import hashlib

import pytest
import torch

from maxscore.routers import ROUTERS, make_router

EXPECTED = {
    "base": "1249a25561d879e8",
    "deepseek_v3": "2c68e3f1dc43af2d",
    "dropless": "31508d8bf0eb2c1c",
    "expert_choice": "b586353e2a99b61e",
    "flow_only": "b0eb26afe2662a8e",
    "gshard": "6394e82d0862b89e",
    "iterative": "a43eba0cb6063c74",
    "maxscore": "1c21185de42d7f0a",
    "maxscore_paper": "be2044eb95c83867",
    "quantile": "b217b14a717888d6",
    "sbase": "96169ee078c012f2",
    "softtopk_only": "28eba94b78541b12",
    "switch": "a5a7188dbf57ef2e",
}
NUM_EXPERTS, LENGTH, SEQUENCES, DIM = 8, 32, 4, 16


def routing_digest(name: str) -> str:
    digest = hashlib.sha256()
    torch.manual_seed(0)
    k = 1 if name == "switch" else 2
    router = make_router(name, DIM, NUM_EXPERTS, k)
    generator = torch.Generator().manual_seed(1)
    valid = torch.rand(SEQUENCES * LENGTH, generator=generator) > 0.2
    for step in range(3):  # training forwards move the averaged prices and biases
        x = torch.randn(SEQUENCES * LENGTH, DIM, generator=generator) * (1 + step)
        out = router(x, valid, sequence_length=LENGTH)
        digest.update(name.encode() + out.experts.numpy().tobytes())
        router.after_optimizer_step()
    router.eval()
    x = torch.randn(SEQUENCES * LENGTH, DIM, generator=generator)
    for causal in (False, True) if router.has_causal_mode else (False,):
        digest.update(router(x, sequence_length=LENGTH, causal=causal).experts.numpy().tobytes())
    return digest.hexdigest()[:16]


def test_every_router_has_a_fingerprint():
    assert sorted(EXPECTED) == sorted(ROUTERS)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_routings_are_unchanged(name):
    assert routing_digest(name) == EXPECTED[name]
