"""The fused kernels compile for a Hopper GPU (sm_90) without one, with Triton's own ptxas, and
fit in registers (no spills to local memory) at the tile sizes the engine launches them with.
The interpreter tests check what the kernels compute; this checks that a GPU can run them.

The compilation runs in a child process without ``TRITON_INTERPRET`` (this process imported the
kernels interpreted, see conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from maxscore.solvers.exact.dense import WARPS, _blocks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
pytestmark = pytest.mark.skipif(
    not os.path.exists(os.path.join(NVIDIA_BIN, "ptxas")), reason="Triton without its NVIDIA toolchain"
)


def _compile(fn, types: dict, constants: dict, num_warps: int):
    """The cubin of ``fn`` for sm_90, compiled in Triton's interpreter-free path."""
    signature = {name: "constexpr" if name in constants else types[name] for name in fn.arg_names}
    positions = {(fn.arg_names.index(name),): value for name, value in constants.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=positions)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def _stack_bytes(compiled) -> int:
    """The kernel's stack frame (spilled registers live there), from cuobjdump's resource usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run(
            [os.path.join(NVIDIA_BIN, "cuobjdump"), "-res-usage", f.name], capture_output=True, text=True
        ).stdout
    finally:
        os.unlink(f.name)
    usage = next(line for line in out.splitlines() if "STACK:" in line)
    return int(usage.split("STACK:")[1].split()[0])


@pytest.mark.parametrize(
    ("scores", "k", "num_tokens", "num_experts"),
    # E = 160 and 384 (DeepSeek-V2, Kimi K2): the [E, E] repair scratch lives in global memory,
    # the kernel's vectors over the experts in registers
    [
        ("fp32", 2, 512, 16),
        ("bf16", 8, 4096, 64),
        ("fp64", 2, 512, 16),
        ("bf16", 8, 4096, 160),
        ("bf16", 8, 4096, 384),
    ],
)
def test_kernels_compile_for_sm90_and_fit_in_registers(scores, k, num_tokens, num_experts):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    call = f"compile_all({scores!r}, {k}, {num_tokens}, {num_experts})"
    code = f"from tests.solvers.test_kernels_compile import compile_all; {call}"
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert child.returncode == 0, child.stderr[-3000:]
    stacks = json.loads(child.stdout.strip().splitlines()[-1])
    if scores != "fp64":  # the training cases: no spills (float64 scores may spill a little)
        assert stacks == {"route": 0}, stacks


def compile_all(scores: str, k: int, num_tokens: int, num_experts: int) -> None:
    """Compiles the kernel as the engine launches it on a GPU; prints its stack bytes as JSON."""
    from maxscore.solvers.exact import kernels

    compute = "fp64" if scores == "fp64" else "fp32"
    block_n, block_e = _blocks(num_tokens, num_experts)
    types = dict(
        s_ptr=f"*{scores}", valid_ptr="*u8", cap_ptr="*i64", num_valid_ptr="*i64", p_in_ptr="*fp64",
        p_out_ptr="*fp64", experts_ptr="*i64", loads_ptr="*i64", stats_ptr="*fp64", flags_ptr="*i32",
        theta_ptr=f"*{compute}", edges_ptr="*fp64", edge_tokens_ptr="*i32", N="i32", E="i32", steps="i32",
        damping="fp32", stop="i32", max_augment="i32", tolerance="fp32",
    )  # fmt: skip
    constants = dict(
        K=k, BLOCK_N=block_n, BLOCK_E=block_e, HAS_VALID=True, MAX_BISECT=kernels.MAX_BISECT,
        COMPUTE=kernels.COMPUTE[compute], STEPS_ONLY=False,
    )  # fmt: skip
    route = _compile(kernels.route_kernel, types, constants, WARPS)
    print(json.dumps({"route": _stack_bytes(route)}))
