"""Expert parallelism and global routing on torch.distributed."""

from maxscore.parallel.global_routing import GlobalAssignment, solve_global

__all__ = ["GlobalAssignment", "solve_global"]
