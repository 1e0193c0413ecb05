import math

import pytest
import torch

from lfm_fast.kernels.attention import attention_reference, flash_attention
from tests.kernels.conftest import low_precision_tolerance


def naive_attention(q, k, v):
    """PyTorch ops in the inputs' own dtype (the low-precision baseline of the tolerance rule)."""
    s = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    return torch.softmax(s, dim=-1) @ v


def run(fn, q, k, v, do):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), q.grad, k.grad, v.grad


# batch/head strides at bh = 3 up to T = 64; many key blocks and a ragged last one (T = 256, 300) at bh = 1, where
# the interpreter takes seconds instead of the 25 s that 9 heads take
CASES = [(bh, t, d) for d in (32, 64, 72, 128) for t in (1, 17, 64, 256, 300) for bh in (1, 3) if not (bh == 3 and t >= 256)]
CASES += [(1, 17, 96), (1, 300, 96), (2, 1, 256)]  # DiT-B/2-like head dim 96; the largest head dim


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bh,T,D", CASES)
def test_flash_attention_forward_and_gradients(bh, T, D, dtype):
    g = torch.Generator().manual_seed(T * 1000 + D)
    q, k, v, do = (torch.randn((bh, bh, T, D), generator=g) for _ in range(4))
    ref = run(naive_attention, q, k, v, do)  # fp32 reference
    got = run(flash_attention, *(t.to(dtype) for t in (q, k, v, do)))
    if dtype == torch.float32:
        tols = [1e-4] * 4
    else:
        low = run(naive_attention, *(t.to(dtype) for t in (q, k, v, do)))
        tols = [low_precision_tolerance(lo, r, 2e-3) for lo, r in zip(low, ref)]
    for name, a, r, tol in zip(("out", "dq", "dk", "dv"), got, ref, tols):
        err = (a.float() - r).abs().max().item()
        assert err <= tol, f"{name}: error {err:.2e} > tolerance {tol:.2e}"


def test_bf16_inputs_are_computed_in_fp32_under_the_interpreter():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn((1, 2, 33, 64), generator=g) for _ in range(3))
    out = flash_attention(*(t.bfloat16() for t in (q, k, v)))
    ref, _ = attention_reference(*(t.bfloat16() for t in (q, k, v)))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref.float()).abs().max() < 2e-2


def test_log_sum_exp_matches_reference():
    from lfm_fast.kernels.attention import attention_forward_triton

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn((2, 2, 45, 72), generator=g) for _ in range(3))
    o, lse = attention_forward_triton(q, k, v)
    ro, rlse = attention_reference(q, k, v)
    torch.testing.assert_close(lse, rlse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-4)
