"""DiT-XL/2 training step on one GPU (bf16 autocast, AdamW, 4×32×32 latents = 256 px images): img/s and
MFU with the Triton kernels beside SDPA + torch.compile (the baseline runs first), then the Triton kernels
without compile. Compile is per block (one graph the 28 blocks share: tens of seconds cold, not minutes);
the model is built once on the CPU and copied for each row. One JSON line per row, printed and appended as
it is measured, so a cut run keeps what it measured.

    python3 bench/gpu_train_step.py --out train_step.jsonl [--batch 32] [--steps 8] [--warmup 2]
"""

import argparse
import copy
import gc
import json
import time

import torch

from lfm_fast.flow import FlowConfig, flow_matching_loss
from lfm_fast.models.dit import build_dit, set_backends
from lfm_fast.train.parallelize import apply_compile
from lfm_fast.train.throughput import train_flops_per_image

ROWS = [("sdpa", "compile", True), ("triton", "triton", True), ("triton", "triton", False)]  # baseline first


def measure(base, attn, norm, compile_model, batch, steps, warmup):
    model = set_backends(copy.deepcopy(base), attn, norm).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if compile_model:
        apply_compile(model)
    x, y = torch.randn(batch, 4, 32, 32, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(model, x, y, FlowConfig(), g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = train_flops_per_image(model.config) * batch / seconds
    return {"attn_backend": attn, "norm_backend": norm, "compile": compile_model, "batch": batch, "steps_timed": steps,
            "img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "tflops": flops / 1e12,
            "mfu_vs_989_tflops": flops / 989e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30,
            "warmup_s": start - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file, appended to row by row")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=8, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (the compile happens in the first)")
    a = p.parse_args()
    torch.manual_seed(0)
    base = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)
    for attn, norm, comp in ROWS:
        gc.collect()  # the last row's model and optimizer state
        torch.cuda.reset_peak_memory_stats()
        row = measure(base, attn, norm, comp, a.batch, a.steps, a.warmup)
        line = json.dumps(row | {"device": torch.cuda.get_device_name(), "torch": torch.__version__})
        print(line, flush=True)
        with open(a.out, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
