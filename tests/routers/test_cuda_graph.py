"""On CUDA: a steady-state routing step makes no host synchronization, and a router's forward
captured in a CUDA graph replays equal to eager (Megatron-Core graphs its router scope; newer
torchtitan graphs whole steps).  Skipped without CUDA; ``benchmarks/gpu_check.sh`` runs them.

The routers that solve on the device do so with ``validate="deferred"``: the device engine
finishes every group on the device and the bad input it finds waits for ``check_routing``; with
``validate="eager"`` a call reads the engine's flags on the host."""

from __future__ import annotations

import pytest
import torch

from maxscore import MoELayer, check_routing

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
ROUTERS = ["gshard", "switch", "expert_choice", "maxscore", "flow_only"]


def _layer(router: str) -> MoELayer:
    torch.manual_seed(0)
    return MoELayer(64, 128, 16, 1 if router == "switch" else 2, router=router).cuda()


@pytest.mark.parametrize("router", ROUTERS)
def test_a_steady_state_routing_step_makes_no_host_sync(router):
    layer = _layer(router)
    x = torch.randn(8, 256, 64, device="cuda")
    for _ in range(3):  # warm-up: first-call allocations, Triton compilation
        layer(x).output.sum().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = layer(x)
        (out.output.square().mean() + out.aux_loss).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("router", ROUTERS)
def test_the_captured_router_replays_equal_to_eager(router):
    router_module = _layer(router).router.eval()
    static_x = torch.randn(2048, 64, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(3):
            router_module(static_x, sequence_length=256)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        captured = router_module(static_x, sequence_length=256)
    fresh = torch.randn(2048, 64, device="cuda")
    static_x.copy_(fresh)
    graph.replay()
    with torch.no_grad():
        eager = router_module(fresh, sequence_length=256)
    assert torch.equal(captured.experts, eager.experts)
    torch.testing.assert_close(captured.weights, eager.weights)


def test_bad_input_on_cuda_is_raised_at_the_check():
    layer = _layer("maxscore")
    x = torch.randn(2, 256, 64, device="cuda")
    x[1, 5, 0] = float("nan")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        layer(x)  # recorded on the device: no error, no wait
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with pytest.raises(ValueError, match=r"^router: router logits contain NaN or inf \(group 1, token 5\)"):
        check_routing(layer)
