#!/usr/bin/env bash
# The GPU checks of the routing engine in one go (about 8 minutes on one H100/H200):
# the `gpu` tests (the device engine's Triton kernel compiled for the GPU), the
# engine benchmark (cold/warm x topk, launches and device-to-host copies per warm call,
# fallbacks, price steps and augmentations, exactness), a profile of the engine's calls and of
# the routers' forwards, the layer benchmark (routing x GShard), the random sweep of shapes
# (bench_sweep.py, the kernel on CUDA), training tokens/s per router at the small preset, eager
# and compiled.  The `gpu` tests include a routing step under torch.cuda.set_sync_debug_mode("error")
# and the router's forward captured in a CUDA graph against eager (tests/routers/test_cuda_graph.py).
#   bash benchmarks/gpu_check.sh [tag]      # tag names the result files, default h100
# Needs a CUDA build of torch (it brings Triton), transformers, scipy and pytest in $PY (default
# python3) and a C compiler for the solver core; nothing is downloaded (GPU machines are often
# offline).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
tag=${1:-h100}
stamp=$(date +%Y%m)
out=benchmarks/results
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device')"
"$PY" -c "import triton; print('triton', triton.__version__)"
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
# the kernels compiled for this GPU against the host engine (a failure is logged, the benchmarks still run)
"$PY" -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests_${tag}_${stamp}.log" || echo "gpu tests FAILED"
"$PY" benchmarks/bench_engine.py --device cuda --budget 0.5 \
    --out "$out/engine_fused_${tag}_${stamp}.json" --md "$out/engine_fused_${tag}_${stamp}.md"
# deferred checks (the routers' CUDA mode: no host fallback) where the eager engine falls back:
# many experts, cold and warm, next to the host core
"$PY" benchmarks/bench_engine.py --device cuda --budget 0.5 --sizes 16x4096x160x8,16x4096x384x8 \
    --distributions std1+bias \
    --out "$out/engine_deferred_${tag}_${stamp}.json" --md "$out/engine_deferred_${tag}_${stamp}.md"
"$PY" benchmarks/profile_engine.py --device cuda --calls 20 > "$out/profile_engine_${tag}_${stamp}.md"
"$PY" benchmarks/bench_layer.py --device cuda --rounds 5 \
    --out "$out/layer_engine_${tag}_${stamp}.json" --md "$out/layer_engine_${tag}_${stamp}.md"
# the random sweep: the host core on single groups and batches, the kernel on 24 batches of 32 groups
"$PY" benchmarks/bench_sweep.py --shapes 40 --batches 16 --device-kernel 24 \
    --out "$out/sweep_${tag}_${stamp}.json" --md "$out/sweep_${tag}_${stamp}.md"
"$PY" benchmarks/bench_parallel.py --device cuda --presets small --worlds 1 --routings sequence \
    --routers gshard,maxscore,flow_only,quantile --steps 10 \
    --out "$out/throughput_${tag}_${stamp}.json" --md "$out/throughput_${tag}_${stamp}.md"
# compiled training (each block torch.compile(fullgraph=True)) against eager, maxscore and gshard
"$PY" benchmarks/bench_parallel.py --device cuda --presets small --worlds 1 --routings sequence \
    --routers gshard,maxscore --steps 10 --compile \
    --out "$out/train_compile_${tag}_${stamp}.json" --md "$out/train_compile_${tag}_${stamp}.md"
if [ -n "${OUT:-}" ]; then cp "$out"/*_"${tag}"_"${stamp}".* "$OUT"/; fi
