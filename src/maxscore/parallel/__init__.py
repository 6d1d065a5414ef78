"""Expert parallelism and global routing on torch.distributed.

``parallelize_moe`` shards the experts of a model's MoE layers over a process group (all-to-all
token exchange); ``solve_global`` routes the tokens of all ranks as one problem; ``launch``
starts process groups (torchrun or spawned) with timeouts; ``data_parallel`` reduces gradients.
"""

from __future__ import annotations

from importlib import import_module

from maxscore.parallel.global_routing import GlobalAssignment, solve_global

_LAZY = {  # imported on first use: the layer imports the routers, which import this package
    "ExpertParallelDispatcher": "expert_parallel",
    "all_to_all": "expert_parallel",
    "expert_parameter_names": "expert_parallel",
    "parallelize_moe": "expert_parallel",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(f"maxscore.parallel.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'maxscore.parallel' has no attribute {name!r}")


__all__ = ["GlobalAssignment", "solve_global", *_LAZY]
