"""Shape letters used in tensor names across maxscore (e.g. ``scores_TE``, ``experts_GNK``).

Every letter has one meaning; a new kind of axis gets a new letter here first.

=====  ==========================================================================
``T``  tokens of a flattened batch (all sequences, all routing groups)
``B``  batch: sequences
``L``  sequence length: positions in a sequence
``D``  model dimension
``F``  expert hidden dimension
``E``  experts
``K``  experts per token (``k``), in preference order
``C``  capacity: slots per expert
``G``  routing groups (a capacity applies per group)
``N``  tokens of one routing group, i.e. of one solver problem
``M``  candidate tokens of the device engine's repair (the smallest margins)
``S``  slots of the static dispatch buffer (``E * C``)
``P``  (token, expert) pairs of the grouped (dropless) path or of a rerouting round
``A``  pairs accepted (assigned) from ``P``
``U``  tokens with units still to place (a rerouting round)
``W``  candidate choices per token in a rerouting round (a top-W list)
``R``  ranks of a process group
``X``  experts held by one rank (``E / R``)
``Q``  edges of the expert graph, flattened (``E * E``)
``V``  nodes of the expert graph (``E`` experts and a sink)
``Y``  MoE layers of a model
=====  ==========================================================================
"""

LEGEND = {
    "T": "tokens of a flattened batch",
    "B": "batch (sequences)",
    "L": "sequence length",
    "D": "model dimension",
    "F": "expert hidden dimension",
    "E": "experts",
    "K": "experts per token",
    "C": "capacity (slots per expert)",
    "G": "routing groups",
    "N": "tokens of one routing group (one solver problem)",
    "M": "candidate tokens of the device repair",
    "S": "slots of the dispatch buffer (E * C)",
    "P": "(token, expert) pairs",
    "A": "accepted pairs",
    "U": "tokens with units still to place",
    "W": "candidate choices per token",
    "R": "ranks of a process group",
    "X": "experts held by one rank",
    "Q": "edges of the expert graph (E * E)",
    "V": "nodes of the expert graph (E and a sink)",
    "Y": "MoE layers",
}
