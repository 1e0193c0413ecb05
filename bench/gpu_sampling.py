"""DiT-XL/2 sampling latency on one GPU: 8 Heun steps with CFG 1.5 (16 NFE), bf16 with its per-sample path
fp32 (`cast_token_path`) and the default backends (auto: SDPA attention, Triton norms in eager), eager `sample` beside
the compile backend (`compile_sampler`: on CUDA the network alone under torch.compile, mode="reduce-overhead" =
CUDA graphs), batch 1 and 32. One JSON line per row, printed and appended as it is measured; the rows run
backend by backend in the order given (eager first: it is cheap), and each row reports its first call as
`first_call_s` (for the compile backend: the network's cold compile, 31 s for DiT-XL/2 on an H200; a new batch
size compiles again).

    python3 bench/gpu_sampling.py --out sampling.jsonl [--backends eager,compile] [--batches 1,32] [--reps 10]
"""

import argparse
import json
import time

import torch

STEPS, CFG = 8, 1.5


def timed(fn, reps, warmup=2):
    """(seconds of the first call, mean seconds of `reps` calls after `warmup` more; CUDA graphs record there)."""
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return first, (time.perf_counter() - start) / reps


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file, appended to row by row")
    p.add_argument("--backends", default="eager,compile", help="comma-separated, from eager, compile")
    p.add_argument("--batches", default="1,32", help="comma-separated batch sizes")
    p.add_argument("--reps", type=int, default=10, help="timed calls per row")
    a = p.parse_args()
    backends = a.backends.split(",")
    if set(backends) - {"eager", "compile"}:
        p.error(f"--backends {a.backends}: expected names from eager, compile")

    from lfm_fast.export.sampler import compile_sampler
    from lfm_fast.generate import cast_token_path
    from lfm_fast.models.dit import build_dit
    from lfm_fast.sampling import SampleConfig, per_image_noise, sample

    torch.manual_seed(0)
    model = cast_token_path(build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).cuda().eval(), torch.bfloat16)
    compiled, nfe = compile_sampler(model, SampleConfig(solver="heun", steps=STEPS, cfg=CFG))
    meta = {"model": "DiT-XL/2", "dtype": "bf16 (per-sample path fp32)", "solver": "heun", "steps": STEPS, "cfg": CFG,
            "nfe": nfe, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for backend in backends:
        for batch in map(int, a.batches.split(",")):
            noise = per_image_noise(list(range(batch)), (4, 32, 32), device="cuda")
            y = torch.arange(batch, device="cuda") % 1000
            if backend == "eager":
                fn = lambda: sample(model, noise, y, solver="heun", steps=STEPS, cfg=CFG)  # noqa: E731
            else:
                fn = lambda: compiled(noise, y)  # noqa: E731
            with torch.no_grad():
                first, s = timed(fn, a.reps)
            row = {"backend": backend, "batch": batch, "ms_per_batch": 1e3 * s, "ms_per_image": 1e3 * s / batch,
                   "img_per_s": batch / s, "ms_per_nfe": 1e3 * s / nfe, "first_call_s": first, "reps": a.reps, **meta}
            print(json.dumps(row), flush=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
