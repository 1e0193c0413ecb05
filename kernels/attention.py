"""Non-causal flash attention, forward and backward (Dao et al. 2022/2023), in Triton.

Layout (B, H, T, D), any T (masked tails), any head dim up to 256 (a head dim that is not a power of
two is padded by masking inside the kernel, never by copying). Softmax runs online in fp32 in the
log2 domain; the backward recomputes P from the saved log-sum-exp, with the Δ = rowsum(dO·O) pre-pass.

Registered as the custom op `lfm_fast::flash_attention` (forward) with autograd through
`lfm_fast::flash_attention_bwd`: CUDA runs the Triton kernels; CPU runs the reference, or the same
Triton kernels under TRITON_INTERPRET=1 (how the tests check the kernels without a GPU).
"""

from __future__ import annotations

import math

import torch

from lfm_fast.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the reference path
    triton = None

LOG2E = 1.4426950408889634


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ/√d) v, natural-log log-sum-exp per query row) in fp32, output cast to q's dtype."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse


def attention_backward_reference(do, q, k, v, o, lse):
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = torch.exp(torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale - lse[..., None])
    dv = torch.einsum("bhqk,bhqd->bhkd", p, dof)
    dp = torch.einsum("bhqd,bhkd->bhqk", dof, vf)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


