"""maxscore: Maximum Score Routing for Mixture-of-Experts.

Exact, certified capacity-constrained top-k routing (``solve``), the paper's approximations and
the baselines it compares against.
"""

from maxscore.solvers import METHODS, Assignment, expert_capacity, method_options, solve

__version__ = "0.1.0"

__all__ = ["METHODS", "Assignment", "expert_capacity", "method_options", "solve", "__version__"]
