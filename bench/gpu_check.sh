#!/usr/bin/env bash
# The GPU check, in two parts that each fit one call of the lent GPU machine (limits: 600 s per
# call, 15 minutes of device time in all including the machine's start, at most 8 result files per
# call). Part 1 is ≤ 5 minutes and part 2 ≤ 5.5 by their own timeouts, so both fit one session's 15
# minutes with the start (a few minutes) but leave no room to rerun either: run part 1 first (the
# kernels), part 2 if time is left. Each writes ≤ 3 files; every measurement is a JSON line appended
# as soon as it is measured, so a cut run still returns rows.
# Baselines run before the Triton rows in every group (the row most likely cut is ours, not theirs).
#
#   OUT=/some/dir bash bench/gpu_check.sh 1   # install, bf16 kernel tests, kernel throughput  (≤ 5 min)
#   OUT=/some/dir bash bench/gpu_check.sh 2   # install, DiT-XL/2 train step, 1-GPU FSDP2 MFU (≤ 5.5 min)
#
# Install offline: --no-build-isolation (an isolated build would fetch setuptools from an index the
# machine cannot reach) and --no-deps (torch and triton are the machine's own). Wheels the machine
# lacks (diffusers) can be carried in a folder named by $WHEELS. Stops on a failed install.
set -uo pipefail
PART=${1:?usage: OUT=DIR bash bench/gpu_check.sh 1|2}
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
log="$OUT/part$PART.log"
(
  pip="python3 -m pip install -q --no-index --disable-pip-version-check --no-deps"
  if [ -n "${WHEELS:-}" ]; then $pip "$WHEELS"/*.whl || exit 1; fi
  $pip --no-build-isolation -e . || { echo "install failed"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
) > "$log" 2>&1 || { tail -30 "$log"; exit 1; }
case "$PART" in
  1)
    # correctness needs no tuning: the first config of each set (LFM_FAST_AUTOTUNE=0) compiles once
    LFM_FAST_AUTOTUNE=0 timeout 90 python3 -m pytest -q -m gpu tests/kernels -p no:cacheprovider >> "$log" 2>&1
    timeout 180 python3 bench/gpu_kernels.py --out "$OUT/kernels.jsonl" --batches 32,256 >> "$log" 2>&1
    ;;
  2)
    timeout 170 python3 bench/gpu_train_step.py --out "$OUT/train_step.jsonl" --batch 32 >> "$log" 2>&1
    # FSDP2 through the real launcher on one GPU: DiT-XL/2, 256 px, bf16, img/s and MFU; rows print as measured
    timeout 130 python3 bench/fsdp_scaling.py --arch DiT-XL/2 --batch 64 --nproc 1 --configs compile --steps 8 \
      --warmup 3 --out "$OUT/fsdp_xl2.json" >> "$log" 2>&1
    ;;
  *) echo "part must be 1 or 2" >&2; exit 2 ;;
esac
tail -40 "$log"
