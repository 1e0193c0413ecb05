"""Why the first GPU check's Triton rows lose to SDPA, and what sampling gains from the fixes at hand: one JSON line
per row, printed and appended as it is measured (a cut run keeps its rows). Run after `bench/gpu_check.sh` showed
(2026-12-04, H200) the Triton attention at batch 32 taking ~1.1 ms fwd+bwd at every head dim while SDPA takes
0.21-0.24 ms, and the DiT-XL/2 train step 1.86x slower with the Triton kernels than with SDPA + compile.

  (a) attention, XL/2 shape (16 heads, D = 72, 256 tokens), bf16, batch 32 and 256: per call, the host's time to
      issue it (`host_us`, no sync), the wall time of back-to-back calls (`wall_us`) and the GPU's kernel time from
      torch.profiler (`kernel_us`); forward alone and forward + backward; the Triton kernels through the custom op
      and called directly (`triton_raw`: no dispatcher), beside SDPA. host ≈ wall ≫ kernel means launch-bound.
  (b) DiT-XL/2 sampling, 8 Heun steps, CFG 1.5 (16 NFE), bf16 eager, batch 1 and 32, per attention/norm backend.
  (c) one network call under torch.compile(mode="reduce-overhead") (CUDA graphs, SDPA attention): its compile
      time and ms per call at the CFG batches of 1 and 32 images, beside the same call eager: what a sampler
      that compiles the network once (not 16 unrolled calls) would give.

    python3 bench/gpu_diagnose.py --out diagnose.jsonl [--parts a,b,c]
"""

import argparse
import json
import time

import torch


def emit(out, row):
    row = row | {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def per_call(fn, n=50):
    """(host µs to issue one call, wall µs per call back to back, GPU kernel µs per call by the profiler)."""
    for _ in range(min(5, n)):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps := min(10, n)):
            fn()
        torch.cuda.synchronize()
    kernel = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / reps
    launches = sum(e.count for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0) / reps
    return 1e6 * host / n, 1e6 * wall / n, kernel, launches


def part_a(out):
    from lfm_fast import ops
    from lfm_fast.kernels.attention import attention_backward_triton, attention_forward_triton

    H, D, T = 16, 72, 256
    for B in (32, 256):
        qkv = torch.randn(B, T, 3, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
        q, k, v = (qkv[:, :, i].transpose(1, 2).detach() for i in range(3))

        def raw_fwd():
            return attention_forward_triton(q, k, v)

        o, lse = raw_fwd()

        def raw_fwd_bwd():
            o, lse = attention_forward_triton(q, k, v)
            return attention_backward_triton(do.transpose(1, 2), q, k, v, o, lse)

        impls = {"sdpa": lambda x: ops.attention_qkv(x, backend="sdpa"),
                 "triton": lambda x: ops.attention_qkv(x, backend="triton")}
        for name, fn in impls.items():
            with torch.no_grad():
                h, w, kern, n = per_call(lambda: fn(qkv))
            emit(out, {"part": "a", "batch": B, "impl": name, "pass": "fwd", "host_us": h, "wall_us": w, "kernel_us": kern, "launches": n})
            h, w, kern, n = per_call(lambda: torch.autograd.grad(fn(qkv), qkv, do))
            emit(out, {"part": "a", "batch": B, "impl": name, "pass": "fwd+bwd", "host_us": h, "wall_us": w, "kernel_us": kern, "launches": n})
        for name, fn in {"fwd": raw_fwd, "fwd+bwd": raw_fwd_bwd}.items():
            h, w, kern, n = per_call(fn)
            emit(out, {"part": "a", "batch": B, "impl": "triton_raw", "pass": name, "host_us": h, "wall_us": w, "kernel_us": kern, "launches": n})


def xl_model():
    from lfm_fast.generate import cast_token_path
    from lfm_fast.models.dit import build_dit
    torch.manual_seed(0)
    return cast_token_path(build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).cuda().eval(), torch.bfloat16)


def part_b(out, model):
    from lfm_fast.models.dit import set_backends
    from lfm_fast.sampling import per_image_noise, sample

    for attn, norm in (("triton", "triton"), ("sdpa", "triton"), ("sdpa", "compile")):
        set_backends(model, attn, norm)
        for batch in (1, 32):
            noise = per_image_noise(list(range(batch)), (4, 32, 32), device="cuda")
            y = torch.arange(batch, device="cuda") % 1000
            with torch.no_grad():
                h, w, kern, n = per_call(lambda: sample(model, noise, y, solver="heun", steps=8, cfg=1.5), n=3)
            emit(out, {"part": "b", "attn": attn, "norm": norm, "batch": batch, "nfe": 16, "ms_per_batch": w / 1e3,
                       "ms_per_image": w / 1e3 / batch, "kernel_ms_per_batch": kern / 1e3, "launches": n})


def part_c(out, model):
    from lfm_fast.models.dit import set_backends

    set_backends(model, "sdpa", "compile")
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)
    for images in (1, 32):
        x = torch.randn(2 * images, 4, 32, 32, device="cuda", dtype=next(model.parameters()).dtype)
        t = torch.full((2 * images,), 0.5, device="cuda")
        y = torch.arange(2 * images, device="cuda") % 1001
        with torch.no_grad():
            t0 = time.perf_counter()
            compiled(x, t, y)
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            for fn, name in ((lambda: model(x, t, y), "eager"), (lambda: compiled(x, t, y), "compile-cudagraphs")):
                h, w, kern, n = per_call(fn, n=20)
                emit(out, {"part": "c", "backend": name, "images": images, "rows": 2 * images, "ms_per_call": w / 1e3,
                           "kernel_ms_per_call": kern / 1e3, "launches": n, "first_call_s": first if name != "eager" else None,
                           "ms_per_image_16nfe": 16 * w / 1e3 / images})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--parts", default="a,b,c")
    a = p.parse_args()
    parts = a.parts.split(",")
    if "a" in parts:
        part_a(a.out)
    if {"b", "c"} & set(parts):
        model = xl_model()
        if "b" in parts:
            part_b(a.out, model)
        if "c" in parts:
            part_c(a.out, model)


if __name__ == "__main__":
    main()
