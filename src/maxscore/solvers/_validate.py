"""Input checks shared by every solver method: clear errors that name the argument and the fix."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True, slots=True)
class Problem:
    """A validated routing problem, on the host.

    ``scores_TE`` is a contiguous CPU float32/float64 tensor (float16/bfloat16 are widened to
    float32, exactly); ``device`` is where the caller's scores lived and where results go.
    """

    scores_TE: torch.Tensor
    k: int
    capacity: int
    valid_T: torch.Tensor | None
    num_valid: int
    device: torch.device

    @property
    def num_tokens(self) -> int:
        return self.scores_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.scores_TE.shape[1]


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert: ``ceil(capacity_factor * k * num_tokens / num_experts)``.

    Args:
        num_tokens: valid tokens in the routing group (padding excluded).
        num_experts: experts E >= 1.
        k: experts per token, 1 <= k <= E.
        capacity_factor: > 0; 1.0 leaves no slack (every expert exactly full when
            ``k * num_tokens`` is divisible by E).
    """
    for name, value in (("num_tokens", num_tokens), ("num_experts", num_experts), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    _check_k(k, num_experts)
    if (
        not isinstance(capacity_factor, (int, float))
        or not math.isfinite(capacity_factor)
        or capacity_factor <= 0
    ):
        raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
    if capacity_factor == 1:  # exact integer arithmetic for the common case
        return -(-k * num_tokens // num_experts)
    value = capacity_factor * k * num_tokens / num_experts
    # a relative tolerance keeps e.g. 1.1 * 10 * 10 / 11 from rounding up to 11
    return math.ceil(value - 1e-9 * max(1.0, value))


def _check_k(k: int, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= num_experts={num_experts}, got k={k}")


def _first(indices: torch.Tensor, limit: int = 8) -> str:
    shown = indices[:limit].tolist()
    more = indices.numel() - len(shown)
    return f"{shown}" + (f" (and {more} more)" if more > 0 else "")


def _check_scores(scores: torch.Tensor) -> None:
    if not isinstance(scores, torch.Tensor):
        raise ValueError(
            f"scores must be a torch.Tensor of shape [N, E], got {type(scores).__name__}; "
            "convert with torch.as_tensor(...)"
        )
    if scores.dim() != 2:
        raise ValueError(
            f"scores must have shape [N, E] (rank 2), got shape {tuple(scores.shape)}; "
            "flatten the batch first, e.g. scores.reshape(-1, num_experts)"
        )
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"scores must be float16/bfloat16/float32/float64, got {scores.dtype}; cast with scores.float()"
        )
    if scores.shape[1] < 1:
        raise ValueError("scores must have at least one expert column (E >= 1), got E = 0")


def _check_valid(valid: torch.Tensor | None, num_tokens: int) -> torch.Tensor | None:
    if valid is None:
        return None
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor of shape [N], got {got}; use valid.bool()")
    if valid.shape != (num_tokens,):
        raise ValueError(f"valid must have shape [N] = [{num_tokens}], got {tuple(valid.shape)}")
    return valid.detach().to("cpu").contiguous()


def _check_values(scores_TE: torch.Tensor, valid_T: torch.Tensor | None, k: int) -> None:
    """Rejects NaN/+inf and tokens with fewer than k allowed experts (one compiled pass)."""
    from maxscore.solvers import _core  # compiled; imported here to keep this module light

    num_tokens, num_experts = scores_TE.shape
    valid = None if valid_T is None else valid_T.numpy().view("uint8")
    num_bad, _, num_short, _, _ = _core.scan(
        scores_TE.numpy(), scores_TE.dtype == torch.float64, num_tokens, num_experts, k, valid
    )
    if num_bad:
        bad_T = torch.isnan(scores_TE).any(1) | (scores_TE == math.inf).any(1)
        if valid_T is not None:
            bad_T &= valid_T
        raise ValueError(
            f"scores contains NaN or +inf at tokens {_first(bad_T.nonzero().flatten())}; "
            "scores must be finite, with -inf only to forbid a token-expert pair"
        )
    if num_short:
        short_T = (scores_TE > -math.inf).sum(1) < k
        if valid_T is not None:
            short_T &= valid_T
        raise ValueError(
            f"scores: tokens {_first(short_T.nonzero().flatten())} have fewer than k={k} allowed experts "
            "(entries > -inf); allow at least k experts per token, or mark those tokens invalid with `valid`"
        )


def make_problem(
    scores: torch.Tensor,
    k: int,
    capacity: int | None,
    capacity_factor: float,
    valid: torch.Tensor | None,
    *,
    require_feasible: bool = True,
) -> Problem:
    """Checks every argument of ``solve`` and returns the host-side problem.

    ``require_feasible=False`` (methods that may drop or ignore capacity) accepts a capacity
    below ``k x tokens / E``.
    """
    _check_scores(scores)
    num_tokens, num_experts = scores.shape
    _check_k(k, num_experts)
    valid_T = _check_valid(valid, num_tokens)
    num_valid = num_tokens if valid_T is None else int(valid_T.sum())
    if capacity is None:
        capacity = expert_capacity(num_valid, num_experts, k, capacity_factor)
    elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0 or None, got {capacity!r}")
    if require_feasible and capacity * num_experts < k * num_valid:
        raise ValueError(
            f"capacity={capacity} is infeasible: {num_experts} experts x {capacity} < k x tokens = "
            f"{k} x {num_valid}; use capacity >= {-(-k * num_valid // num_experts)} or capacity_factor >= 1"
        )
    host_dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    scores_TE = scores.detach().to("cpu", host_dtype).contiguous()
    _check_values(scores_TE, valid_T, k)
    return Problem(scores_TE, k, capacity, valid_T, num_valid, scores.device)
