"""A slow, independent exact solver: the LP relaxation solved by HiGHS (scipy).

The constraint matrix (token rows ``sum_e x = k``, expert rows ``sum_t x <= capacity``) is the
incidence matrix of a bipartite graph, hence totally unimodular: a simplex vertex of the LP is
an integral optimal routing.  Used only by tests and benchmarks to check the other methods;
it shares no code with the compiled core.  Needs scipy (a dev dependency).

Complexity: dual simplex on T E variables; seconds at T E ~ 1e5.  Ties: whatever vertex
HiGHS returns.
"""

from __future__ import annotations

import numpy as np

from maxscore.solvers._validate import Problem
from maxscore.solvers.assignment import Assignment, to_assignment


def solve_reference(problem: Problem) -> Assignment:
    """Optimal routing by linear programming (scipy.optimize.linprog, method 'highs-ds')."""
    try:
        from scipy.optimize import linprog
        from scipy.sparse import csr_array
    except ImportError as error:  # pragma: no cover - scipy is a dev dependency
        raise ImportError("method='reference' needs scipy: pip install 'maxscore[dev]'") from error
    scores = problem.scores_TE.double().numpy()
    valid = np.ones(problem.num_tokens, bool) if problem.valid_T is None else problem.valid_T.numpy()
    experts_TK = np.full((problem.num_tokens, problem.k), -1, dtype=np.int64)
    if problem.num_valid == 0:
        return to_assignment(problem, experts_TK, "reference", gap=0.0)
    allowed = np.isfinite(scores) & valid[:, None]
    tokens_P, experts_P = np.nonzero(allowed)
    num_pairs = tokens_P.size
    columns = np.arange(num_pairs)
    token_rows = csr_array((np.ones(num_pairs), (tokens_P, columns)), shape=(problem.num_tokens, num_pairs))
    expert_rows = csr_array(
        (np.ones(num_pairs), (experts_P, columns)), shape=(problem.num_experts, num_pairs)
    )
    result = linprog(
        -scores[tokens_P, experts_P],
        A_ub=expert_rows,
        b_ub=np.full(problem.num_experts, problem.capacity, dtype=float),
        A_eq=token_rows[valid],
        b_eq=np.full(problem.num_valid, problem.k, dtype=float),
        bounds=(0, 1),
        method="highs-ds",
    )
    if result.status == 2:
        raise ValueError("scores: the forbidden pairs (-inf) make the problem infeasible (reference LP)")
    if result.status != 0:
        raise RuntimeError(f"reference LP failed: {result.message}")
    chosen = result.x > 0.5
    if not np.allclose(result.x, chosen, atol=1e-6):
        raise RuntimeError("reference LP returned a fractional vertex; the LP should be integral")
    order = np.lexsort((-scores[tokens_P[chosen], experts_P[chosen]], tokens_P[chosen]))
    tokens_A, experts_A = tokens_P[chosen][order], experts_P[chosen][order]
    slots_A = np.arange(tokens_A.size) - np.searchsorted(tokens_A, tokens_A)
    experts_TK[tokens_A, slots_A] = experts_A
    return to_assignment(problem, experts_TK, "reference", gap=0.0)
