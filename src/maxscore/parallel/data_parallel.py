"""Data parallelism around expert parallelism: DDP for the shared parameters, the experts apart.

Every rank computes the mean loss of its own tokens.  The shared (non-expert) parameters are
replicated: ``DistributedDataParallel`` averages their gradients over all ranks while the
backward pass runs.  An expert shard already receives, through the all-to-all backward, the
gradient of every rank's loss on its tokens (the sum over the ranks of its expert-parallel
group), so ``finish_expert_gradients`` divides by the world size and, when experts are
replicated (expert-parallel size < world size), sums the replicas over their replica group:
the result is the gradient of the global mean loss, as on one process.  ``clip_grad_norm``
clips by the norm of all gradients of all ranks, counting each replicated tensor once.
"""

from __future__ import annotations

import inspect

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from maxscore._distributed import initialized
from maxscore.parallel.expert_parallel import expert_parameter_names
from maxscore.parallel.topology import Topology


def data_parallel(model: nn.Module, group: dist.ProcessGroup | None = None) -> DistributedDataParallel:
    """``model`` wrapped in DDP over ``group`` (default: the world), expert shards excluded."""
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, sorted(expert_parameter_names(model))
    )
    device = next(model.parameters()).device
    # router buffers are kept equal by ``average_buffers``, not broadcast from rank 0 every forward
    no_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
        else {"broadcast_buffers": False}
    )
    return DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None, process_group=group, **no_sync
    )


def _experts(model: nn.Module) -> list[torch.Tensor]:
    names = expert_parameter_names(model)
    return [p for n, p in model.named_parameters() if n in names and p.grad is not None]


def finish_expert_gradients(
    model: nn.Module, world_size: int, replica_group: dist.ProcessGroup | None = None
) -> None:
    """Turns the expert shards' gradients into gradients of the mean loss over all ranks."""
    grads = [p.grad for p in _experts(model)]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    if replica_group is not None and dist.get_world_size(replica_group) > 1:
        dist.all_reduce(flat, group=replica_group)
    flat /= world_size
    torch._foreach_copy_(
        grads,
        [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads, strict=True)],
    )


def clip_grad_norm(
    model: nn.Module, max_norm: float, expert_group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Clips all gradients by their global norm (shared ones counted once, every expert shard once)."""
    experts = {id(p) for p in _experts(model)}
    shared = [p.grad for p in model.parameters() if p.grad is not None and id(p) not in experts]
    local = [p.grad for p in model.parameters() if id(p) in experts]
    squares = torch.stack(
        [
            sum(
                (g.double().square().sum() for g in grads),
                torch.zeros((), dtype=torch.float64, device=_device(model)),
            )
            for grads in (shared, local)
        ]
    )
    if initialized() and local:
        dist.all_reduce(squares[1:], group=expert_group)
    total = squares.sum().sqrt()
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(shared + local, scale.to(shared[0].dtype if shared else torch.float32))
    return total


def average_buffers(model: nn.Module, group: dist.ProcessGroup | None = None) -> None:
    """Averages the routers' floating-point buffers (dual prices, biases) over ``group``."""
    buffers = [b for n, b in model.named_buffers() if b.is_floating_point() and ".router." in f".{n}"]
    if not buffers:
        return
    flat = torch.cat([b.flatten().double() for b in buffers])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    for chunk, buffer in zip(flat.split([b.numel() for b in buffers]), buffers, strict=True):
        buffer.copy_(chunk.view_as(buffer))


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, max_norm: float, topology: Topology
) -> torch.Tensor:
    """After the backward passes of a step: expert gradients finished (multi-process), global
    clipping, the optimizer step, gradients cleared, router buffers averaged.  Returns the norm."""
    if topology.distributed:
        finish_expert_gradients(model, topology.world_size, topology.replica_group)
    norm = clip_grad_norm(model, max_norm, topology.expert_group)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if topology.distributed:
        average_buffers(model)
    return norm
