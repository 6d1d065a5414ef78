"""maxscore: Maximum Score Routing for Mixture-of-Experts.

Exact, certified capacity-constrained top-k routing (``solve``), the paper's approximations and
the baselines it compares against, as solvers, routers and an MoE layer (``MoELayer``).
"""

from maxscore.gates import TemperatureSchedule, TemperatureScheduleConfig, soft_topk
from maxscore.moe import MoELayer, MoEOutput
from maxscore.routers import ROUTERS, MoEConfig, check_routing, install_step_hook, make_router, step_routers
from maxscore.solvers import METHODS, Assignment, expert_capacity, method_options, solve

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "ROUTERS",
    "Assignment",
    "MoEConfig",
    "MoELayer",
    "MoEOutput",
    "TemperatureSchedule",
    "TemperatureScheduleConfig",
    "__version__",
    "check_routing",
    "expert_capacity",
    "install_step_hook",
    "make_router",
    "method_options",
    "soft_topk",
    "solve",
    "step_routers",
]
