"""Kernel benchmarks at DiT-B/2, L/2 and XL/2 shapes (batch 32, 256 tokens): forward, backward, full.

Rows: eager PyTorch, torch.compile of the same expression, SDPA (attention), and the Triton kernels
(CUDA only; skipped on CPU). Each row records TFLOP/s (attention; FLOPs = 2 × multiply-adds, forward
4·B·H·T²·D, backward 2.5× that) or GB/s (adaLN: bytes read + written) in extra_info; compare rows of
one run as ratios.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from lfm_fast import ops

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
BATCH, TOKENS = 32, 256
SHAPES = {"B/2": (768, 12), "L/2": (1024, 16), "XL/2": (1152, 16)}  # hidden size, heads
ROUNDS = 20 if CUDA else 3


def _sync():
    if CUDA:
        torch.cuda.synchronize()


def eager_attention(q, k, v):
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s.float(), dim=-1).to(q.dtype) @ v


def eager_modulate(x, shift, scale):
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale[:, None]) + shift[:, None]


def eager_gated_modulate(x, gate, y, shift, scale):
    out = x + gate[:, None] * y
    return out, eager_modulate(out, shift, scale)


_compiled = {}


def compiled(fn):
    if fn not in _compiled:
        _compiled[fn] = torch.compile(fn, dynamic=False)
    return _compiled[fn]


def attention_impl(name):
    if name == "triton":
        if not CUDA:
            pytest.skip("Triton kernels are timed on CUDA only")
        return lambda q, k, v: ops.attention(q, k, v, backend="triton")
    return {"eager": eager_attention, "compile": compiled(eager_attention), "sdpa": F.scaled_dot_product_attention}[name]


def norm_impl(name, fused):
    if name == "triton":
        if not CUDA:
            pytest.skip("Triton kernels are timed on CUDA only")
        if fused:
            return lambda *a: ops.gated_residual_modulate(*a, backend="triton")
        return lambda *a: ops.adaln_modulate(*a, backend="triton")
    fn = eager_gated_modulate if fused else eager_modulate
    return fn if name == "eager" else compiled(fn)


def run_mode(benchmark, fn, inputs, mode):
    """Time fwd, bwd or both. Gradients come from torch.autograd.grad: a repeated backward into the
    leaves' .grad would add an accumulation pass to every backward and pull all ratios toward 1."""
    def forward():
        out = fn(*inputs)
        return out if isinstance(out, tuple) else (out,)

    grads = [torch.randn_like(o) for o in forward()]
    if mode == "fwd":
        def step():
            with torch.no_grad():
                forward()
            _sync()
    elif mode == "bwd":
        outs = forward()

        def step():
            torch.autograd.grad(outs, inputs, grads, retain_graph=True)
            _sync()
    else:
        def step():
            torch.autograd.grad(forward(), inputs, grads)
            _sync()
    for _ in range(2):  # warm up (compiles on first call)
        step()
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1)
    return benchmark.stats.stats.mean


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["eager", "compile", "sdpa", "triton"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_attention(benchmark, shape, impl, mode):
    hidden, heads = SHAPES[shape]
    d = hidden // heads
    fn = attention_impl(impl)
    # the DiT's layout: q, k, v are views of one (B, T, 3, H, D) projection (a copy to contiguous counts)
    qkv = torch.randn(BATCH, TOKENS, 3, heads, d, device=DEVICE, dtype=DTYPE, requires_grad=True)
    seconds = run_mode(benchmark, lambda x: fn(*(x[:, :, i].transpose(1, 2) for i in range(3))), (qkv,), mode)
    flops = 4 * BATCH * heads * TOKENS**2 * d * {"fwd": 1.0, "bwd": 2.5, "full": 3.5}[mode]
    benchmark.extra_info.update(kernel="attention", shape=shape, impl=impl, mode=mode, head_dim=d,
                                tflops=flops / seconds / 1e12, device=DEVICE, dtype=str(DTYPE))


@pytest.mark.parametrize("mode", ["fwd", "bwd", "full"])
@pytest.mark.parametrize("impl", ["eager", "compile", "triton"])
@pytest.mark.parametrize("fused", [False, True], ids=["modulate", "gated_modulate"])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_adaln(benchmark, shape, fused, impl, mode):
    hidden, _ = SHAPES[shape]
    fn = norm_impl(impl, fused)

    def t(*s):
        return torch.randn(*s, device=DEVICE, dtype=DTYPE, requires_grad=True)

    inputs = (t(BATCH, TOKENS, hidden), t(BATCH, hidden), t(BATCH, TOKENS, hidden), t(BATCH, hidden), t(BATCH, hidden)) \
        if fused else (t(BATCH, TOKENS, hidden), t(BATCH, hidden), t(BATCH, hidden))
    seconds = run_mode(benchmark, fn, inputs, mode)
    n = BATCH * TOKENS * hidden * torch.finfo(DTYPE).bits // 8
    # tensors of (B, T, D) moved: modulate fwd x→y (2), bwd dy, x → dx (3); fused fwd x, y → out, h (4), bwd 6
    moved = {(False, "fwd"): 2, (False, "bwd"): 3, (True, "fwd"): 4, (True, "bwd"): 6}
    passes = moved[(fused, "fwd")] + moved[(fused, "bwd")] if mode == "full" else moved[(fused, mode)]
    benchmark.extra_info.update(kernel="adaln_fused" if fused else "adaln", shape=shape, impl=impl, mode=mode,
                                gbps=passes * n / seconds / 1e9, device=DEVICE, dtype=str(DTYPE))
