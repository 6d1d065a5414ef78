"""Expert parallelism: experts sharded over a process group, tokens exchanged with all-to-all.

With P ranks in the expert-parallel group, rank r holds experts ``r * E/P ... (r + 1) * E/P - 1``
(contiguous blocks) and every rank routes its own tokens over all E experts.

- **Static exchange** (MaxScore and the other routers whose ``fills_capacity`` is true): every
  rank fills a [E, C, D] buffer whose capacity C is known to all ranks (the same routing
  groups on every rank), so one ``all_to_all_single`` with equal splits of E/P x C rows per
  rank sends the buffer, and one sends the expert outputs back: no size handshake, and no
  padding beyond the capacity (at capacity_factor 1 MaxScore fills every slot).
- **Variable exchange** (routers that drop or are dropless, and global routing, whose
  per-rank loads vary): the (token, choice) pairs sorted by expert, the per-expert counts
  exchanged first ([E] integers), then only the assigned rows.  Global routing that gathered
  the scores knows every rank's counts (``RouterOutput.rank_loads``): when the router routes
  over the same ranks as the experts, the count exchange is skipped.

The ``all_to_all`` here is differentiable (its backward is the reverse exchange), so expert
gradients flow back to the ranks that sent the tokens.  The layer does not branch on the world
size: ``parallelize_moe`` swaps each ``MoELayer``'s experts for its local shard and its
dispatcher for an ``ExpertParallelDispatcher``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from maxscore._distributed import initialized
from maxscore.moe.dispatch import capacity_slots, combine, dispatch, pair_weights, slot_table, sort_by_expert
from maxscore.moe.experts import SwiGLUExperts
from maxscore.moe.layer import MoELayer
from maxscore.routers import RouterOutput


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, output_splits, input_splits, group):
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        output_splits, input_splits = ctx.splits
        back = grad.new_empty((sum(input_splits),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(back, grad.contiguous(), input_splits, output_splits, group=ctx.group)
        return back, None, None, None


def all_to_all(
    x: torch.Tensor, output_splits: list[int], input_splits: list[int], group: dist.ProcessGroup | None
) -> torch.Tensor:
    """Differentiable ``all_to_all_single`` along dim 0: ``input_splits[r]`` rows go to rank r,
    ``output_splits[r]`` rows come from it."""
    return _AllToAll.apply(x, list(output_splits), list(input_splits), group)


class ExpertParallelDispatcher:
    """Runs routed tokens through experts sharded over ``group`` (see the module docstring).

    Args:
        group: the expert-parallel process group (None: the world).
        num_experts: E, all experts (the local shard holds E / group size).
        static: use the static exchange for capacity routings.
        routed_over_group: the router routes over the same ranks in the same order, so a
            routing's ``rank_loads`` (when it has them) replace the exchange of the counts.
    """

    def __init__(
        self, group: dist.ProcessGroup | None, num_experts: int, static: bool, routed_over_group: bool = False
    ) -> None:
        self.group, self.num_experts, self.static = group, num_experts, static
        self.routed_over_group = routed_over_group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.checked: tuple[int, int] | None = None  # the (capacity, dim) agreed on by every rank

    def __call__(self, x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> torch.Tensor:
        if routing.capacity is not None and self.static:
            return self._static(x_TD, routing, experts)
        return self._variable(x_TD, routing, experts)

    def _check_same_shape(self, capacity: int, dim: int, device: torch.device) -> None:
        """Every rank must send the same [E, C, D] buffer: checked once per new shape (one small
        all-reduce), so that unequal local batches end with an error instead of a stalled exchange."""
        if self.checked == (capacity, dim):
            return
        shape = torch.tensor([capacity, -capacity, dim, -dim], dtype=torch.float64, device=device)
        dist.all_reduce(shape, op=dist.ReduceOp.MAX, group=self.group)
        if shape[0] != -shape[1] or shape[2] != -shape[3]:
            raise ValueError(
                f"expert parallelism: the ranks' local batches differ (this rank: capacity {capacity} "
                f"slots per expert, dim {dim}; across ranks capacity {int(-shape[1])}..{int(shape[0])}, "
                f"dim {int(-shape[3])}..{int(shape[2])}); give every rank the same number of sequences of "
                "the same length (pad the last batch, or drop it)"
            )
        self.checked = (capacity, dim)

    def _static(self, x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> torch.Tensor:
        num_experts, capacity, dim = self.num_experts, routing.capacity, x_TD.shape[1]
        self._check_same_shape(capacity, dim, x_TD.device)
        local = num_experts // self.size
        slots_TK = capacity_slots(routing.experts, num_experts, capacity)
        token_S, weight_S = slot_table(slots_TK, routing.weights, num_experts * capacity)
        x_SD = dispatch(x_TD, token_S, num_experts).flatten(0, 1)
        splits = [local * capacity] * self.size
        received = all_to_all(x_SD, splits, splits, self.group)  # [source rank, local expert, C, D]
        x_ECD = received.view(self.size, local, capacity, dim).transpose(0, 1).reshape(local, -1, dim)
        y_ECD = experts(x_ECD)
        y_SD = y_ECD.view(local, self.size, capacity, dim).transpose(0, 1).reshape(-1, dim)
        returned = all_to_all(y_SD, splits, splits, self.group)
        return combine(returned.view(num_experts, capacity, dim), token_S, weight_S, x_TD.shape[0])

    def _variable(self, x_TD: torch.Tensor, routing: RouterOutput, experts: SwiGLUExperts) -> torch.Tensor:
        local = self.num_experts // self.size
        pairs_P, tokens_P, counts = sort_by_expert(routing.experts, self.num_experts)
        known_RE = routing.rank_loads if self.routed_over_group else None
        if known_RE is not None:  # every rank knows every rank's counts: no exchange
            if known_RE.shape != (self.size, self.num_experts) or known_RE[self.rank].tolist() != counts:
                raise RuntimeError(
                    "expert parallelism: the routing's rank_loads do not match its experts on rank "
                    f"{self.rank}; the router and the dispatcher must use the same process group"
                )
            mine = slice(self.rank * local, (self.rank + 1) * local)
            received_RX = known_RE[:, mine].cpu()  # [source rank, local expert]
        else:
            send_E = torch.tensor(counts, dtype=torch.int64, device=x_TD.device)
            received_E = torch.empty_like(send_E)  # [source rank, local expert]
            dist.all_to_all_single(received_E, send_E, group=self.group)
            received_RX = received_E.view(self.size, local).cpu()
        input_splits = torch.tensor(counts).view(self.size, local).sum(1).tolist()
        output_splits = received_RX.sum(1).tolist()
        rows = all_to_all(x_TD[tokens_P], output_splits, input_splits, self.group)
        # (source, expert) blocks -> (expert, source) blocks and back: copies of whole blocks,
        # whose backward is the same copy (no row gather, no scatter-add)
        y_PD = experts.forward_grouped(_transpose_blocks(rows, received_RX), received_RX.sum(0).tolist())
        y_PD = _transpose_blocks(y_PD, received_RX.T)
        returned = all_to_all(y_PD, input_splits, output_splits, self.group)
        weighted_PD = returned * pair_weights(routing, pairs_P, returned.dtype)
        return x_TD.new_zeros(x_TD.shape).index_add(0, tokens_P, weighted_PD.to(x_TD.dtype))


def _transpose_blocks(x_PD: torch.Tensor, counts_AB: torch.Tensor) -> torch.Tensor:
    """Rows laid out as blocks (a, b) of ``counts_AB[a, b]`` rows (a-major) -> the same blocks
    b-major."""
    blocks = x_PD.split(counts_AB.flatten().tolist())
    rows, cols = counts_AB.shape
    return torch.cat([blocks[a * cols + b] for b in range(cols) for a in range(rows)])


def shard_experts(experts: SwiGLUExperts, rank: int, size: int) -> SwiGLUExperts:
    """A ``SwiGLUExperts`` holding experts ``rank * E/size ... (rank + 1) * E/size - 1`` (copies)."""
    local = experts.num_experts // size
    shard = SwiGLUExperts(local, experts.dim, experts.hidden).to(experts.w_gate.device, experts.w_gate.dtype)
    block = slice(rank * local, (rank + 1) * local)
    with torch.no_grad():
        for name in ("w_gate", "w_up", "w_down"):
            getattr(shard, name).copy_(getattr(experts, name)[block])
    return shard


def parallelize_moe(
    model: nn.Module,
    *,
    expert_group: dist.ProcessGroup | None = None,
    routing_group: dist.ProcessGroup | None = None,
) -> nn.Module:
    """Shards the experts of every ``MoELayer`` in ``model`` over ``expert_group`` (in place).

    Call it on every rank with identically initialized models (same seed) before creating the
    optimizer.  Routers with ``group="global"`` route over ``routing_group``'s tokens.

    Args:
        model: a module containing ``MoELayer``s (or a ``MoELayer``).
        expert_group: the expert-parallel group (default: the world); E must be divisible by its size.
        routing_group: the group of global routing (default: the world).

    Returns:
        ``model``; ``expert_parameter_names(model)`` names its (sharded) expert parameters.
    """
    if not initialized():
        raise ValueError("parallelize_moe needs an initialized process group: see maxscore.parallel.launch")
    size, rank = dist.get_world_size(expert_group), dist.get_rank(expert_group)
    same_ranks = _members(routing_group) == _members(expert_group)
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError("parallelize_moe: the model has no MoELayer to parallelize")
    for layer in layers:
        if layer.num_experts % size:
            raise ValueError(
                f"num_experts={layer.num_experts} is not divisible by the expert-parallel size {size}; "
                f"use num_experts divisible by {size}, or a smaller expert-parallel group (expert_group=, "
                "or expert_parallel=N in the training settings)"
            )
        if isinstance(layer.dispatcher, ExpertParallelDispatcher):
            raise ValueError("parallelize_moe: the model is already parallelized")
        layer.experts = shard_experts(layer.experts, rank, size)
        layer.dispatcher = ExpertParallelDispatcher(
            expert_group, layer.num_experts, layer.router.fills_capacity, routed_over_group=same_ranks
        )
        layer.router.process_group = routing_group
    return model


def _members(group: dist.ProcessGroup | None) -> list[int]:
    """The global ranks of ``group`` (None: the world) in its own rank order."""
    if group is None:
        return list(range(dist.get_world_size()))
    return dist.get_process_group_ranks(group)


def expert_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters of expert shards (layers parallelized by ``parallelize_moe``)."""
    names = set()
    for prefix, module in model.named_modules():
        if isinstance(module, MoELayer) and isinstance(module.dispatcher, ExpertParallelDispatcher):
            names.update(f"{prefix}.experts.{n}".lstrip(".") for n, _ in module.experts.named_parameters())
    return names
