"""The exact method: optimal capacity-constrained top-k routing (the min-cost max-flow of
PAPER.md §2), certified by its dual prices, with three engines.

Problem: maximize ``sum scores[t, e] * x[t, e]`` subject to ``sum_e x[t, e] = k`` for every
valid token, ``sum_t x[t, e] <= capacity`` and ``x in {0, 1}`` (``-inf`` forbids a pair).

=============  ==============================================================================
module         what it holds
=============  ==============================================================================
``prices``     the damped best-response price step (constants, a reference in plain torch)
               and the certificate: one definition for every engine
``host``       the host engine: the compiled core (``_core.c`` through ``_native``)
``device``     the device engine: one fused Triton kernel (``kernels``, with
               ``kernel_steps`` and ``kernel_repair``) that solves every group on the device,
               or the same steps in plain torch with the core's repair; one transfer of flags
``global_*``   the collective engine: one routing over the tokens of every rank
=============  ==============================================================================

``solve(..., engine=...)`` picks the engine with ``device.pick_engine``.  The package itself
imports nothing: its modules import each other and ``maxscore.solvers`` imports what it
re-exports from them, so importing the compiled core (``_core``) never runs them.
"""
