"""Kernel throughput on a GPU, one JSON line per row as it is measured (a cut run keeps its rows).

Attention fwd+bwd TFLOP/s at DiT-B/2, L/2 and XL/2 head dims (64, 64, 72), the Triton kernels beside
SDPA (its flash/cuDNN kernel); adaLN (gated residual + modulate, the DiT block's fused pair) GB/s
fwd+bwd beside torch.compile of the same expression and beside the H200's 4.8 TB/s. Batch 32 and
256, 256 tokens (256-px images), bf16. Baselines run first in each group, and each Triton row carries
its difference from the baseline's outputs and gradients (`err_vs_baseline`: the largest max|a − b| /
max|b| over them), so a fast wrong kernel shows in the same row. Timed with `triton.testing.do_bench` (L2 flushed between
reps, median). Gradients come from `torch.autograd.grad`, never accumulated into a leaf's `.grad`
(which adds a pass to every backward).

    python3 bench/gpu_kernels.py --out kernels.jsonl [--batches 32,256]
"""

import argparse
import json

import torch
import torch.nn.functional as F

from lfm_fast import ops

SHAPES = {"B/2": (768, 12), "L/2": (1024, 16), "XL/2": (1152, 16)}  # hidden size, heads
TOKENS = 256
HBM_BYTES_PER_S = 4.8e12  # H200


def fwd_bwd(fn, inputs, cotangents):
    """One forward + backward; returns the outputs and the input gradients."""
    def step():
        outs = fn(*inputs)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return (*outs, *torch.autograd.grad(outs, inputs, cotangents))
    return step


def timed_rows(impls, inputs, cotangents, row):
    """Time each impl (the baseline first); the others' rows get their relative difference from the baseline."""
    import triton.testing

    reference = None
    for impl, fn in impls.items():
        step = fwd_bwd(fn, inputs, cotangents)
        results = step()
        if reference is None:
            reference, err = results, {}
        else:
            err = {"err_vs_baseline": max(((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
                                          for a, b in zip(results, reference))}
        yield row(impl, triton.testing.do_bench(step, warmup=25, rep=100)) | err


def attention_rows(batch, dtype):
    for shape, (hidden, heads) in SHAPES.items():
        d = hidden // heads
        qkv = torch.randn(batch, TOKENS, 3, heads, d, device="cuda", dtype=dtype, requires_grad=True)
        do = torch.randn(batch, TOKENS, heads, d, device="cuda", dtype=dtype)
        flops = 4 * batch * heads * TOKENS**2 * d * 3.5  # forward 1 + backward 2.5
        impls = {"sdpa": lambda x: ops.attention_qkv(x, backend="sdpa"),
                 "triton": lambda x: ops.attention_qkv(x, backend="triton")}
        yield from timed_rows(impls, [qkv], [do], lambda impl, ms: {
            "kernel": "attention", "shape": shape, "head_dim": d, "batch": batch, "impl": impl, "ms": ms,
            "tflops": flops / ms / 1e9})


def eager_gated_modulate(x, gate, y, shift, scale):
    out = x + gate[:, None] * y
    return out, F.layer_norm(out, out.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def adaln_rows(batch, dtype):
    compiled = torch.compile(eager_gated_modulate, dynamic=False)
    for shape, (hidden, _) in SHAPES.items():
        def t(*s):
            return torch.randn(*s, device="cuda", dtype=dtype, requires_grad=True)
        inputs = [t(batch, TOKENS, hidden), t(batch, hidden), t(batch, TOKENS, hidden), t(batch, hidden), t(batch, hidden)]
        cot = [torch.randn(batch, TOKENS, hidden, device="cuda", dtype=dtype) for _ in range(2)]
        n = batch * TOKENS * hidden * torch.finfo(dtype).bits // 8
        moved = 10 * n  # the minimum: forward reads x, y, writes out, h; backward reads 4, writes 2
        impls = {"compile": compiled, "triton": lambda *a: ops.gated_residual_modulate(*a, backend="triton")}
        yield from timed_rows(impls, inputs, cot, lambda impl, ms: {
            "kernel": "adaln_fused", "shape": shape, "hidden": hidden, "batch": batch, "impl": impl, "ms": ms,
            "gbps": moved / ms / 1e6, "fraction_of_hbm": moved / ms / 1e-3 / HBM_BYTES_PER_S})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON-lines file, appended to row by row")
    p.add_argument("--batches", default="32,256", help="comma-separated batch sizes")
    a = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    import triton

    machine = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    with open(a.out, "a") as f:
        for batch in (int(b) for b in a.batches.split(",")):
            for rows in (attention_rows(batch, torch.bfloat16), adaln_rows(batch, torch.bfloat16)):
                for row in rows:
                    line = json.dumps(row | machine)
                    print(line, flush=True)
                    f.write(line + "\n")
                    f.flush()


if __name__ == "__main__":
    main()
