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


@dataclass(frozen=True, slots=True)
class Problems:
    """G validated routing problems of one shape [N, E] (routing groups), on the host, or on
    the scores' device for the device engine (``make_problems(..., on_device=True)``).

    ``capacity_G`` and ``num_valid_G`` are int64 [G] tensors beside the scores; ``group(g)`` is
    problem g as a ``Problem`` (a view: nothing is checked or copied again).
    """

    scores_GNE: torch.Tensor
    k: int
    capacity_G: torch.Tensor
    valid_GN: torch.Tensor | None
    num_valid_G: torch.Tensor
    device: torch.device

    @property
    def num_groups(self) -> int:
        return self.scores_GNE.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.scores_GNE.shape[1]

    @property
    def num_experts(self) -> int:
        return self.scores_GNE.shape[2]

    def group(self, g: int) -> Problem:
        valid_T = None if self.valid_GN is None else self.valid_GN[g]
        capacity, num_valid = int(self.capacity_G[g]), int(self.num_valid_G[g])
        return Problem(self.scores_GNE[g], self.k, capacity, valid_T, num_valid, self.device)


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float = 1.0) -> int:
    """Tokens per expert: ``ceil(capacity_factor * k * num_tokens / num_experts)``.

    Args:
        num_tokens: valid tokens in the routing group (padding excluded).
        num_experts: experts E >= 1.
        k: experts per token, 1 <= k <= E.
        capacity_factor: > 0; 1.0 leaves no slack (every expert exactly full when
            ``k * num_tokens`` is divisible by E).
    """
    if torch.compiler.is_compiling():  # checked where the layer was built; a traced value may be symbolic
        return _capacity(num_tokens, num_experts, k, capacity_factor)
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
    return _capacity(num_tokens, num_experts, k, capacity_factor)


