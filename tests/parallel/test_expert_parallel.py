"""Expert parallelism: spawned gloo ranks equal the single-process layer on the same tokens."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from maxscore import MoELayer
from maxscore.parallel import expert_parameter_names, parallelize_moe
from maxscore.parallel.expert_parallel import _transpose_blocks
from maxscore.parallel.launch import spawn

DIM, HIDDEN, EXPERTS, K = 16, 24, 8, 2
BATCH, LENGTH = 3, 20  # per rank


def _inputs(world_size: int):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(BATCH * world_size, LENGTH, DIM, generator=generator)
    probe = torch.randn(BATCH * world_size, LENGTH, DIM, generator=generator)
    valid = torch.rand(BATCH * world_size, LENGTH, generator=generator) > 0.2
    return x, probe, valid


def _layer(router: str, group: str) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(DIM, HIDDEN, EXPERTS, K, router=router, group=group)


def _run(layer: MoELayer, x, probe, valid):
    x = x.clone().requires_grad_()
    out = layer(x, valid)
    (out.output * probe).sum().backward()  # the balance losses are per-rank batch means: left out
    return out.output.detach(), x.grad, out.routing.rank_loads


def _rank(rank, world_size, router, group, padded, out_dir):
    x, probe, valid = _inputs(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    layer = parallelize_moe(_layer(router, group))
    static = layer.dispatcher.static
    output, x_grad, rank_loads = _run(layer, x[rows], probe[rows], valid[rows] if padded else None)
    # global routing gathered the scores: every rank's counts known, the count exchange skipped
    known = rank_loads is not None and layer.dispatcher.routed_over_group
    gate_grad = layer.router.gate.weight.grad.clone()
    dist.all_reduce(gate_grad)  # what data parallelism does for the non-expert parameters
    experts = {name: p.grad for name, p in layer.named_parameters() if name in expert_parameter_names(layer)}
    torch.save(
        {
            "output": output,
            "x_grad": x_grad,
            "gate_grad": gate_grad,
            "experts": experts,
            "static": static,
            "known": known,
        },
        f"{out_dir}/rank{rank}.pt",
    )


CASES = [  # router, group (global routing's single-process twin routes the whole batch)
    ("maxscore", "sequence"),  # static exchange
    ("maxscore", "global"),  # variable exchange, one routing over all ranks
    ("gshard", "sequence"),  # drops: variable exchange
    ("dropless", "sequence"),  # no capacity: variable exchange
]


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("world_size", "router", "group", "padded"),
    [(2, r, g, False) for r, g in CASES]
    + [(4, "maxscore", "sequence", True), (4, "maxscore", "global", True)],
)
def test_expert_parallel_layer_equals_single_process(world_size, router, group, padded, tmp_path):
    spawn(_rank, world_size, router, group, padded, str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(world_size)]
    x, probe, valid = _inputs(world_size)
    single = _layer(router, "batch" if group == "global" else group)
    output, x_grad, _ = _run(single, x, probe, valid if padded else None)
    torch.testing.assert_close(torch.cat([p["output"] for p in parts]), output, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.cat([p["x_grad"] for p in parts]), x_grad, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(parts[0]["gate_grad"], single.router.gate.weight.grad, atol=1e-5, rtol=1e-4)
    local = EXPERTS // world_size
    for rank, part in enumerate(parts):
        assert part["static"] == (router == "maxscore" and group == "sequence")
        assert part["known"] == (group == "global")
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(single.experts, name).grad[rank * local : (rank + 1) * local]
            torch.testing.assert_close(part["experts"][f"experts.{name}"], full, atol=1e-5, rtol=1e-4)


def _indivisible(rank, world_size):
    torch.manual_seed(0)
    parallelize_moe(MoELayer(DIM, HIDDEN, 6, K))  # 6 experts over 4 ranks


@pytest.mark.distributed
def test_experts_not_divisible_by_group_size_raise():
    with pytest.raises(Exception, match="num_experts=6 is not divisible by the expert-parallel size 4"):
        spawn(_indivisible, 4)


def test_parallelize_needs_a_process_group():
    with pytest.raises(ValueError, match="initialized process group"):
        parallelize_moe(MoELayer(DIM, HIDDEN, EXPERTS, K))


def _replicated_rank(rank, world_size, out_dir):
    from maxscore.parallel.data_parallel import clip_grad_norm, finish_expert_gradients
    from maxscore.parallel.topology import make_topology

    topology = make_topology(expert_parallel=2)  # 4 ranks: 2 shards, each held twice
    x, probe, _ = _inputs(world_size)
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    layer = parallelize_moe(_layer("maxscore", "sequence"), expert_group=topology.expert_group)
    _run(layer, x[rows], probe[rows], None)
    finish_expert_gradients(layer, world_size, topology.replica_group)
    for p in layer.parameters():  # what DDP does for the shared parameters: the mean
        if p.grad is not None and p.dim() == 2:
            dist.all_reduce(p.grad)
            p.grad /= world_size
    norm = clip_grad_norm(layer, 1e-3, topology.expert_group)
    grads = {name: p.grad for name, p in layer.named_parameters()}
    torch.save({"grads": grads, "norm": norm}, f"{out_dir}/rank{rank}.pt")


@pytest.mark.distributed
def test_replicated_experts_get_the_mean_gradient_and_a_global_clip(tmp_path):
    spawn(_replicated_rank, 4, str(tmp_path))
    parts = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(4)]
    x, probe, _ = _inputs(4)
    single = _layer("maxscore", "sequence")
    _run(single, x, probe, None)
    for p in single.parameters():
        p.grad /= 4  # the gradient of the mean of the 4 ranks' losses
    norm = torch.nn.utils.clip_grad_norm_(single.parameters(), 1e-3)
    local = EXPERTS // 2
    for rank, part in enumerate(parts):
        torch.testing.assert_close(part["norm"].float(), norm, rtol=1e-4, atol=0)
        block = slice((rank % 2) * local, (rank % 2 + 1) * local)
        for name in ("w_gate", "w_up", "w_down"):
            expected = getattr(single.experts, name).grad[block]
            torch.testing.assert_close(part["grads"][f"experts.{name}"], expected, rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(part["grads"]["router.gate.weight"], single.router.gate.weight.grad)


def _unequal_rank(rank, world_size):
    layer = parallelize_moe(_layer("maxscore", "sequence"))
    x = torch.randn(BATCH + rank, LENGTH, DIM)  # rank 1 holds one sequence more
    layer(x)


@pytest.mark.distributed
def test_unequal_local_batches_raise_at_the_first_exchange():
    with pytest.raises(Exception, match="the ranks' local batches differ"):
        spawn(_unequal_rank, 2, timeout_s=60)


def test_transpose_blocks_regroups_rows_by_expert_and_back():
    """The variable exchange's regrouping: (source, expert) blocks -> (expert, source) blocks,
    empty blocks included, against a row-by-row reference; the reverse restores the rows."""
    counts_RX = torch.tensor([[2, 0, 3], [1, 4, 0]])  # 2 sources x 3 local experts
    rows = torch.arange(int(counts_RX.sum()), dtype=torch.float32)[:, None].repeat(1, 2)
    starts = (counts_RX.flatten().cumsum(0) - counts_RX.flatten()).view(2, 3)
    expected = [
        int(starts[r, e]) + i for e in range(3) for r in range(2) for i in range(int(counts_RX[r, e]))
    ]
    moved = _transpose_blocks(rows, counts_RX)
    assert moved[:, 0].long().tolist() == expected
    assert torch.equal(_transpose_blocks(moved, counts_RX.T), rows)
