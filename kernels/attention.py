"""Non-causal flash attention, forward and backward (Dao et al. 2022/2023), in Triton.

Inputs are (B, H, T, D) tensors of **any strides** with a unit last stride: the DiT hands over views
of its qkv projection, (B, T, 3, H, D) memory, and gets O back in (B, T, H, D) memory, so nothing is
copied on either side (`flash_attention_qkv` also returns dq, dk, dv in one packed buffer, which is
the qkv projection's own gradient layout). Any T; head dims up to 256.

How the kernels meet the tensor cores (checked on this CPU by `bench/ptx_report.py`, which compiles
them for sm_90a and counts `wgmma` and load widths in the PTX):
- The head dim is a compile-time constant, split into a power-of-two main part and a power-of-two
  tail (D = 72 is a 64-wide plus a 16-wide dot, 8 of its 16 columns masked; 96 = 64 + 32), never
  padded to the next power of two (which would do 44 % padding work at D = 72).
- Strides carry an alignment hint (the largest power of two ≤ 16 dividing them), so rows load as
  16-byte vectors and `cp.async` pipelines them even when D is not a multiple of 16.
- BLOCK_M/BLOCK_N/warps/stages are autotuned per (T, D, dtype) from a small fixed set per head-dim
  class, chosen so that sm_90 uses `wgmma` with 16-byte loads and (at D ≤ 128) nothing spills.
- In the inner loops only the last, ragged key (or query) block is masked; full blocks load and
  compute unmasked. (Each program's own tile is loaded with a row mask, and a tail's columns past
  the head dim are masked, which keeps the 16-byte vectors.)
- The (batch, head) base offsets are int64, strides included (offsets inside one (batch, head)
  slice stay 32-bit, checked); the grid is one axis (limit 2³¹ − 1, not 65,535).
- Softmax runs online in fp32 in the log2 domain; the log-sum-exp is saved in log2 units and the
  backward recomputes P with exp2, after a Δ = rowsum(dO·O) pre-pass; dK/dV and dQ are separate
  kernels (no atomics: results are deterministic).
- fp32 inputs use IEEE fp32 dots; TF32 only if `torch.backends.cuda.matmul.allow_tf32` is set.

Registered as the custom op `lfm_fast::flash_attention` (and `lfm_fast::flash_attention_qkv`), each
with a backward custom op; the Python entry points cast mixed inputs to one dtype (the autocast dtype
under autocast, so a qk-normed fp32 q/k beside a bf16 v is legal). `torch.library.custom_op`, not `triton_op`: with the copies gone there
is nothing left around the kernel for Inductor to fuse, and the op must also run its reference on CPU.
CUDA runs the Triton kernels; CPU runs the reference, or the same kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import math
import os

import torch

from lfm_fast.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs without triton still get the reference path
    triton = None

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax(q kᵀ/√d) v, log2-unit log-sum-exp of the log2-scaled scores per query row) in fp32, the
    output cast to q's dtype."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) / math.sqrt(q.shape[-1])
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("bhqk,bhkd->bhqd", torch.exp(s - lse[..., None]), v.float()).to(q.dtype), lse * LOG2E


def attention_backward_reference(do, q, k, v, o, lse2):
    scale = 1.0 / math.sqrt(q.shape[-1])
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    p = torch.exp(torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale - lse2[..., None] / LOG2E)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, dof)
    dp = torch.einsum("bhqd,bhkd->bhqk", dof, vf)
    delta = (dof * o.float()).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf) * scale
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def head_split(D: int) -> tuple[int, int]:
    """(main, tail) widths, both powers of two ≥ 16: main ≤ D is the largest such, tail covers the
    rest (0 when D is a power of two). 72 → (64, 16), 80 → (64, 16), 96 → (64, 32), 128 → (128, 0)."""
    main = max(16, 1 << (D.bit_length() - 1))
    rest = D - main
    return main, (0 if rest <= 0 else max(16, 1 << (rest - 1).bit_length()))


def stride_alignment(*strides: int) -> int:
    """The largest power of two ≤ 16 dividing every stride (elements): the kernels' vector-width hint."""
    align = 16
    while align > 1 and any(s % align for s in strides):
        align //= 2
    return align