if triton is not None:

    @triton.jit
    def _load_rows(ptr, base, rows, stride_t, cols, mask, UPCAST: tl.constexpr):
        """A (rows, head dim) tile, zero outside `mask`; bf16 upcast to fp32 under the interpreter."""
        tile = tl.load(ptr + base + rows[:, None] * stride_t + cols[None, :], mask=mask, other=0.0)
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, T, D, sm_scale_log2,
                         stride_b, stride_h, stride_t, lse_stride_bh,
                         H: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                         UPCAST: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        base = (bh // H) * stride_b + (bh % H) * stride_h
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < T
        mask_d = offs_d < D
        q = _load_rows(Q, base, offs_m, stride_t, offs_d, mask_m[:, None] & mask_d[None, :], UPCAST)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, T, BLOCK_N):
            n = start_n + offs_n
            mask_n = n < T
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_rows(K, base, n, stride_t, offs_d, kv_mask, UPCAST)
            v = _load_rows(V, base, n, stride_t, offs_d, kv_mask, UPCAST)
            s = tl.dot(q, tl.trans(k)) * sm_scale_log2
            s = tl.where(mask_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + base + offs_m[:, None] * stride_t + offs_d[None, :], acc.to(O.dtype.element_ty),
                 mask=mask_m[:, None] & mask_d[None, :])
        # log-sum-exp in natural log units (the reference's convention)
        tl.store(LSE + bh * lse_stride_bh + offs_m, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=mask_m)

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, T, D, stride_b, stride_h, stride_t, H: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        base = (bh // H) * stride_b + (bh % H) * stride_h
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_m < T)[:, None] & (offs_d < D)[None, :]
        o = tl.load(O + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        do = tl.load(DO + base + offs_m[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DELTA + bh * T + offs_m, tl.sum(o * do, 1), mask=offs_m < T)

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, T, D, sm_scale,
                              stride_b, stride_h, stride_t, H: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        """One block of keys/values against every query block: dV = Pᵀ dO, dK = scale · dSᵀ Q."""
        pid_n = tl.program_id(0)
        bh = tl.program_id(1)
        base = (bh // H) * stride_b + (bh % H) * stride_h
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_n = offs_n < T
        mask_d = offs_d < D
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_rows(K, base, offs_n, stride_t, offs_d, kv_mask, UPCAST)
        v = _load_rows(V, base, offs_n, stride_t, offs_d, kv_mask, UPCAST)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        for start_m in range(0, T, BLOCK_M):
            m = start_m + offs_m
            mask_m = m < T
            q_mask = mask_m[:, None] & mask_d[None, :]
            q = _load_rows(Q, base, m, stride_t, offs_d, q_mask, UPCAST)
            do = _load_rows(DO, base, m, stride_t, offs_d, q_mask, UPCAST)
            lse = tl.load(LSE + bh * T + m, mask=mask_m, other=0.0)
            delta = tl.load(DELTA + bh * T + m, mask=mask_m, other=0.0)
            # Pᵀ for this tile: (BLOCK_N, BLOCK_M); padded queries and keys contribute nothing
            s_t = tl.dot(k, tl.trans(q)) * sm_scale
            p_t = tl.exp(s_t - lse[None, :])
            p_t = tl.where(mask_m[None, :] & mask_n[:, None], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
        tl.store(DK + base + offs_n[:, None] * stride_t + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + base + offs_n[:, None] * stride_t + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, D, sm_scale,
                            stride_b, stride_h, stride_t, H: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
        """One block of queries against every key block: dQ = scale · dS K."""
        pid_m = tl.program_id(0)
        bh = tl.program_id(1)
        base = (bh // H) * stride_b + (bh % H) * stride_h
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < T
        mask_d = offs_d < D
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = _load_rows(Q, base, offs_m, stride_t, offs_d, q_mask, UPCAST)
        do = _load_rows(DO, base, offs_m, stride_t, offs_d, q_mask, UPCAST)
        lse = tl.load(LSE + bh * T + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=mask_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start_n in range(0, T, BLOCK_N):
            n = start_n + offs_n
            mask_n = n < T
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_rows(K, base, n, stride_t, offs_d, kv_mask, UPCAST)
            v = _load_rows(V, base, n, stride_t, offs_d, kv_mask, UPCAST)
            p = tl.exp(tl.dot(q, tl.trans(k)) * sm_scale - lse[:, None])
            p = tl.where(mask_n[None, :], p, 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + base + offs_m[:, None] * stride_t + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _blocks(T: int, D: int) -> tuple[int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    block = 64 if block_d <= 64 else 32
    if interpreting():  # the interpreter's cost grows with tile size; small tiles keep tests fast
        block = 16 if T <= 16 else 32
    return block, block, block_d


def _check(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash attention expects q, k, v of one shape (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > 256:
        raise ValueError(f"flash attention supports head dims up to 256, got {q.shape[-1]}")


def _upcast(dtype: torch.dtype) -> bool:
    # The interpreter computes bf16 arithmetic wrongly: load bf16, compute in fp32 there.
    return dtype == torch.bfloat16 and interpreting()


def attention_forward_triton(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    _check(q, k, v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    B, H, T, D = q.shape
    o = torch.empty_like(q)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    bm, bn, bd = _blocks(T, D)
    grid = (triton.cdiv(T, bm), B * H)
    _attn_fwd_kernel[grid](q, k, v, o, lse, T, D, LOG2E / math.sqrt(D), q.stride(0), q.stride(1), q.stride(2), T,
                           H=H, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=_upcast(q.dtype))
    return o, lse


def attention_backward_triton(do, q, k, v, o, lse):
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    B, H, T, D = q.shape
    bm, bn, bd = _blocks(T, D)
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    _attn_bwd_delta_kernel[(triton.cdiv(T, bm), B * H)](o, do, delta, T, D, q.stride(0), q.stride(1), q.stride(2),
                                                         H=H, BLOCK_M=bm, BLOCK_D=bd)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    scale, up = 1.0 / math.sqrt(D), _upcast(q.dtype)
    strides = (q.stride(0), q.stride(1), q.stride(2))
    _attn_bwd_dkdv_kernel[(triton.cdiv(T, bn), B * H)](q, k, v, do, lse, delta, dk, dv, T, D, scale, *strides,
                                                       H=H, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=up)
    _attn_bwd_dq_kernel[(triton.cdiv(T, bm), B * H)](q, k, v, do, lse, delta, dq, T, D, scale, *strides,
                                                     H=H, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, UPCAST=up)
    return dq, dk, dv


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or interpreting())


@torch.library.custom_op("lfm_fast::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(q):
        return attention_forward_triton(q, k, v)
    o, lse = attention_reference(q, k, v)
    return o.contiguous(), lse.contiguous()


# Fake outputs are contiguous, like every real one (empty_like would copy a permuted input's strides).
@flash_attention_op.register_fake
def _(q, k, v):
    return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("lfm_fast::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(q):
        return attention_backward_triton(do, q, k, v, o, lse)
    return tuple(g.contiguous() for g in attention_backward_reference(do, q, k, v, o, lse))


@flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)


def _backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return flash_attention_bwd_op(do, q, k, v, o, lse)


flash_attention_op.register_autograd(_backward, setup_context=_setup_context)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v on (B, H, T, D), differentiable; Triton on CUDA (and under the interpreter)."""
    return flash_attention_op(q, k, v)[0]
