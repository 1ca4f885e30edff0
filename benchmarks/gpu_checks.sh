#!/usr/bin/env bash
# The CUDA checks of the project as one script for a GPU machine (issue 18, point 5), in order of worth, each
# under its own time limit so that one that overruns leaves the others' results:
#   1. the CUDA tests (every test that a CPU-only run skips for want of CUDA; the Triton-interpreter tests of
#      tests/test_ops_gpu.py are CPU tests, marked slow, and left out);
#   2. whole networks: ipfx's deployment form on CUDA against cuDNN (benchmarks/deploy_gpu.py), eager engines
#      over resnet50 and mobilenet_v3_large at 95/99%, batch 1/32, fp32/bf16;
#   3. the same with torch.compile (default and reduce-overhead) of the dense and the fused form, fp32, 95%;
#   4. per layer: the Triton kernel against cuDNN (benchmarks/fused_gpu.py).
#
#   OUT=/tmp/gpu benchmarks/gpu_checks.sh      # writes log.txt, deploy-gpu.md/.json, deploy-gpu-compile.md/.json,
#                                              # fused-gpu.md under $OUT
# Uses the python3 on the PATH with this checkout's ipfx (no install): torch, torchvision, triton and pytest
# must be there. Runs in about 8 minutes on one H200 (the limits below add up to 9.5).
set -uo pipefail
OUT=${OUT:-/tmp/ipfx-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log="$OUT/log.txt"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cudnn', torch.backends.cudnn.version())"
  nproc; } 2>&1 | tee "$log"
step() { local limit=$1; shift; echo "== $* (limit ${limit}s)" | tee -a "$log"; local t=$SECONDS
         timeout "$limit" "$@" 2>&1 | tee -a "$log" | tail -40; echo "== rc ${PIPESTATUS[0]} in $((SECONDS - t))s" | tee -a "$log"; }
step 120 python3 -m pytest -p no:cacheprovider -q -rs -m "not slow" tests/test_ops_gpu.py tests/test_accel.py \
    tests/test_interop.py -k "cuda or inputs_gpu"
step 200 python3 benchmarks/deploy_gpu.py --no-compile --budget 150 --rounds 7 --calls 20 --out "$OUT/deploy-gpu.md"
step 150 python3 benchmarks/deploy_gpu.py --cudagraphs --sparsities 0.95 --dtypes fp32 --budget 100 --rounds 5 \
    --calls 20 --out "$OUT/deploy-gpu-compile.md"
step 100 python3 benchmarks/fused_gpu.py --reps 20 --out "$OUT/fused-gpu.md"
