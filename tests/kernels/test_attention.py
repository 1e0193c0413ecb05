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


# batch/head strides at bh = 3 up to T = 64; many key blocks, full ones and a ragged last one (T = 300), at bh = 1,
# where the interpreter takes seconds instead of the 25 s that 9 heads take
CASES = [(bh, t, d) for d in (32, 64, 72, 128) for t in (1, 17, 64, 300) for bh in (1, 3) if not (bh == 3 and t == 300)]
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


def test_log_sum_exp_is_in_log2_units_and_matches_reference():
    from lfm_fast.kernels.attention import LOG2E, attention_forward_triton

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn((2, 2, 45, 72), generator=g) for _ in range(3))
    o, lse2 = attention_forward_triton(q, k, v)
    ro, rlse2 = attention_reference(q, k, v)
    natural = torch.logsumexp(torch.einsum("bhqd,bhkd->bhqk", q, k) / 72 ** 0.5, dim=-1)
    torch.testing.assert_close(rlse2, natural * LOG2E)
    torch.testing.assert_close(lse2, rlse2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o, ro, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("D", [72, 64])
def test_packed_qkv_views_are_read_in_place_and_the_gradient_comes_back_packed(D):
    """The DiT's layout: q, k, v are views of one (B, T, 3, H, D) projection; O is (B, T, H, D)."""
    from lfm_fast.kernels.attention import flash_attention_qkv

    g = torch.Generator().manual_seed(D)
    B, T, H = 2, 37, 3
    qkv = torch.randn((B, T, 3, H, D), generator=g)
    do = torch.randn((B, T, H, D), generator=g)
    ref_in = qkv.clone().requires_grad_(True)
    q, k, v = (ref_in[:, :, i].transpose(1, 2) for i in range(3))
    ref = naive_attention(q, k, v).transpose(1, 2)
    ref.backward(do)
    got_in = qkv.clone().requires_grad_(True)
    got = flash_attention_qkv(got_in)
    got.backward(do)
    assert got.shape == (B, T, H, D) and got.is_contiguous()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got_in.grad, ref_in.grad, rtol=1e-4, atol=1e-4)
    # the unpacked entry point on the same strided views gives O as a view of (B, T, H, D) memory
    o = flash_attention(*(qkv[:, :, i].transpose(1, 2) for i in range(3)))
    assert o.transpose(1, 2).is_contiguous()
    torch.testing.assert_close(o.transpose(1, 2), ref.detach(), rtol=1e-4, atol=1e-4)


def test_mixed_dtypes_are_cast_to_one_and_under_autocast_to_the_autocast_dtype():
    """qk_norm under autocast gives fp32 q/k beside a bf16 v (the case that crashed the backward)."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn((1, 2, 33, 64), generator=g) for _ in range(4))
    qq, kk = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    vv = v.half().requires_grad_(True)
    out = flash_attention(qq, kk, vv)  # no autocast: the widest dtype (fp32)
    assert out.dtype == torch.float32
    out.backward(do)
    assert qq.grad.dtype == torch.float32 and vv.grad.dtype == torch.float16
    ref = run(naive_attention, q, k, v.half().float(), do)
    torch.testing.assert_close(vv.grad.float(), ref[3], rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(qq.grad, ref[1], rtol=1e-4, atol=1e-4)
    with torch.autocast("cpu", dtype=torch.float16):
        out = flash_attention(q.requires_grad_(True), k, v.half())
    assert out.dtype == torch.float16
    out.float().backward(do)
    assert q.grad.dtype == torch.float32 and q.grad.abs().sum() > 0


@pytest.mark.parametrize("layout", ["batch", "head"])
def test_offsets_past_two_to_the_31_elements_are_exact(layout):
    """Sample 2 at batch stride 2³⁰ starts 2³¹ elements in ("batch"); head 1 at head stride 2³¹
    ("head", a stride that itself exceeds int32). 32-bit offset arithmetic would wrap in either.
    Virtual memory keeps the 4 GiB storage cheap (only the touched rows get pages)."""
    from lfm_fast.kernels.attention import attention_backward_triton, attention_forward_triton

    T, D = 20, 16
    shape, strides = ((3, 1, T, D), (2**30, T * D, D, 1)) if layout == "batch" else ((1, 2, T, D), (2 * T * D, 2**31, D, 1))
    storage = torch.empty(2**31 + T * D, dtype=torch.float16)
    big = storage.as_strided(shape, strides)
    g = torch.Generator().manual_seed(4)
    small = torch.randn(shape, generator=g).half()
    do = torch.randn(shape, generator=g).half()
    big.copy_(small)
    o_big, lse_big = attention_forward_triton(big, big, big)
    o_small, lse_small = attention_forward_triton(small, small, small)
    assert torch.equal(o_big, o_small) and torch.equal(lse_big, lse_small)
    g_big = attention_backward_triton(do, big, big, big, o_big, lse_big)
    g_small = attention_backward_triton(do, small, small, small, o_small, lse_small)
    assert all(torch.equal(a, b) for a, b in zip(g_big, g_small))


def test_every_head_dim_has_configs_whose_tiles_cover_it():
    """Every head dim 1..256 gets a non-empty config set for every kernel (the autotuner would fall
    back to a config without BLOCK_M/BLOCK_N), and the split covers D with power-of-two dots ≥ 16."""
    from lfm_fast.kernels.attention import configs_for, head_split

    for D in range(1, 257):
        d0, d1 = head_split(D)
        assert d0 + d1 >= D and d0 >= 16 and d0 & (d0 - 1) == 0 and (d1 == 0 or (d1 >= 16 and d1 & (d1 - 1) == 0))
        for kernel in ("fwd", "dkdv", "dq"):
            configs = configs_for(kernel, D)
            assert configs and all({"BLOCK_M", "BLOCK_N"} <= set(c.kwargs) for c in configs), (kernel, D)
