"""A routing fingerprint: the experts every built-in router picks on fixed inputs, as a digest.

Paired studies must not compare runs made before and after a change to the routing code unless
the routings are identical.  This test is that check: a change that alters any router's choice
of experts (solvers, routers, their defaults) changes the digest and fails here; update
``EXPECTED`` only for a deliberate routing change, and say so where runs are paired.
"""

from __future__ import annotations

import hashlib

import torch

from maxscore.routers import ROUTERS, make_router

EXPECTED = "ac8d6bb716c3106ff43d649fc793851bcf1bdd31fba992e0dae746d6bdfbeb71"
NUM_EXPERTS, LENGTH, SEQUENCES, DIM = 8, 32, 4, 16


def routing_digest() -> str:
    digest = hashlib.sha256()
    for name in sorted(ROUTERS):
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
    return digest.hexdigest()


def test_routings_are_unchanged():
    assert routing_digest() == EXPECTED
