"""The one dispatch point for the fused ops the DiT uses.

Models call `attention` (or `attention_qkv` on a packed projection), `adaln_modulate`, `gated_residual` and `gated_residual_modulate` from here
and nowhere else, so the plain-PyTorch `reference` backend is the numerical definition every faster
backend is tested against. Backends:

- attention: ``auto`` (SDPA on CUDA; on CPU ``math`` for bf16/fp16 up to 512 tokens, else SDPA),
  ``triton``, ``sdpa``, ``math`` (two matmuls and a softmax in the input dtype), ``xformers``
  (installed + CUDA only), ``reference`` (fp32).
- norms (adaLN modulate, gated residual, and the two fused): ``auto`` (Triton on CUDA in eager; the PyTorch
  expression under `torch.compile`, which fuses it, and on CPU), ``triton``, ``compile`` (the PyTorch expression
  in the input dtype, for `torch.compile` to fuse) and ``reference`` (in fp32, cast back: the kernels' definition).

`auto` follows the first GPU run (bench/REPORT.md, "GPU"; one H200, 2026-12-04). The Triton attention's kernels
match SDPA's GPU time (225 vs 228 µs fwd + bwd at XL/2, batch 32), but a forward + backward through its custom ops costs
the host ~1 ms (SDPA's: 0.42), and the DiT-XL/2 training step with SDPA + compiled norms ran 1.86× the Triton kernels'
(375 vs 202 img/s, both compiled). In eager sampling the Triton norms beat unfused PyTorch (16.6 vs 19.1 ms per
image at batch 32); under compile, inductor's fusion matches them.

The Triton ops (lfm_fast.kernels) are custom ops with fake implementations and autograd, so
`torch.compile(fullgraph=True)` sees one node per op; on CPU they run the reference (or the Triton
interpreter under TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lfm_fast.errors import InputError

from lfm_fast.choices import ATTENTION_BACKENDS, NORM_BACKENDS  # noqa: F401 (their home here)

# On CPU, bf16 SDPA (its flash kernel) is 2.2× slower forward + backward than plain matmuls at DiT-S/2's
# 256 tokens (48 vs 22 ms per layer, batch 16, 6 heads), even at 1024 tokens, while in fp32 SDPA is the
# faster one (40 vs 53 ms). The math path keeps the T×T scores for backward: hence the token limit.
CPU_MATH_ATTENTION_MAX_TOKENS = 512

LAYERNORM_EPS = 1e-6  # DiT's adaLN uses LayerNorm(eps=1e-6, elementwise_affine=False)


def check_backend(name: str, choices: tuple[str, ...], what: str) -> str:
    if name not in choices:
        raise InputError(f"unknown {what} backend {name!r}; expected one of {', '.join(choices)}")
    return name


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _use_triton(backend: str, t: torch.Tensor) -> bool:
    if backend == "triton":
        if not triton_available():
            raise RuntimeError("backend 'triton' needs the triton package (pip install triton)")
        return True
    return backend == "auto" and t.is_cuda and triton_available() and not torch.compiler.is_compiling()


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v on (B, H, T, D) in fp32, cast back: the kernel file's reference, output only."""
    from lfm_fast.kernels.attention import attention_reference as reference

    return reference(q, k, v)[0]


def _attention_xformers(q, k, v):
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise RuntimeError("attention backend 'xformers' needs the xformers package: pip install 'lfm-fast[xformers]'") from e
    if not q.is_cuda:
        raise RuntimeError("attention backend 'xformers' runs on CUDA tensors only; use 'sdpa' on CPU")
    # xformers takes (B, T, H, D)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def _use_triton_attention(backend: str, t: torch.Tensor) -> bool:
    """Only when asked for by name (`auto` is SDPA on CUDA: see the module's docstring)."""
    return backend == "triton" and _use_triton(backend, t)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal multi-head attention on (B, H, T, D) tensors."""
    check_backend(backend, ATTENTION_BACKENDS, "attention")
    if _use_triton_attention(backend, q):
        from lfm_fast.kernels.attention import flash_attention

        return flash_attention(q, k, v)
    if backend == "auto" and not q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) \
            and q.shape[-2] <= CPU_MATH_ATTENTION_MAX_TOKENS:
        backend = "math"
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":  # P is cast to the input dtype before P·V, as flash attention does
        return torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2), dim=-1) @ v
    if backend == "xformers":
        return _attention_xformers(q, k, v)
    return attention_reference(q, k, v)


def attention_qkv(qkv: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Attention of a packed (B, T, 3, H, D) qkv projection, returning (B, T, H, D). The Triton kernels
    read q, k, v in place and write the packed gradient: no copy on either side."""
    check_backend(backend, ATTENTION_BACKENDS, "attention")
    if _use_triton_attention(backend, qkv):
        from lfm_fast.kernels.attention import flash_attention_qkv

        return flash_attention_qkv(qkv)
    q, k, v = qkv.unbind(2)
    return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), backend).transpose(1, 2)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x) · (1 + scale) + shift, with x (B, T, D) and per-sample shift/scale (B, D) (DiT's adaLN)."""
    check_backend(backend, NORM_BACKENDS, "norm")
    if _use_triton(backend, x):
        from lfm_fast.kernels.adaln import adaln_modulate as fused

        return fused(x, shift, scale)
    if backend == "reference":
        from lfm_fast.kernels.adaln import modulate_reference

        return modulate_reference(x, shift, scale, LAYERNORM_EPS)
    h = F.layer_norm(x, x.shape[-1:], eps=LAYERNORM_EPS)
    return torch.addcmul(shift.unsqueeze(1), h, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x + gate · y with x, y (B, T, D) and a per-sample gate (B, D) (adaLN-Zero's residual)."""
    check_backend(backend, NORM_BACKENDS, "norm")
    if _use_triton(backend, x):
        from lfm_fast.kernels.adaln import gated_residual as fused

        return fused(x, gate, y)
    if backend == "reference":
        from lfm_fast.kernels.adaln import gated_residual_reference

        return gated_residual_reference(x, gate, y)
    return torch.addcmul(x, gate.unsqueeze(1), y)


def gated_residual_modulate(x, gate, y, shift, scale, backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(x + gate·y, adaln_modulate(x + gate·y, shift, scale)): one pass over memory with Triton."""
    check_backend(backend, NORM_BACKENDS, "norm")
    if _use_triton(backend, x):
        from lfm_fast.kernels.adaln import gated_residual_modulate as fused

        return fused(x, gate, y, shift, scale)
    out = gated_residual(x, gate, y, backend)
    return out, adaln_modulate(out, shift, scale, backend)
