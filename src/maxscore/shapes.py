"""Shape letters used in tensor names across maxscore (e.g. ``scores_TE``, ``experts_TK``).

=====  =====================================================
``T``  tokens (a flattened batch; the solvers' ``N``)
``B``  batch (sequences)
``L``  sequence length
``D``  model dimension
``F``  expert hidden dimension
``E``  experts
``K``  experts per token (``k``)
``C``  capacity (tokens per expert)
=====  =====================================================
"""

LEGEND = {
    "T": "tokens (flattened batch)",
    "B": "batch",
    "L": "sequence length",
    "D": "model dimension",
    "F": "expert hidden dimension",
    "E": "experts",
    "K": "experts per token",
    "C": "capacity (tokens per expert)",
}
