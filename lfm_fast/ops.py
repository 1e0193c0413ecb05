"""The one dispatch point for the fused ops the DiT uses.

Models call `attention`, `adaln_modulate` and `gated_residual` from here and nowhere else, so the
plain-PyTorch `reference` backend below is the numerical definition every faster backend is tested
against. Backends:

- attention: ``auto`` (SDPA; Triton on CUDA once the kernels land), ``sdpa``, ``xformers``
  (installed + CUDA only), ``reference``.
- norms (adaLN modulate, gated residual): ``auto``, ``compile`` and ``reference``; on CPU all three
  run the same PyTorch expression (``compile`` lets `torch.compile` fuse it inside the model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "reference")
NORM_BACKENDS = ("auto", "compile", "reference")

LAYERNORM_EPS = 1e-6  # DiT's adaLN uses LayerNorm(eps=1e-6, elementwise_affine=False)


def check_backend(name: str, choices: tuple[str, ...], what: str) -> str:
    if name not in choices:
        raise ValueError(f"unknown {what} backend {name!r}; expected one of {', '.join(choices)}")
    return name


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √d) v on (B, H, T, D), computed in fp32 and cast back."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(dim=-1), v.float()).to(q.dtype)


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """Non-causal multi-head attention on (B, H, T, D) tensors."""
    if backend in ("auto", "sdpa"):
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "reference":
        return attention_reference(q, k, v)
    if backend == "xformers":
        return _attention_xformers(q, k, v)
    check_backend(backend, ATTENTION_BACKENDS, "attention")
    raise AssertionError("unreachable")


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """LayerNorm(x) · (1 + scale) + shift, with x (B, T, D) and per-sample shift/scale (B, D) (DiT eq. adaLN)."""
    check_backend(backend, NORM_BACKENDS, "norm")
    h = F.layer_norm(x, x.shape[-1:], eps=LAYERNORM_EPS)
    return torch.addcmul(shift.unsqueeze(1), h, 1 + scale.unsqueeze(1))


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """x + gate · y with x, y (B, T, D) and a per-sample gate (B, D) (adaLN-Zero's residual)."""
    check_backend(backend, NORM_BACKENDS, "norm")
    return torch.addcmul(x, gate.unsqueeze(1), y)
