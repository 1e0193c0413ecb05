#!/usr/bin/env bash
# Run from the repository root on a CUDA machine (it installs the checkout with pip -e first):
#   OUT=DIR bash bench/gpu_check.sh 1 && OUT=DIR bash bench/gpu_check.sh 2     # results: DIR/*.jsonl, DIR/partN.log
# then commit the JSON lines under bench/results/gpu/ (the default OUT) and their numbers in bench/REPORT.md.
#
# The GPU check: parts that each fit one call of the lent GPU machine (one H200; 15 minutes of device time a
# session in all, the machine's start of a few minutes included). A part runs whole under one `timeout` (290 s,
# killed 5 s later: ≤ 295 s wall, install and imports included); each step in it runs under its own timeout
# (+5 s to kill), the fixed limits and the last step's, which gets what is left, ending 10 s before the bound.
# Parts 1 and 2 (≤ 10 minutes) and the start fit 15 minutes: run part 2 right after part 1, on the machine
# part 1 warmed (it goes back 30 s after a call). Rows come most valuable first, except the compile backend's (last: see part 2).
#
#   OUT=DIR bash bench/gpu_check.sh 1   # (1) kernels vs SDPA / torch.compile, batch 256 then 32, each Triton row
#                                       #     with its relative error against the baseline (kernels.jsonl);
#                                       # (2) DiT-XL/2 train step: SDPA+compile, Triton+compile, Triton eager
#                                       #     (train_step.jsonl)
#   OUT=DIR bash bench/gpu_check.sh 2   # (3) DiT-XL/2 bf16 sampling, 16 NFE, eager, batch 1 and 32 (sampling.jsonl);
#                                       # (4) one FSDP2 run, `lfm-fast train --nproc 1`, no checkpoint (fsdp.jsonl);
#                                       # then (3) with the compile backend in what is left: it compiles the
#                                       # network once per batch size (~30 s each for DiT-XL/2; the whole
#                                       # unrolled sampler, compiled until 2026-12-04, did not finish in 200 s),
#                                       # so it runs last, where a cut costs no other row
#   OUT=DIR bash bench/gpu_check.sh 3   # only if part 2 cut the compile rows, on the still warm machine, with
#                                       # ≥ 5 min of device time left: (3) with the compile backend, batch 1
#                                       # and 32, given a whole part's time
#
# With the device tool: run `bash bench/gpu_check.sh 1` (its $OUT is set there) with timeout_s 300, then the
# next part likewise. Every row is printed as it is measured and appended to its JSON-lines file under $OUT;
# all output also goes to $OUT/partN.log, and each step ends with a line `== NAME: rc=… after …s` (timings to
# size the next check by). A failed or cut step keeps its rows and the next step runs; the part exits 1 if any
# step failed. Install offline: --no-build-isolation (an isolated build would fetch setuptools from an index the
# machine cannot reach) and --no-deps (torch and triton are the machine's own); wheels the machine lacks can be
# carried in a folder named by $WHEELS.
set -uo pipefail
PART=${1:?usage: OUT=DIR bash bench/gpu_check.sh 1|2|3}
BOUND=290
case "$PART" in 1|2|3) ;; *) echo "part must be 1, 2 or 3" >&2; exit 2 ;; esac
if [ -z "${GPU_CHECK_DEADLINE:-}" ]; then  # the outer bound: the whole part, install and imports included
  export GPU_CHECK_DEADLINE=$(( $(date +%s) + BOUND - 10 ))  # every step ends by here (+ its 5 s kill)
  exec timeout -k 5 "$BOUND" bash "${BASH_SOURCE[0]}" "$@"
fi
OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
unset TRITON_INTERPRET
failed="" running=""

step() {  # step NAME LIMIT_S|rest COMMAND...: COMMAND under `timeout LIMIT_S`; rest: until the deadline
  local name=$1 limit=$2 t0 rc
  shift 2
  t0=$(date +%s)
  if [ "$limit" = rest ]; then limit=$(( GPU_CHECK_DEADLINE - t0 )); fi
  if [ "$limit" -lt 10 ]; then echo "== $name: skipped, ${limit}s left"; failed="$failed $name"; return 1; fi
  echo "== $name (≤ ${limit}s): $*"
  timeout -k 5 "$limit" "$@" &
  running=$!
  wait "$running"
  rc=$?
  running=""
  echo "== $name: rc=$rc after $(( $(date +%s) - t0 ))s"
  [ "$rc" = 0 ] || failed="$failed $name"
  return "$rc"
}

part() {  # cut at the bound: stop the running step (its own timeout keeps it in another process group), say so
  trap 'echo "== part $PART: cut at its bound of ${BOUND}s"; [ -z "$running" ] || kill -TERM "$running"; exit 124' TERM
  # shellcheck disable=SC2086  # $WHEELS/*.whl: the carried wheels, if any
  step install 30 python3 -m pip install -q --no-index --disable-pip-version-check --no-deps --no-build-isolation \
    ${WHEELS:+$WHEELS/*.whl} -e . || { echo "== part $PART: stopped, the install failed"; return 1; }
  step nvidia-smi 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  case "$PART" in
    1)
      step kernels 100 python3 bench/gpu_kernels.py --out "$OUT/kernels.jsonl" --batches 256,32
      step train-step rest python3 bench/gpu_train_step.py --out "$OUT/train_step.jsonl" --batch 32 --steps 8 --warmup 2
      ;;
    2|3)
      if [ "$PART" = 2 ]; then
        step sampling-eager 45 python3 bench/gpu_sampling.py --out "$OUT/sampling.jsonl" --backends eager --batches 1,32
        step fsdp 115 python3 bench/fsdp_scaling.py --arch DiT-XL/2 --batch 64 --nproc 1 --configs compile \
          --steps 6 --warmup 2 --out "$OUT/fsdp.jsonl"
      fi
      step sampling-compile rest python3 bench/gpu_sampling.py --out "$OUT/sampling.jsonl" --backends compile \
        --batches 1,32 --reps 5
      ;;
  esac
  if [ -n "$failed" ]; then echo "== part $PART: failed:$failed"; return 1; fi
  echo "== part $PART: all steps passed"
}

part 2>&1 | (trap '' TERM; tee "$OUT/part$PART.log")  # tee outlives the cut, to log its last line
