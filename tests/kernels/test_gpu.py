"""bf16 on a real GPU (the interpreter cannot check bf16 arithmetic). Skipped without CUDA."""

import pytest
import torch

from tests.kernels.conftest import low_precision_tolerance

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _grads(fn, inputs, cot):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, cot)
    return [o.detach().float() for o in outs] + [t.grad.float() for t in inputs]


@pytest.mark.parametrize("T,D", [(256, 64), (256, 72), (300, 128), (1024, 64), (17, 32)])
def test_flash_attention_bf16_against_fp32(T, D):
    from lfm_fast.kernels.attention import flash_attention

    g = torch.Generator(device="cuda").manual_seed(T + D)
    q, k, v, do = (torch.randn((4, 8, T, D), device="cuda", generator=g) for _ in range(4))
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def fp64(q, k, v):
        q, k, v = q.double(), k.double(), v.double()
        return (torch.softmax(q @ k.transpose(-1, -2) / D**0.5, dim=-1) @ v).float()

    ref = _grads(fp64, [q, k, v], [do])
    low = _grads(sdpa, [t.bfloat16() for t in (q, k, v)], [do.bfloat16()])
    got = _grads(flash_attention, [t.bfloat16() for t in (q, k, v)], [do.bfloat16()])
    for name, a, lo, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        err, tol = (a - r).abs().max().item(), low_precision_tolerance(lo, r, 1e-3)
        assert err <= tol, f"{name}: {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("T,D", [(256, 1152), (256, 1024), (17, 72)])
def test_adaln_bf16_against_fp32(T, D):
    from lfm_fast.kernels.adaln import gated_residual_modulate

    def torch_fn(x, gate, y, shift, scale):
        out = x + gate[:, None] * y
        h = torch.nn.functional.layer_norm(out.float(), out.shape[-1:], eps=1e-6).to(out.dtype)
        return out, h * (1 + scale[:, None]) + shift[:, None]

    g = torch.Generator(device="cuda").manual_seed(T + D)
    inputs = [torch.randn(s, device="cuda", generator=g) for s in ((8, T, D), (8, D), (8, T, D), (8, D), (8, D))]
    cot = [torch.randn((8, T, D), device="cuda", generator=g) for _ in range(2)]
    ref = _grads(torch_fn, [t.double() for t in inputs], [c.double() for c in cot])
    low = _grads(torch_fn, [t.bfloat16() for t in inputs], [c.bfloat16() for c in cot])
    got = _grads(gated_residual_modulate, [t.bfloat16() for t in inputs], [c.bfloat16() for c in cot])
    for i, (a, lo, r) in enumerate(zip(got, low, ref)):
        err, tol = (a - r.float()).abs().max().item(), low_precision_tolerance(lo, r.float(), 1e-2)
        assert err <= tol, f"output/grad {i}: {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("D", [64, 72])
def test_packed_qkv_bf16_and_tf32_off_for_fp32(D):
    """The DiT's packed layout in bf16, and fp32 inputs in IEEE precision (TF32 would miss 1e-4)."""
    from lfm_fast.kernels.attention import flash_attention, flash_attention_qkv

    g = torch.Generator(device="cuda").manual_seed(D)
    qkv = torch.randn((4, 256, 3, 16, D), device="cuda", generator=g)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / D**0.5, dim=-1) @ v.double()
    got = flash_attention_qkv(qkv.bfloat16()).transpose(1, 2)
    low = torch.nn.functional.scaled_dot_product_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    tol = low_precision_tolerance(low.float(), ref.float(), 1e-3)
    assert (got.float() - ref.float()).abs().max().item() <= tol
    torch.backends.cuda.matmul.allow_tf32 = False
    assert (flash_attention(q, k, v).double() - ref).abs().max().item() < 1e-4
