#!/usr/bin/env bash
# The GPU check, one script (< 10 minutes on an H200): bf16 correctness of the Triton kernels, kernel
# throughput beside SDPA / torch.compile, the DiT-XL/2 training step, and DiT-XL/2 under FSDP2. JSON and logs go to $OUT
# (default bench/results/gpu). Run from the repository root on a machine with CUDA:
#   OUT=bench/results/gpu bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
python3 -m pip install -q --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-deps -e .
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
timeout 150 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout 200 python3 -m pytest -q bench/test_kernels.py --benchmark-only -p no:cacheprovider \
  --benchmark-json="$OUT/kernels.json" --benchmark-columns=mean,stddev 2>&1 | tail -70 | tee "$OUT/kernels.log"
timeout 150 python3 bench/gpu_train_step.py --out "$OUT/train_step.json" 2>&1 | tee "$OUT/train_step.log"
timeout 150 python3 bench/gpu_sampling.py --out "$OUT/sampling.json" 2>&1 | tee "$OUT/sampling.log"
# FSDP2 through the real launcher on one GPU: DiT-XL/2, 4×32×32 latents (256 px), bf16, img/s and MFU vs 989 TFLOP/s
timeout 240 python3 bench/fsdp_scaling.py --arch DiT-XL/2 --batch 64 --nproc 1 --configs eager,compile --steps 10 \
  --warmup 4 --out "$OUT/fsdp_xl2.json" 2>&1 | tee "$OUT/fsdp_xl2.log"
