"""Fused adaLN ops in Triton, forward and backward, deterministic.

- modulate:        y = LayerNorm(x; no affine, eps) · (1 + scale[b]) + shift[b]
- gated residual:  out = x + gate[b] · y
- both at once:    out = x + gate[b] · y,  h = LayerNorm(out) · (1 + scale[b]) + shift[b]
  (the attention residual followed by the MLP's modulate inside a DiT block: `out` is read once)

x, y: (B, T, D); shift, scale, gate: (B, D). Bytes moved, by construction (N = B·T·D elements of
the activation dtype; the fp32 row statistics and per-sample vectors are ≤ 1/D of that):

    op                        forward                     backward
    modulate                  read x, write y       (2N)  read dy, x, write dx                (3N)
    gated residual            read x, y, write out  (3N)  read dout, y, write dy (dx = dout)  (3N)
    gated residual+modulate   read x, y, write out, h (4N) read dout, dh, out, y, write dx, dy (6N)

which is each op's minimum (inputs read once, outputs written once). The backward's per-sample
reductions (dscale, dshift, dgate over T) accumulate in registers over ROWS = 64 tokens per program
(Liger's rows-per-program idea; 16–32 when the batch is too small to fill the GPU) and write one
fp32 partial per program, (B, ⌈T/ROWS⌉, D), summed afterwards: at ROWS = 64 each partial is 1/32
of N's bytes at bf16, written once and read once; never float atomics, so results are bitwise
reproducible.
Each op is a `torch.library.custom_op` (not `triton_op`: what surrounds the kernels is (B, D)-sized,
the per-sample chunks and the partial sums, under 1/T of the traffic, and the fusion that mattered,
the add of the two gradient paths, is inside the fused backward kernel) whose CUDA path runs Triton and whose CPU path runs the reference, or the
Triton kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lfm_fast.kernels import interpreting

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

EPS = 1e-6


def modulate_reference(x, shift, scale, eps: float = EPS):
    h = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    return (h * (1 + scale.float()[:, None]) + shift.float()[:, None]).to(x.dtype)


def gated_residual_reference(x, gate, y):
    return (x.float() + gate.float()[:, None] * y.float()).to(x.dtype)


if triton is not None:

    @triton.jit
    def _modulate_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, R, T, D, eps,
                             BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        # int64 rows: B·T·D passes 2³¹ at DiT-XL batches (~1,800 × 1,024 tokens × 1,152); each tile's
        # offsets are built as one int64 tensor, never as pointer + 32-bit part.
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_D)
        mask_r = rows < R
        mask = mask_r[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / D
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 1) / D + eps)
        offs_b = (rows // T)[:, None] * D + cols[None, :]
        sc = tl.load(SCALE + offs_b, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(SHIFT + offs_b, mask=mask, other=0.0).to(tl.float32)
        y = xc * rstd[:, None] * (1.0 + sc) + sh
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=mask_r)
        tl.store(RSTD + rows, rstd, mask=mask_r)

    @triton.jit
    def _ln_bwd_rows(DY, X, SCALE, MEAN, RSTD, b, t, T, D, BLOCK_D: tl.constexpr):
        """For rows t of sample b: (dy, x̂, dx of the modulated LayerNorm) in fp32, zero outside."""
        cols = tl.arange(0, BLOCK_D)
        mask_t = t < T
        mask = mask_t[:, None] & (cols < D)[None, :]
        rows = b * T + t
        offs = rows[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=mask_t, other=0.0)
        rstd = tl.load(RSTD + rows, mask=mask_t, other=0.0)
        sc = tl.load(SCALE + b * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * (1.0 + sc[None, :])
        c1 = tl.sum(xhat * g, 1) / D
        c2 = tl.sum(g, 1) / D
        dx = tl.where(mask, (g - xhat * c1[:, None] - c2[:, None]) * rstd[:, None], 0.0)
        return dy, xhat, dx, offs, mask

    @triton.jit
    def _modulate_bwd_kernel(DY, X, SCALE, MEAN, RSTD, DX, DSCALE_PART, DSHIFT_PART, T, D,
                             ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """Program (b, c): tokens [c·ROWS, (c+1)·ROWS) of sample b, BLOCK_R rows at a time; dscale and
        dshift accumulate in registers and leave as one partial row each."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        dscale = tl.zeros([BLOCK_D], tl.float32)
        dshift = tl.zeros([BLOCK_D], tl.float32)
        for r in range(0, ROWS, BLOCK_R):
            t = c * ROWS + r + tl.arange(0, BLOCK_R)
            dy, xhat, dx, offs, mask = _ln_bwd_rows(DY, X, SCALE, MEAN, RSTD, b, t, T, D, BLOCK_D)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dscale += tl.sum(dy * xhat, 0)
            dshift += tl.sum(dy, 0)
        part = (b * tl.num_programs(1) + c) * D + cols
        tl.store(DSCALE_PART + part, dscale, mask=cols < D)
        tl.store(DSHIFT_PART + part, dshift, mask=cols < D)

    @triton.jit
    def _gated_modulate_bwd_kernel(DOUT, DH, GATE, Yin, SCALE, OUT, MEAN, RSTD, DX, DY,
                                   DGATE_PART, DSHIFT_PART, DSCALE_PART, T, D,
                                   ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """The backward of (out = x + gate·y, h = modulate(out)) in one pass: dx = dout + ∂h/∂out·dh
        (kept in fp32, never stored twice), dy = dx·gate; dgate, dshift, dscale accumulate per program."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        gate = tl.load(GATE + b * D + cols, mask=cols < D, other=0.0).to(tl.float32)
        dgate = tl.zeros([BLOCK_D], tl.float32)
        dshift = tl.zeros([BLOCK_D], tl.float32)
        dscale = tl.zeros([BLOCK_D], tl.float32)
        for r in range(0, ROWS, BLOCK_R):
            t = c * ROWS + r + tl.arange(0, BLOCK_R)
            dh, xhat, dln, offs, mask = _ln_bwd_rows(DH, OUT, SCALE, MEAN, RSTD, b, t, T, D, BLOCK_D)
            dx = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32) + dln
            y = tl.load(Yin + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            tl.store(DY + offs, (dx * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            dgate += tl.sum(dx * y, 0)
            dshift += tl.sum(dh, 0)
            dscale += tl.sum(dh * xhat, 0)
        part = (b * tl.num_programs(1) + c) * D + cols
        tl.store(DGATE_PART + part, dgate, mask=cols < D)
        tl.store(DSHIFT_PART + part, dshift, mask=cols < D)
        tl.store(DSCALE_PART + part, dscale, mask=cols < D)

    @triton.jit
    def _gated_fwd_kernel(X, GATE, Yin, OUT, SHIFT, SCALE, H, MEAN, RSTD, R, T, D, eps,
                          BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, MODULATE: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)  # int64: see _modulate_fwd_kernel
        cols = tl.arange(0, BLOCK_D)
        mask_r = rows < R
        mask = mask_r[:, None] & (cols < D)[None, :]
        offs = rows[:, None] * D + cols[None, :]
        offs_b = (rows // T)[:, None] * D + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y = tl.load(Yin + offs, mask=mask, other=0.0).to(tl.float32)
        gate = tl.load(GATE + offs_b, mask=mask, other=0.0).to(tl.float32)
        out = x + gate * y
        tl.store(OUT + offs, out.to(OUT.dtype.element_ty), mask=mask)
        if MODULATE:
            out = out.to(OUT.dtype.element_ty).to(tl.float32)  # normalise what was stored, like the unfused pair
            mean = tl.sum(out, 1) / D
            oc = tl.where(mask, out - mean[:, None], 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(oc * oc, 1) / D + eps)
            sc = tl.load(SCALE + offs_b, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(SHIFT + offs_b, mask=mask, other=0.0).to(tl.float32)
            h = oc * rstd[:, None] * (1.0 + sc) + sh
            tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)
            tl.store(MEAN + rows, mean, mask=mask_r)
            tl.store(RSTD + rows, rstd, mask=mask_r)

    @triton.jit
    def _gated_bwd_kernel(DOUT, GATE, Yin, DY, DGATE_PART, T, D,
                          ROWS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
        """dy = dout · gate[b]; dgate[b] = Σ_t dout · y accumulated per program (dx = dout, no copy)."""
        b = tl.program_id(0).to(tl.int64)
        c = tl.program_id(1)
        cols = tl.arange(0, BLOCK_D)
        mask_d = cols < D
        gate = tl.load(GATE + b * D + cols, mask=mask_d, other=0.0).to(tl.float32)
        dgate = tl.zeros([BLOCK_D], tl.float32)
        for r in range(0, ROWS, BLOCK_R):
            t = c * ROWS + r + tl.arange(0, BLOCK_R)
            mask = (t < T)[:, None] & mask_d[None, :]
            offs = (b * T + t)[:, None] * D + cols[None, :]
            dout = tl.load(DOUT + offs, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Yin + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DY + offs, (dout * gate[None, :]).to(DY.dtype.element_ty), mask=mask)
            dgate += tl.sum(dout * y, 0)
        tl.store(DGATE_PART + (b * tl.num_programs(1) + c) * D + cols, dgate, mask=mask_d)


ROWS_PER_PROGRAM = 64  # tokens whose per-sample gradient sums one backward program accumulates


def _rows_block(D: int) -> tuple[int, int]:
    block_d = triton.next_power_of_2(D)
    return max(1, min(16, 4096 // block_d)), block_d


def _num_warps(block_r: int, block_d: int) -> int:
    """16 elements of the tile per thread (two 16-byte bf16 loads). The backward keeps about five fp32
    tiles live: at Triton's default 4 warps the fused one took 224 registers a thread at hidden 1152
    (2 × 2048 tile), at 8 warps every adaLN kernel there stays ≤ 128, unspilled (tests/kernels/test_ptx.py)."""
    return min(16, max(4, block_r * block_d // 512))


def _bwd_grid(x: torch.Tensor) -> tuple[tuple[int, int], dict]:
    """Grid (B, ⌈T / ROWS⌉), block constants and num_warps of a backward kernel. ROWS is 64 tokens,
    halved (down to 16) while the grid would not fill every SM twice, so small batches still keep enough
    loads in flight; at ROWS = 16 the partials add at most 1/6 of the op's bytes (the 1.3× bound)."""
    B, T, D = x.shape
    br, bd = _rows_block(D)
    rows = max(br, min(ROWS_PER_PROGRAM, triton.next_power_of_2(T)))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 0
    while rows > max(br, 16) and B * triton.cdiv(T, rows) < 2 * sms:
        rows //= 2
    return (B, triton.cdiv(T, rows)), dict(ROWS=rows, BLOCK_R=br, BLOCK_D=bd, num_warps=_num_warps(br, bd))


def _partials(n: int, grid, D: int, device) -> list[torch.Tensor]:
    return [torch.empty((grid[0], grid[1], D), device=device, dtype=torch.float32) for _ in range(n)]


def _check(x, *per_sample):
    if x.dim() != 3 or any(p.shape != (x.shape[0], x.shape[2]) for p in per_sample):
        raise ValueError(f"adaLN ops expect x (B, T, D) and per-sample (B, D) tensors, got {tuple(x.shape)} and "
                         f"{[tuple(p.shape) for p in per_sample]}")


def modulate_forward_triton(x, shift, scale, eps: float = EPS):
    _check(x, shift, scale)
    x, shift, scale = x.contiguous(), shift.contiguous(), scale.contiguous()
    B, T, D = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(B * T, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    br, bd = _rows_block(D)
    _modulate_fwd_kernel[(triton.cdiv(B * T, br),)](x, shift, scale, y, mean, rstd, B * T, T, D, eps,
                                                    BLOCK_R=br, BLOCK_D=bd, num_warps=_num_warps(br, bd))
    return y, mean, rstd


def modulate_backward_triton(dy, x, scale, mean, rstd):
    dy, x, scale = dy.contiguous(), x.contiguous(), scale.contiguous()
    T, D = x.shape[1:]
    grid, blocks = _bwd_grid(x)
    dx = torch.empty_like(x)
    dscale, dshift = _partials(2, grid, D, x.device)
    _modulate_bwd_kernel[grid](dy, x, scale, mean, rstd, dx, dscale, dshift, T, D, **blocks)
    return dx, dshift.sum(1).to(scale.dtype), dscale.sum(1).to(scale.dtype)


def gated_forward_triton(x, gate, y, shift=None, scale=None, eps: float = EPS):
    modulate = shift is not None
    _check(x, gate, *((shift, scale) if modulate else ()))
    if y.shape != x.shape:
        raise ValueError(f"gated residual: x {tuple(x.shape)} and y {tuple(y.shape)} differ")
    x, gate, y = x.contiguous(), gate.contiguous(), y.contiguous()
    B, T, D = x.shape
    out = torch.empty_like(x)
    h = torch.empty_like(x) if modulate else out
    mean = torch.empty(B * T if modulate else 1, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    shift = shift.contiguous() if modulate else gate
    scale = scale.contiguous() if modulate else gate
    br, bd = _rows_block(D)
    _gated_fwd_kernel[(triton.cdiv(B * T, br),)](x, gate, y, out, shift, scale, h, mean, rstd, B * T, T, D, eps,
                                                 BLOCK_R=br, BLOCK_D=bd, MODULATE=modulate,
                                                 num_warps=_num_warps(br, bd))
    return out, h, mean, rstd


def gated_backward_triton(dout, gate, y):
    dout, gate, y = dout.contiguous(), gate.contiguous(), y.contiguous()
    T, D = y.shape[1:]
    grid, blocks = _bwd_grid(y)
    dy = torch.empty_like(y)
    (dgate,) = _partials(1, grid, D, y.device)
    _gated_bwd_kernel[grid](dout, gate, y, dy, dgate, T, D, **blocks)
    return dy, dgate.sum(1).to(gate.dtype)


def gated_modulate_backward_triton(dout, dh, gate, y, scale, out, mean, rstd):
    """(dx, dgate, dy, dshift, dscale) of gated_residual_modulate in one kernel."""
    dout, dh, gate, y, scale, out = (t.contiguous() for t in (dout, dh, gate, y, scale, out))
    T, D = y.shape[1:]
    grid, blocks = _bwd_grid(y)
    dx, dy = torch.empty_like(out), torch.empty_like(y)
    dgate, dshift, dscale = _partials(3, grid, D, y.device)
    _gated_modulate_bwd_kernel[grid](dout, dh, gate, y, scale, out, mean, rstd, dx, dy, dgate, dshift, dscale, T, D,
                                     **blocks)
    return dx, dgate.sum(1).to(gate.dtype), dy, dshift.sum(1).to(scale.dtype), dscale.sum(1).to(scale.dtype)


def _use_triton(t: torch.Tensor) -> bool:
    return triton is not None and (t.is_cuda or interpreting())


def _stats_reference(x, eps=EPS):
    xf = x.float().reshape(-1, x.shape[-1])
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def _modulate_backward_reference(dy, x, scale, mean, rstd, dx_dtype=None):
    B, T, D = x.shape
    xhat = (x.float().reshape(-1, D) - mean[:, None]) * rstd[:, None]
    xhat = xhat.view(B, T, D)
    dyf = dy.float()
    g = dyf * (1 + scale.float()[:, None])
    dx = (g - xhat * (xhat * g).mean(-1, keepdim=True) - g.mean(-1, keepdim=True)) * rstd.view(B, T, 1)
    return dx.to(dx_dtype or x.dtype), dyf.sum(1).to(scale.dtype), (dyf * xhat).sum(1).to(scale.dtype)


# modulate -----------------------------------------------------------------------------------------

@torch.library.custom_op("lfm_fast::adaln_modulate", mutates_args=())
def adaln_modulate_op(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return modulate_forward_triton(x, shift, scale)
    mean, rstd = _stats_reference(x)
    return modulate_reference(x, shift, scale).contiguous(), mean, rstd


# Fake outputs are contiguous, like every real one (empty_like would copy a strided input's layout).
@adaln_modulate_op.register_fake
def _(x, shift, scale):
    n = x.shape[0] * x.shape[1]
    return x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("lfm_fast::adaln_modulate_bwd", mutates_args=())
def adaln_modulate_bwd_op(dy: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, mean: torch.Tensor,
                          rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return modulate_backward_triton(dy, x, scale, mean, rstd)
    return tuple(g.contiguous() for g in _modulate_backward_reference(dy, x, scale, mean, rstd))


@adaln_modulate_bwd_op.register_fake
def _(dy, x, scale, mean, rstd):
    return x.new_empty(x.shape), scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _modulate_setup(ctx, inputs, output):
    x, shift, scale = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, scale, mean, rstd)


def _modulate_backward(ctx, dy, dmean, drstd):
    x, scale, mean, rstd = ctx.saved_tensors
    dx, dshift, dscale = adaln_modulate_bwd_op(dy, x, scale, mean, rstd)
    return dx, dshift, dscale


adaln_modulate_op.register_autograd(_modulate_backward, setup_context=_modulate_setup)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return adaln_modulate_op(x, shift, scale)[0]


# gated residual (optionally followed by the next modulate) ------------------------------------------

@torch.library.custom_op("lfm_fast::gated_residual", mutates_args=())
def gated_residual_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if _use_triton(x):
        return gated_forward_triton(x, gate, y)[0]
    return gated_residual_reference(x, gate, y).contiguous()


@gated_residual_op.register_fake
def _(x, gate, y):
    return x.new_empty(x.shape)


@torch.library.custom_op("lfm_fast::gated_residual_bwd", mutates_args=())
def gated_residual_bwd_op(dout: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if _use_triton(y):
        return gated_backward_triton(dout, gate, y)
    dy = (dout.float() * gate.float()[:, None]).to(y.dtype)
    return dy.contiguous(), (dout.float() * y.float()).sum(1).to(gate.dtype)


@gated_residual_bwd_op.register_fake
def _(dout, gate, y):
    return y.new_empty(y.shape), gate.new_empty(gate.shape)


def _gated_setup(ctx, inputs, output):
    x, gate, y = inputs
    ctx.save_for_backward(gate, y)


def _gated_backward(ctx, dout):
    gate, y = ctx.saved_tensors
    dy, dgate = gated_residual_bwd_op(dout, gate, y)
    return dout, dgate, dy


gated_residual_op.register_autograd(_gated_backward, setup_context=_gated_setup)


@torch.library.custom_op("lfm_fast::gated_residual_modulate", mutates_args=())
def gated_residual_modulate_op(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, shift: torch.Tensor,
                               scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return gated_forward_triton(x, gate, y, shift, scale)
    out = gated_residual_reference(x, gate, y).contiguous()
    mean, rstd = _stats_reference(out)
    return out, modulate_reference(out, shift, scale).contiguous(), mean, rstd


@gated_residual_modulate_op.register_fake
def _(x, gate, y, shift, scale):
    n = x.shape[0] * x.shape[1]
    return x.new_empty(x.shape), x.new_empty(x.shape), x.new_empty(n, dtype=torch.float32), x.new_empty(n, dtype=torch.float32)


@torch.library.custom_op("lfm_fast::gated_residual_modulate_bwd", mutates_args=())
def gated_residual_modulate_bwd_op(dout: torch.Tensor, dh: torch.Tensor, gate: torch.Tensor, y: torch.Tensor,
                                   scale: torch.Tensor, out: torch.Tensor, mean: torch.Tensor, rstd: torch.Tensor
                                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(y):
        return gated_modulate_backward_triton(dout, dh, gate, y, scale, out, mean, rstd)
    dout_ln, dshift, dscale = _modulate_backward_reference(dh, out, scale, mean, rstd, torch.float32)
    dx = dout.float() + dout_ln  # in fp32, as the kernel keeps it
    dy = dx * gate.float()[:, None]
    dgate = (dx * y.float()).sum(1)
    return dx.to(out.dtype).contiguous(), dgate.to(gate.dtype), dy.to(y.dtype).contiguous(), dshift, dscale


@gated_residual_modulate_bwd_op.register_fake
def _(dout, dh, gate, y, scale, out, mean, rstd):
    return out.new_empty(out.shape), gate.new_empty(gate.shape), y.new_empty(y.shape), \
        scale.new_empty(scale.shape), scale.new_empty(scale.shape)


def _gm_setup(ctx, inputs, output):
    x, gate, y, shift, scale = inputs
    out, _, mean, rstd = output
    ctx.save_for_backward(gate, y, scale, out, mean, rstd)


def _gm_backward(ctx, dout, dh, dmean, drstd):
    gate, y, scale, out, mean, rstd = ctx.saved_tensors
    return gated_residual_modulate_bwd_op(dout, dh, gate, y, scale, out, mean, rstd)


gated_residual_modulate_op.register_autograd(_gm_backward, setup_context=_gm_setup)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return gated_residual_op(x, gate, y)


def gated_residual_modulate(x, gate, y, shift, scale) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate·y, LayerNorm(x + gate·y)·(1 + scale) + shift) in one pass over memory."""
    out, h, _, _ = gated_residual_modulate_op(x, gate, y, shift, scale)
    return out, h
