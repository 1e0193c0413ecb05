"""The LFM probability path and its loss (Lipman et al. 2023; LFM, Dao et al. 2023, eq. 3–5).

Time convention (ARCHITECTURE.md): t = 0 is data, t = 1 is noise.
    x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε,     u = dx_t/dt = (1 − σ_min)·ε − x0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfm_fast.models.cond import drop_labels


@dataclass
class FlowConfig:
    sigma_min: float = 1e-5
    time_sampling: str = "uniform"  # or "logit_normal" (SD3): t = sigmoid(N(mean, std))
    logit_mean: float = 0.0
    logit_std: float = 1.0


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, sigma_min: float) -> torch.Tensor:
    t = t.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - t) * x0 + (sigma_min + (1 - sigma_min) * t) * noise


def target_velocity(x0: torch.Tensor, noise: torch.Tensor, sigma_min: float) -> torch.Tensor:
    return (1 - sigma_min) * noise - x0


def sample_time(n: int, cfg: FlowConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    if cfg.time_sampling == "uniform":
        return torch.rand(n, generator=generator)
    if cfg.time_sampling == "logit_normal":
        return torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=generator))
    raise ValueError(f"unknown time_sampling {cfg.time_sampling!r}; expected 'uniform' or 'logit_normal'")


def flow_matching_loss(model, x0: torch.Tensor, y: torch.Tensor | None, cfg: FlowConfig, generator: torch.Generator,
                       label_dropout: float = 0.0, cond: torch.Tensor | None = None,
                       part: tuple[int, int] | None = None) -> torch.Tensor:
    """E_{t, ε} ‖v(x_t, t) − u‖², averaged over elements. All randomness comes from `generator` (CPU),
    so a step is reproducible from its seed alone, which is what makes resumed runs exact.

    part=(offset, total): x0 holds samples offset … offset+n of a batch of `total` whose noise, times and
    label drops are drawn whole and sliced, so a global batch split over ranks and micro-batches gives
    every sample the same draws as one process would."""
    n = x0.shape[0]
    lo, total = part if part is not None else (0, n)
    rows = slice(lo, lo + n)
    noise = torch.randn((total, *x0.shape[1:]), generator=generator)[rows].to(x0.device, x0.dtype)
    t = sample_time(total, cfg, generator)[rows].to(x0.device)
    if y is not None and label_dropout > 0 and getattr(model, "config", None) is not None and model.config.num_classes:
        y = drop_labels(y, label_dropout, model.config.num_classes, torch.rand(total, generator=generator)[rows])
    v = model(interpolate(x0, noise, t, cfg.sigma_min), t, y, cond)
    return (v.float() - target_velocity(x0, noise, cfg.sigma_min).float()).pow(2).mean()