if triton is not None:

    @triton.jit
    def _rows(ptr, rows, stride_t, T, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_D: tl.constexpr,
              MASK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
        """The (rows, WIDTH) tile of columns [COL0, COL0 + WIDTH); masked only where it must be (rows
        past T in a ragged block, columns past the head dim in the tail); bf16 upcast under the
        interpreter (whose bf16 arithmetic is wrong)."""
        cols = COL0 + tl.arange(0, WIDTH)
        ptrs = ptr + rows[:, None] * stride_t + cols[None, :]
        if MASK_ROWS:
            if COL0 + WIDTH > HEAD_D:
                tile = tl.load(ptrs, mask=(rows < T)[:, None] & (cols < HEAD_D)[None, :], other=0.0)
            else:
                tile = tl.load(ptrs, mask=(rows < T)[:, None], other=0.0)
        else:
            if COL0 + WIDTH > HEAD_D:
                tile = tl.load(ptrs, mask=(cols < HEAD_D)[None, :], other=0.0)
            else:
                tile = tl.load(ptrs)
        if UPCAST:
            tile = tile.to(tl.float32)
        return tile

    @triton.jit
    def _split_rows(ptr, rows, stride_t, T, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                    MASK_ROWS: tl.constexpr, UPCAST: tl.constexpr):
        """The main and tail column tiles of rows (the tail is the main tile again when D1 = 0, unused)."""
        main = _rows(ptr, rows, stride_t, T, 0, D0, HEAD_D, MASK_ROWS, UPCAST)
        tail = main
        if D1 > 0:
            tail = _rows(ptr, rows, stride_t, T, D0, D1, HEAD_D, MASK_ROWS, UPCAST)
        return main, tail

    @triton.jit
    def _store_rows(ptr, rows, stride_t, T, tile, COL0: tl.constexpr, WIDTH: tl.constexpr, HEAD_D: tl.constexpr):
        cols = COL0 + tl.arange(0, WIDTH)
        mask = (rows < T)[:, None]
        if COL0 + WIDTH > HEAD_D:
            mask = mask & (cols < HEAD_D)[None, :]
        tl.store(ptr + rows[:, None] * stride_t + cols[None, :], tile.to(ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _base(ptr, b, h, stride_b, stride_h, ALIGN: tl.constexpr):
        """ptr + b·stride_b + h·stride_h in int64 (strides arrive divided by ALIGN, see _strides)."""
        return ptr + b * stride_b.to(tl.int64) * ALIGN + h * stride_h.to(tl.int64) * ALIGN

    @triton.jit
    def _program(T, BLOCK: tl.constexpr, H: tl.constexpr):
        """(batch, head, block) of this program on a one-axis grid of (B·H) × ⌈T / BLOCK⌉ programs;
        batch and head as int64."""
        n_blocks = tl.cdiv(T, BLOCK)
        pid = tl.program_id(0).to(tl.int64)
        bh = pid // n_blocks
        return bh // H, bh % H, bh, (pid % n_blocks).to(tl.int32)

    @triton.jit
    def _fwd_step(q0, q1, k_base, v_base, skt, svt, n, T, m_i, l_i, acc0, acc1, qk_scale,
                  HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASKED: tl.constexpr,
                  UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        k0 = _rows(k_base, n, skt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        if D1 > 0:
            k1 = _rows(k_base, n, skt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
        s = s * qk_scale
        if MASKED:
            s = tl.where((n < T)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v0 = _rows(v_base, n, svt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=PRECISION)
        if D1 > 0:
            v1 = _rows(v_base, n, svt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=PRECISION)
        return m_new, l_i, acc0, acc1

    @triton.jit
    def _attn_fwd_kernel(Q, K, V, O, LSE, T, qk_scale,
                         sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                         H: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                         ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        b, h, bh, pid_m = _program(T, BLOCK_M, H)
        sqt, skt, svt, sot = sqt * ALIGN, skt * ALIGN, svt * ALIGN, sot * ALIGN
        k_base = _base(K, b, h, skb, skh, ALIGN)
        v_base = _base(V, b, h, svb, svh, ALIGN)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q_base = _base(Q, b, h, sqb, sqh, ALIGN)
        q0, q1 = _split_rows(q_base, offs_m, sqt, T, HEAD_D, D0, D1, True, UPCAST)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc0 = tl.zeros([BLOCK_M, D0], tl.float32)
        acc1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        full = (T // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            m_i, l_i, acc0, acc1 = _fwd_step(q0, q1, k_base, v_base, skt, svt, start_n + offs_n, T, m_i, l_i,
                                             acc0, acc1, qk_scale, HEAD_D, D0, D1, False, UPCAST, PRECISION)
        if full < T:
            m_i, l_i, acc0, acc1 = _fwd_step(q0, q1, k_base, v_base, skt, svt, full + offs_n, T, m_i, l_i,
                                             acc0, acc1, qk_scale, HEAD_D, D0, D1, True, UPCAST, PRECISION)
        o_base = _base(O, b, h, sob, soh, ALIGN)
        _store_rows(o_base, offs_m, sot, T, acc0 / l_i[:, None], 0, D0, HEAD_D)
        if D1 > 0:
            _store_rows(o_base, offs_m, sot, T, acc1 / l_i[:, None], D0, D1, HEAD_D)
        tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_i), mask=offs_m < T)

    @triton.jit
    def _attn_bwd_delta_kernel(O, DO, DELTA, T, sob, soh, sot, sdb, sdh, sdt,
                               H: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                               ALIGN: tl.constexpr, BLOCK_M: tl.constexpr):
        """Δ = rowsum(dO · O) in fp32."""
        b, h, bh, pid_m = _program(T, BLOCK_M, H)
        sot, sdt = sot * ALIGN, sdt * ALIGN
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        o_base = _base(O, b, h, sob, soh, ALIGN)
        do_base = _base(DO, b, h, sdb, sdh, ALIGN)
        o0, o1 = _split_rows(o_base, rows, sot, T, HEAD_D, D0, D1, True, True)
        do0, do1 = _split_rows(do_base, rows, sdt, T, HEAD_D, D0, D1, True, True)
        delta = tl.sum(o0 * do0, 1)
        if D1 > 0:
            delta += tl.sum(o1 * do1, 1)
        tl.store(DELTA + bh * T + rows, delta, mask=rows < T)

    @triton.jit
    def _dkdv_step(k0, k1, v0, v1, q_base, do_base, sqt, sdt, LSE_row, DELTA_row, m, T, dk0, dk1, dv0, dv1,
                   qk_scale, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASKED: tl.constexpr,
                   UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        q0 = _rows(q_base, m, sqt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        do0 = _rows(do_base, m, sdt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        if MASKED:
            lse = tl.load(LSE_row + m, mask=m < T, other=0.0)
            delta = tl.load(DELTA_row + m, mask=m < T, other=0.0)
        else:
            lse = tl.load(LSE_row + m)
            delta = tl.load(DELTA_row + m)
        # Pᵀ and dPᵀ for this tile: (BLOCK_N, BLOCK_M)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=PRECISION)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=PRECISION)
        if D1 > 0:
            q1 = _rows(q_base, m, sqt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            do1 = _rows(do_base, m, sdt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            s_t = tl.dot(k1, tl.trans(q1), s_t, input_precision=PRECISION)
            dp_t = tl.dot(v1, tl.trans(do1), dp_t, input_precision=PRECISION)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        if MASKED:  # padded queries (zeros, lse 0) would otherwise give P = 1
            p_t = tl.where((m < T)[None, :], p_t, 0.0)
        ds_t = (p_t * (dp_t - delta[None, :])).to(q0.dtype)
        p_t = p_t.to(do0.dtype)
        dv0 = tl.dot(p_t, do0, dv0, input_precision=PRECISION)
        dk0 = tl.dot(ds_t, q0, dk0, input_precision=PRECISION)
        if D1 > 0:
            dv1 = tl.dot(p_t, do1, dv1, input_precision=PRECISION)
            dk1 = tl.dot(ds_t, q1, dk1, input_precision=PRECISION)
        return dk0, dk1, dv0, dv1

    @triton.jit
    def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, T, qk_scale, sm_scale,
                              sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt,
                              sgkb, sgkh, sgkt, sgvb, sgvh, sgvt,
                              H: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                              ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """One block of keys/values against every query block: dV = Pᵀ dO, dK = scale · dSᵀ Q."""
        b, h, bh, pid_n = _program(T, BLOCK_N, H)
        sqt, skt, svt, sdt = sqt * ALIGN, skt * ALIGN, svt * ALIGN, sdt * ALIGN
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        k_base = _base(K, b, h, skb, skh, ALIGN)
        v_base = _base(V, b, h, svb, svh, ALIGN)
        k0, k1 = _split_rows(k_base, offs_n, skt, T, HEAD_D, D0, D1, True, UPCAST)
        v0, v1 = _split_rows(v_base, offs_n, svt, T, HEAD_D, D0, D1, True, UPCAST)
        q_base = _base(Q, b, h, sqb, sqh, ALIGN)
        do_base = _base(DO, b, h, sdb, sdh, ALIGN)
        LSE_row = LSE + bh * T
        DELTA_row = DELTA + bh * T
        dk0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dv0 = tl.zeros([BLOCK_N, D0], tl.float32)
        dk1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
        dv1 = tl.zeros([BLOCK_N, D1 if D1 > 0 else 16], tl.float32)
        offs_m = tl.arange(0, BLOCK_M)
        full = (T // BLOCK_M) * BLOCK_M
        for start_m in range(0, full, BLOCK_M):
            dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, q_base, do_base, sqt, sdt, LSE_row, DELTA_row,
                                            start_m + offs_m, T, dk0, dk1, dv0, dv1, qk_scale,
                                            HEAD_D, D0, D1, False, UPCAST, PRECISION)
        if full < T:
            dk0, dk1, dv0, dv1 = _dkdv_step(k0, k1, v0, v1, q_base, do_base, sqt, sdt, LSE_row, DELTA_row,
                                            full + offs_m, T, dk0, dk1, dv0, dv1, qk_scale,
                                            HEAD_D, D0, D1, True, UPCAST, PRECISION)
        dk_base = _base(DK, b, h, sgkb, sgkh, ALIGN)
        dv_base = _base(DV, b, h, sgvb, sgvh, ALIGN)
        sgkt, sgvt = sgkt * ALIGN, sgvt * ALIGN
        _store_rows(dk_base, offs_n, sgkt, T, dk0 * sm_scale, 0, D0, HEAD_D)
        _store_rows(dv_base, offs_n, sgvt, T, dv0, 0, D0, HEAD_D)
        if D1 > 0:
            _store_rows(dk_base, offs_n, sgkt, T, dk1 * sm_scale, D0, D1, HEAD_D)
            _store_rows(dv_base, offs_n, sgvt, T, dv1, D0, D1, HEAD_D)

    @triton.jit
    def _dq_step(q0, q1, do0, do1, lse, delta, k_base, v_base, skt, svt, n, T, dq0, dq1, qk_scale,
                 HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr, MASKED: tl.constexpr,
                 UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        k0 = _rows(k_base, n, skt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        v0 = _rows(v_base, n, svt, T, 0, D0, HEAD_D, MASKED, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=PRECISION)
        dp = tl.dot(do0, tl.trans(v0), input_precision=PRECISION)
        if D1 > 0:
            k1 = _rows(k_base, n, skt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            v1 = _rows(v_base, n, svt, T, D0, D1, HEAD_D, MASKED, UPCAST)
            s = tl.dot(q1, tl.trans(k1), s, input_precision=PRECISION)
            dp = tl.dot(do1, tl.trans(v1), dp, input_precision=PRECISION)
        p = tl.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where((n < T)[None, :], p, 0.0)
        ds = (p * (dp - delta[:, None])).to(k0.dtype)
        dq0 = tl.dot(ds, k0, dq0, input_precision=PRECISION)
        if D1 > 0:
            dq1 = tl.dot(ds, k1, dq1, input_precision=PRECISION)
        return dq0, dq1

    @triton.jit
    def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, T, qk_scale, sm_scale,
                            sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdb, sdh, sdt, sgqb, sgqh, sgqt,
                            H: tl.constexpr, HEAD_D: tl.constexpr, D0: tl.constexpr, D1: tl.constexpr,
                            ALIGN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            UPCAST: tl.constexpr, PRECISION: tl.constexpr):
        """One block of queries against every key block: dQ = scale · dS K."""
        b, h, bh, pid_m = _program(T, BLOCK_M, H)
        sqt, skt, svt, sdt = sqt * ALIGN, skt * ALIGN, svt * ALIGN, sdt * ALIGN
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        q_base = _base(Q, b, h, sqb, sqh, ALIGN)
        do_base = _base(DO, b, h, sdb, sdh, ALIGN)
        q0, q1 = _split_rows(q_base, offs_m, sqt, T, HEAD_D, D0, D1, True, UPCAST)
        do0, do1 = _split_rows(do_base, offs_m, sdt, T, HEAD_D, D0, D1, True, UPCAST)
        lse = tl.load(LSE + bh * T + offs_m, mask=offs_m < T, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=offs_m < T, other=0.0)
        k_base = _base(K, b, h, skb, skh, ALIGN)
        v_base = _base(V, b, h, svb, svh, ALIGN)
        dq0 = tl.zeros([BLOCK_M, D0], tl.float32)
        dq1 = tl.zeros([BLOCK_M, D1 if D1 > 0 else 16], tl.float32)
        offs_n = tl.arange(0, BLOCK_N)
        full = (T // BLOCK_N) * BLOCK_N
        for start_n in range(0, full, BLOCK_N):
            dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, k_base, v_base, skt, svt, start_n + offs_n, T,
                                dq0, dq1, qk_scale, HEAD_D, D0, D1, False, UPCAST, PRECISION)
        if full < T:
            dq0, dq1 = _dq_step(q0, q1, do0, do1, lse, delta, k_base, v_base, skt, svt, full + offs_n, T,
                                dq0, dq1, qk_scale, HEAD_D, D0, D1, True, UPCAST, PRECISION)
        dq_base = _base(DQ, b, h, sgqb, sgqh, ALIGN)
        sgqt = sgqt * ALIGN
        _store_rows(dq_base, offs_m, sgqt, T, dq0 * sm_scale, 0, D0, HEAD_D)
        if D1 > 0:
            _store_rows(dq_base, offs_m, sgqt, T, dq1 * sm_scale, D0, D1, HEAD_D)

    # The fixed config sets the autotuner chooses from, per head-dim class (bench/ptx_report.py
    # compiles every member for sm_90a; chosen from a wider grid by the same report): all use wgmma
    # with 16-byte tile loads, and nothing spills up to D = 128 (the D = 256 dK/dV kernel's least
    # spilling configs spill 40 and 120 bytes). (BLOCK_M, BLOCK_N, warps, stages).
    CONFIGS = {
        "fwd": {64: [(128, 64, 4, 3), (128, 128, 8, 2), (64, 64, 4, 3)],
                128: [(64, 64, 4, 3), (128, 128, 8, 2), (64, 128, 4, 2)],
                256: [(64, 64, 4, 2), (64, 32, 4, 2)]},
        "dkdv": {64: [(64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 3)],
                 128: [(64, 64, 4, 1), (32, 64, 4, 3), (64, 64, 8, 2)],
                 256: [(16, 64, 8, 2), (32, 64, 8, 1)]},  # the least spilling (40, 120 B) found at D = 256
        "dq": {64: [(128, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
               128: [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2)],
               256: [(64, 32, 4, 2), (64, 16, 4, 2)]},
    }
    _KERNELS = {"fwd": _attn_fwd_kernel, "dkdv": _attn_bwd_dkdv_kernel, "dq": _attn_bwd_dq_kernel}


def configs_for(kernel: str, D: int) -> list:
    """The autotuner's configs for `kernel` ("fwd", "dkdv", "dq") at head dim D: the set of the
    smallest class (64, 128, 256) that holds the padded width. With a 16-wide tail (D = 72, 80) only
    tiles of ≥ 16 rows per warp stay: a 16-column tile of fewer rows has under 8 elements per thread,
    and its loads would shrink below 16 bytes."""
    d0, d1 = head_split(D)
    sets = CONFIGS[kernel]
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
               for m, n, w, st in sets[min(c for c in sets if c >= d0 + d1)]]
    if d1 == 16:
        wide = [c for c in configs if min(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) >= 16 * c.num_warps]
        configs = wide or configs  # D = 129..144: no such tile fits; the tail's loads narrow instead
    if os.environ.get("LFM_FAST_AUTOTUNE") == "0":  # correctness runs: the first config, no tuning
        configs = configs[:1]
    return configs


_TUNERS: dict = {}


def _tuner(kernel: str, D: int):
    """The autotuner of `kernel` at head dim D (made on first use; it keys on T, D, the alignment and
    the fp32 dot precision, and Triton adds the dtypes). LFM_FAST_AUTOTUNE=0 skips tuning."""
    if (kernel, D) not in _TUNERS:
        _TUNERS[kernel, D] = triton.autotune(configs_for(kernel, D), key=["T", "HEAD_D", "ALIGN", "PRECISION"])(_KERNELS[kernel])
    return _TUNERS[kernel, D]


def _check(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"flash attention expects q, k, v of one shape (B, H, T, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"flash attention supports head dims up to {MAX_HEAD_DIM}, got {q.shape[-1]}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"flash attention kernels take one dtype, got {q.dtype}, {k.dtype}, {v.dtype} "
                         "(flash_attention casts mixed inputs; call it rather than the launcher)")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _strides(t: torch.Tensor, align: int = 1) -> tuple[int, int, int]:
    """Batch, head and token strides divided by `align`: the kernels multiply them back by the
    constexpr ALIGN, which is how the compiler learns their alignment (a hint on a scalar argument is
    dropped) and so emits 16-byte vector loads and cp.async at D = 72."""
    return t.stride(0) // align, t.stride(1) // align, t.stride(2) // align


def _meta(q: torch.Tensor, *tensors: torch.Tensor) -> dict:
    """Compile-time constants shared by the kernels of one call."""
    D, T = q.shape[-1], q.shape[-2]
    if max((T - 1) * t.stride(2) + D for t in (q, *tensors)) >= 2**31:
        raise ValueError(f"flash attention: one (batch, head) slice spans ≥ 2³¹ elements (T = {T}); "
                         "offsets within a slice are 32-bit")
    d0, d1 = head_split(D)
    strides = [s for t in (q, *tensors) for s in _strides(t)]
    return dict(H=q.shape[1], HEAD_D=D, D0=d0, D1=d1, ALIGN=stride_alignment(*strides),
                UPCAST=q.dtype == torch.bfloat16 and interpreting(),
                PRECISION="tf32" if q.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee")


def _interpreter_blocks(T: int) -> dict:
    # the interpreter's cost grows with tile size; small tiles keep the tests fast
    b = 16 if T <= 16 else 32
    return dict(BLOCK_M=b, BLOCK_N=b)


def _run(kernel, rows_key, BH, T, args, meta):
    """Launch on a one-axis grid of (B·H) × blocks of `rows_key` rows: the autotuned kernel on a GPU,
    one small fixed config under the interpreter."""
    if interpreting():
        blocks = _interpreter_blocks(T)
        _KERNELS[kernel][(BH * triton.cdiv(T, blocks[rows_key]),)](*args, **meta, **blocks)
    else:
        _tuner(kernel, meta["HEAD_D"])[lambda c: (BH * triton.cdiv(T, c[rows_key]),)](*args, **meta)


def attention_forward_triton(q, k, v) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, log2-unit LSE); O in (B, T, H, D) memory returned as the (B, H, T, D) view."""
    _check(q, k, v)
    q, k, v = (_unit_last(t) for t in (q, k, v))
    B, H, T, D = q.shape
    o = torch.empty((B, T, H, D), device=q.device, dtype=q.dtype).transpose(1, 2)
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    meta = _meta(q, k, v, o)
    a = meta["ALIGN"]
    args = (q, k, v, o, lse, T, LOG2E / math.sqrt(D), *_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(o, a))
    _run("fwd", "BLOCK_M", B * H, T, args, meta)
    return o, lse


def attention_backward_triton(do, q, k, v, o, lse, out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """(dq, dk, dv), written into `out` (views of any strides with a unit last stride) when given."""
    q, k, v, o, do = (_unit_last(t) for t in (q, k, v, o, do))
    B, H, T, D = q.shape
    if out is None:  # one packed (B, T, 3, H, D) buffer, like the qkv projection's gradient
        packed = torch.empty((B, T, 3, H, D), device=q.device, dtype=q.dtype)
        out = tuple(packed[:, :, i].transpose(1, 2) for i in range(3))
    dq, dk, dv = out
    meta = _meta(q, k, v, o, do, dq, dk, dv)
    delta = torch.empty((B, H, T), device=q.device, dtype=torch.float32)
    bm = _interpreter_blocks(T)["BLOCK_M"] if interpreting() else 64
    a = meta["ALIGN"]
    _attn_bwd_delta_kernel[(B * H * triton.cdiv(T, bm),)](o, do, delta, T, *_strides(o, a), *_strides(do, a),
                                         **{k_: meta[k_] for k_ in ("H", "HEAD_D", "D0", "D1", "ALIGN")}, BLOCK_M=bm)
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))
    common = (*_strides(q, a), *_strides(k, a), *_strides(v, a), *_strides(do, a))
    _run("dkdv", "BLOCK_N", B * H, T,
         (q, k, v, do, lse, delta, dk, dv, T, *scales, *common, *_strides(dk, a), *_strides(dv, a)), meta)
    _run("dq", "BLOCK_M", B * H, T,
         (q, k, v, do, lse, delta, dq, T, *scales, *common, *_strides(dq, a)), meta)
    return dq, dk, dv


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or interpreting())


def _packed_grads(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, T, D = q.shape
    packed = q.new_empty((B, T, 3, H, D))
    return packed, tuple(packed[:, :, i].transpose(1, 2) for i in range(3))


def _forward(q, k, v):
    if _use_triton(q):
        return attention_forward_triton(q, k, v)
    with torch.autocast(q.device.type, enabled=False):  # the reference is fp32, autocast or not
        o, lse = attention_reference(q, k, v)
    return o.transpose(1, 2).contiguous().transpose(1, 2), lse.contiguous()


def _backward(do, q, k, v, o, lse, out):
    if _use_triton(q):
        return attention_backward_triton(do, q, k, v, o, lse, out)
    with torch.autocast(q.device.type, enabled=False):
        grads = attention_backward_reference(do, q, k, v, o, lse)
    for dst, g in zip(out, grads):
        dst.copy_(g)
    return out


def _fake_forward(q):
    B, H, T, D = q.shape
    return q.new_empty((B, T, H, D)).transpose(1, 2), q.new_empty((B, H, T), dtype=torch.float32)


# (q, k, v) of any strides -> (O as a (B, T, H, D)-memory view, log2 LSE) ------------------------------

@torch.library.custom_op("lfm_fast::flash_attention", mutates_args=())
def flash_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v)


@flash_attention_op.register_fake
def _(q, k, v):
    return _fake_forward(q)


@torch.library.custom_op("lfm_fast::flash_attention_bwd", mutates_args=())
def flash_attention_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # three separate buffers: a custom op's outputs may not alias one another
    return _backward(do, q, k, v, o, lse, tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v)))


@flash_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse):
    return tuple(t.new_empty(t.shape) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _flash_backward(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    return flash_attention_bwd_op(do, q, k, v, o, lse)


flash_attention_op.register_autograd(_flash_backward, setup_context=_setup_context)


# packed qkv (B, T, 3, H, D) -> O (B, T, H, D); the gradient comes back packed ------------------------

def _unpack(qkv):
    return tuple(qkv[:, :, i].transpose(1, 2) for i in range(3))


@torch.library.custom_op("lfm_fast::flash_attention_qkv", mutates_args=())
def flash_attention_qkv_op(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    o, lse = _forward(*_unpack(qkv))
    return o.transpose(1, 2), lse


@flash_attention_qkv_op.register_fake
def _(qkv):
    B, T, _, H, D = qkv.shape
    return qkv.new_empty((B, T, H, D)), qkv.new_empty((B, H, T), dtype=torch.float32)


@torch.library.custom_op("lfm_fast::flash_attention_qkv_bwd", mutates_args=())
def flash_attention_qkv_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    q, k, v = _unpack(qkv)
    packed, views = _packed_grads(q)
    _backward(do.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, views)
    return packed


@flash_attention_qkv_bwd_op.register_fake
def _(do, qkv, o, lse):
    return qkv.new_empty(qkv.shape)


def _qkv_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], *output)


def _qkv_backward(ctx, do, dlse):
    qkv, o, lse = ctx.saved_tensors
    return flash_attention_qkv_bwd_op(do, qkv, o, lse)


flash_attention_qkv_op.register_autograd(_qkv_backward, setup_context=_qkv_setup)

def _common_dtype(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Inputs of one dtype: under autocast the autocast dtype (so a LayerNorm-ed fp32 q/k beside a bf16 v
    is legal), else the widest of them. Done before the custom op, so autograd casts the gradients back."""
    if torch.is_autocast_enabled(tensors[0].device.type):
        dtype = torch.get_autocast_dtype(tensors[0].device.type)
    else:
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ/√d) v on (B, H, T, D) views of any strides, differentiable; the result is a
    (B, H, T, D) view of (B, T, H, D) memory. Mixed dtypes are cast to one (the autocast dtype under
    autocast, else the widest). Triton on CUDA (and under the interpreter), the reference on CPU."""
    return flash_attention_op(*_common_dtype(q, k, v))[0]


def flash_attention_qkv(qkv: torch.Tensor) -> torch.Tensor:
    """Attention of a packed (B, T, 3, H, D) qkv projection, returning (B, T, H, D); its gradient is
    one packed buffer, so the projection's backward needs no stack of three gradients."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"flash_attention_qkv expects (B, T, 3, H, D), got {tuple(qkv.shape)}")
    (qkv,) = _common_dtype(qkv)
    return flash_attention_qkv_op(qkv)[0]