def _capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    if capacity_factor == 1:  # exact integer arithmetic for the common case
        return -(-k * num_tokens // num_experts)
    value = capacity_factor * k * num_tokens / num_experts
    # a relative tolerance keeps e.g. 1.1 * 10 * 10 / 11 from rounding up to 11
    return math.ceil(value - 1e-9 * max(1.0, value))


def group_capacity(
    num_valid_G: torch.Tensor, num_experts: int, k: int, capacity_factor: float
) -> torch.Tensor:
    """``expert_capacity`` of every group at once, on the counts' device (no host sync).

    Args:
        num_valid_G: int64 [G] valid tokens per group; k and capacity_factor already checked.
    """
    if capacity_factor == 1:
        return (k * num_valid_G + num_experts - 1) // num_experts
    value_G = capacity_factor * k * num_valid_G.double() / num_experts
    return torch.ceil(value_G - 1e-9 * value_G.clamp(min=1.0)).long()


def _check_k(k: int, num_experts: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must satisfy 1 <= k <= num_experts={num_experts}, got k={k}")


def _first(indices: torch.Tensor, limit: int = 8) -> str:
    shown = indices[:limit].tolist()
    more = indices.numel() - len(shown)
    return f"{shown}" + (f" (and {more} more)" if more > 0 else "")


def check_scores(scores: torch.Tensor) -> None:
    """Type, rank and dtype of ``scores``: [N, E] (one problem) or [G, N, E] (G groups)."""
    if not isinstance(scores, torch.Tensor):
        raise ValueError(
            f"scores must be a torch.Tensor of shape [N, E] or [G, N, E], got {type(scores).__name__}; "
            "convert with torch.as_tensor(...)"
        )
    if scores.dim() not in (2, 3):
        raise ValueError(
            f"scores must have shape [N, E] (one problem) or [G, N, E] (G routing groups), got shape "
            f"{tuple(scores.shape)}; reshape first, e.g. scores.reshape(-1, num_experts) or "
            "scores.view(groups, -1, num_experts)"
        )
    if scores.dtype not in FLOAT_DTYPES:
        raise ValueError(
            f"scores must be float16/bfloat16/float32/float64, got {scores.dtype}; cast with scores.float()"
        )
    if scores.shape[-1] < 1:
        raise ValueError("scores must have at least one expert column (E >= 1), got E = 0")


def check_valid(valid: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
    """``valid`` as a detached bool tensor of ``shape`` ([N] or [G, N]), on its own device."""
    if valid is None:
        return None
    form = "[N]" if len(shape) == 1 else "[G, N]"
    if not isinstance(valid, torch.Tensor) or valid.dtype != torch.bool:
        got = valid.dtype if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(f"valid must be a bool tensor of shape {form}, got {got}; use valid.bool()")
    if tuple(valid.shape) != tuple(shape):
        raise ValueError(f"valid must have shape {form} = {list(shape)}, got {tuple(valid.shape)}")
    return valid.detach()


def name_tokens(rows: torch.Tensor, group_size: int | None) -> str:
    """Row indices as token numbers, or as (group, token) pairs of a batched problem."""
    if group_size is None:
        return _first(rows)
    pairs = [(int(r) // group_size, int(r) % group_size) for r in rows[:8]]
    more = rows.numel() - len(pairs)
    return f"(group, token) {pairs}" + (f" (and {more} more)" if more > 0 else "")


def nonfinite_message(rows: torch.Tensor, group_size: int | None = None) -> str:
    return (
        f"scores contains NaN or +inf at tokens {name_tokens(rows, group_size)}; "
        "scores must be finite, with -inf only to forbid a token-expert pair"
    )


def short_message(rows: torch.Tensor, k: int, group_size: int | None = None) -> str:
    return (
        f"scores: tokens {name_tokens(rows, group_size)} have fewer than k={k} allowed experts "
        "(entries > -inf); allow at least k experts per token, or mark those tokens invalid with `valid`"
    )


PRICES_MESSAGE = "prices must be finite; pass None for a cold start"


def infeasible_message(capacity: int, num_experts: int, k: int, num_valid: int, group: int | None) -> str:
    where = "" if group is None else f" in group {group}"
    return (
        f"capacity={capacity} is infeasible{where}: {num_experts} experts x {capacity} < k x tokens = "
        f"{k} x {num_valid}; use capacity >= {-(-k * num_valid // num_experts)} or capacity_factor >= 1"
    )


def _check_values(
    scores_TE: torch.Tensor, valid_T: torch.Tensor | None, k: int, group_size: int | None = None
) -> None:
    """Rejects NaN/+inf and tokens with fewer than k allowed experts (one compiled pass).

    A batched problem passes its rows flattened, with ``group_size`` N for the messages.
    """
    from maxscore.solvers.exact import _core  # compiled; imported here to keep this module light

    num_tokens, num_experts = scores_TE.shape
    valid = None if valid_T is None else valid_T.numpy().view("uint8")
    num_bad, _, num_short, _, _ = _core.scan(
        scores_TE.numpy(), scores_TE.dtype == torch.float64, num_tokens, num_experts, k, valid
    )
    if num_bad:
        bad_T = torch.isnan(scores_TE).any(1) | (scores_TE == math.inf).any(1)
        if valid_T is not None:
            bad_T &= valid_T
        raise ValueError(nonfinite_message(bad_T.nonzero().flatten(), group_size))
    if num_short:
        short_T = (scores_TE > -math.inf).sum(1) < k
        if valid_T is not None:
            short_T &= valid_T
        raise ValueError(short_message(short_T.nonzero().flatten(), k, group_size))


def make_problem(
    scores: torch.Tensor,
    k: int,
    capacity: int | None,
    capacity_factor: float,
    valid: torch.Tensor | None,
    *,
    require_feasible: bool = True,
) -> Problem:
    """Checks every argument of ``solve`` for [N, E] scores and returns the host-side problem.

    ``require_feasible=False`` (methods that may drop or ignore capacity) accepts a capacity
    below ``k x tokens / E``.
    """
    check_scores(scores)
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape [N, E] here, got {tuple(scores.shape)}")
    num_tokens, num_experts = scores.shape
    _check_k(k, num_experts)
    valid_T = check_valid(valid, (num_tokens,))
    valid_T = None if valid_T is None else valid_T.to("cpu").contiguous()
    num_valid = num_tokens if valid_T is None else int(valid_T.sum())
    if capacity is None:
        capacity = expert_capacity(num_valid, num_experts, k, capacity_factor)
    elif isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0 or None, got {capacity!r}")
    if require_feasible and capacity * num_experts < k * num_valid:
        raise ValueError(infeasible_message(capacity, num_experts, k, num_valid, None))
    scores_TE = host_scores(scores)
    _check_values(scores_TE, valid_T, k)
    return Problem(scores_TE, k, capacity, valid_T, num_valid, scores.device)


def host_scores(scores: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU float32/float64 copy (float16/bfloat16 widen to float32 exactly)."""
    host_dtype = scores.dtype if scores.dtype in (torch.float32, torch.float64) else torch.float32
    return scores.detach().to("cpu", host_dtype).contiguous()


def capacities(
    capacity: int | torch.Tensor | None,
    capacity_factor: float,
    num_valid_G: torch.Tensor,
    num_experts: int,
    k: int,
) -> torch.Tensor:
    """int64 [G] capacities on ``num_valid_G``'s device: the given int or [G] tensor, or the default."""
    num_groups = num_valid_G.shape[0]
    if capacity is None:
        expert_capacity(0, num_experts, k, capacity_factor)  # checks capacity_factor
        return group_capacity(num_valid_G, num_experts, k, capacity_factor)
    if isinstance(capacity, torch.Tensor):
        if capacity.dtype != torch.int64 or capacity.shape != (num_groups,):
            raise ValueError(
                f"capacity must be an int or an int64 tensor of shape [G] = [{num_groups}], got "
                f"{capacity.dtype} {tuple(capacity.shape)}; "
                "use torch.as_tensor(capacities, dtype=torch.int64)"
            )
        return capacity.detach().to(num_valid_G.device)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ValueError(f"capacity must be an int >= 0, an int64 [G] tensor or None, got {capacity!r}")
    return torch.full((num_groups,), capacity, dtype=torch.int64, device=num_valid_G.device)


def make_problems(
    scores: torch.Tensor,
    k: int,
    capacity: int | torch.Tensor | None,
    capacity_factor: float,
    valid: torch.Tensor | None,
    *,
    require_feasible: bool = True,
    finite: bool = False,
    on_device: bool = False,
) -> Problems:
    """Checks every argument of ``solve`` for [G, N, E] scores, once for all groups: the one
    problem builder of every engine.

    ``finite=True``: the caller guarantees finite scores (a router's softmax or sigmoid of logits
    it checked), so the value scan is skipped: every input is checked once per call.
    ``on_device=True`` (the device engine): the problems stay on the scores' device, and the
    checks that need the values (NaN/+inf, tokens with fewer than k allowed experts, a capacity
    below ``k x valid / E``) are left to the engine, which reads them with its one transfer:
    here nothing waits for the device.
    """
    check_scores(scores)
    num_groups, num_tokens, num_experts = scores.shape
    if num_groups == 0:
        raise ValueError("scores has 0 routing groups (shape [0, N, E]); pass at least one group")
    _check_k(k, num_experts)
    valid_GN = check_valid(valid, (num_groups, num_tokens))
    device = scores.device if on_device else torch.device("cpu")
    valid_GN = None if valid_GN is None else valid_GN.to(device).contiguous()
    if valid_GN is None:
        num_valid_G = torch.full((num_groups,), num_tokens, dtype=torch.int64, device=device)
    else:
        num_valid_G = valid_GN.sum(1)
    capacity_G = capacities(capacity, capacity_factor, num_valid_G, num_experts, k).to(device)
    if on_device:
        return Problems(scores.detach(), k, capacity_G, valid_GN, num_valid_G, scores.device)
    if (capacity_G < 0).any():
        raise ValueError(f"capacity must be >= 0 in every group, got {capacity_G.tolist()}")
    short_G = capacity_G * num_experts < k * num_valid_G
    if require_feasible and short_G.any():
        g = int(short_G.nonzero()[0])
        raise ValueError(infeasible_message(int(capacity_G[g]), num_experts, k, int(num_valid_G[g]), g))
    scores_GNE = host_scores(scores)
    flat_valid = None if valid_GN is None else valid_GN.view(-1)
    if not finite:
        _check_values(scores_GNE.view(-1, num_experts), flat_valid, k, group_size=num_tokens)
    return Problems(scores_GNE, k, capacity_G, valid_GN, num_valid_G, scores.device)
