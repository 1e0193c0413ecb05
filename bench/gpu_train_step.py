"""DiT-XL/2 training step on one GPU (bf16 autocast, AdamW, 4×32×32 latents = 256 px images):
img/s and MFU with the Triton kernels beside SDPA + torch.compile (the baseline runs first). Compile
is per block (one graph the 28 blocks share: seconds, not minutes). One JSON line per row, appended
as it is measured, so a cut run keeps what it measured."""

import argparse
import json
import time

import torch

from lfm_fast.flow import FlowConfig, flow_matching_loss
from lfm_fast.models.dit import build_dit
from lfm_fast.train.parallelize import apply_compile
from lfm_fast.train.throughput import train_flops_per_image


def measure(attn, norm, compile_model, batch, steps=10, warmup=3):
    torch.manual_seed(0)
    model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000, attn_backend=attn, norm_backend=norm).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    if compile_model:
        apply_compile(model)
    fn = model
    x, y = torch.randn(batch, 4, 32, 32, device="cuda"), torch.randint(0, 1000, (batch,), device="cuda")
    g = torch.Generator().manual_seed(0)
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", torch.bfloat16):
            loss = flow_matching_loss(fn, x, y, FlowConfig(), g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    flops = train_flops_per_image(model.config) * batch / seconds
    return {"attn_backend": attn, "norm_backend": norm, "compile": compile_model, "batch": batch,
            "img_per_s": batch / seconds, "step_ms": 1e3 * seconds, "tflops": flops / 1e12,
            "mfu_vs_989_tflops": flops / 989e12, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="JSON-lines file, appended to row by row")
    p.add_argument("--batch", type=int, default=32)
    a = p.parse_args()
    for attn, norm, comp in [("sdpa", "compile", True), ("triton", "triton", True), ("triton", "triton", False)]:
        torch.cuda.reset_peak_memory_stats()
        row = measure(attn, norm, comp, a.batch) | {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
