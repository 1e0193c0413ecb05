"""Training FLOPs of the DiT and the peak they are measured against (MFU = achieved / peak).

FLOPs = 2 × multiply-adds. Training ≈ 3 × forward (the backward pass costs twice the forward).
Forward multiply-adds of one image, T tokens of width D, depth L, MLP ratio r, patch p, C channels in,
C_out out:
    L · [ T · (3D² + D² + 2rD²)        qkv, attention output, MLP
        + 2 · T² · D                   attention: Q·Kᵀ and P·V
        + 6D² ]                        adaLN modulation (once per image)
    + T · (C·p²) · D + T · D · (C_out·p²) + 2D²     patch embedding, output layer and its adaLN
    + 256·D + D²                                     time embedding MLP
"""

from __future__ import annotations

import functools
import time

import torch

from lfm_fast.models.dit import DiTConfig

# Dense bf16 tensor-core peaks (FLOP/s) from the vendors' data sheets; matched against the device name.
GPU_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
                 "L4": 121e12, "A10": 125e12, "4090": 165e12, "MI300X": 1307e12}


def forward_flops_per_image(cfg: DiTConfig) -> float:
    T, D, L = cfg.num_tokens, cfg.hidden_size, cfg.depth
    r, pc = cfg.mlp_ratio, cfg.patch_size**2
    per_block = T * (3 * D * D + D * D + 2 * r * D * D) + 2 * T * T * D + 6 * D * D
    ends = T * (cfg.in_channels + cfg.cond_channels) * pc * D + T * D * cfg.in_channels * pc + 2 * D * D + 256 * D + D * D
    return 2.0 * (L * per_block + ends)


def train_flops_per_image(cfg: DiTConfig) -> float:
    return 3.0 * forward_flops_per_image(cfg)


@functools.lru_cache(maxsize=None)
def measure_gemm_peak(m: int, k: int, n: int, dtype=torch.bfloat16, device="cpu", seconds: float = 0.5) -> float:
    """FLOP/s of torch.mm at (m×k)·(k×n), best of repeated timings: the practical peak of this device (measured once
    a process for each shape)."""
    a, b = torch.randn(m, k, dtype=dtype, device=device), torch.randn(k, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    torch.mm(a, b)
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == float("inf"):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


def peak_flops(device: torch.device, cfg: DiTConfig, micro_batch: int, dtype=torch.bfloat16) -> tuple[float, str]:
    """(peak FLOP/s of one device, where it came from): the data-sheet table for known GPUs, otherwise a GEMM
    at the model's MLP shape (tokens of a micro-batch × D × 4D) timed here."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in GPU_PEAK_BF16.items():
            if key in name:
                return value, f"table: {name}"
    tokens, d = micro_batch * cfg.num_tokens, cfg.hidden_size
    return measure_gemm_peak(tokens, d, int(cfg.mlp_ratio * d), dtype, device), f"measured: {dtype} GEMM {tokens}x{d}x{int(cfg.mlp_ratio * d)}"
