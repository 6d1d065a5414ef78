"""Expert parallelism on torch.distributed: it moves tensors, it solves nothing.

``parallelize_moe`` shards the experts of a model's MoE layers over a process group (all-to-all
token exchange); ``launch`` starts process groups (torchrun or spawned) with timeouts;
``data_parallel`` reduces gradients.  Global routing (one exact routing over all ranks' tokens)
is a solver: ``maxscore.solvers.solve_global``.
"""

from __future__ import annotations

from maxscore.parallel.expert_parallel import (
    ExpertParallelDispatcher,
    all_to_all,
    expert_parameter_names,
    parallelize_moe,
)

__all__ = ["ExpertParallelDispatcher", "all_to_all", "expert_parameter_names", "parallelize_moe"]
