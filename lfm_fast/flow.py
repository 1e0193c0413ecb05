"""The LFM probability path and its loss (Lipman et al. 2023; LFM, Dao et al. 2023, eq. 3–5).

Time convention (docs/ARCHITECTURE.md): t = 0 is data, t = 1 is noise.
    x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·ε,     u = dx_t/dt = (1 − σ_min)·ε − x0
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lfm_fast.dist import to_device
from lfm_fast.models.cond import drop_labels, null_condition


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


@dataclass
class FlowDraws:
    """The randomness of one batch: noise ε, times t and the uniforms u (label drops) and uc (condition drops)."""
    noise: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor | None
    uc: torch.Tensor | None = None

    def rows(self, lo: int, n: int) -> "FlowDraws":
        part = lambda v: None if v is None else v[lo:lo + n]  # noqa: E731
        return FlowDraws(part(self.noise), part(self.t), part(self.u), part(self.uc))

    def to(self, device) -> "FlowDraws":
        """On `device`, copied without blocking (`to_device`): drawn on the host, they must not stall the device."""
        return FlowDraws(*(to_device(v, device) for v in (self.noise, self.t, self.u, self.uc)))


def draw_flow(n: int, sample_shape: tuple[int, ...], cfg: FlowConfig, generator: torch.Generator,
              label_dropout: float = 0.0, cond_dropout: float = 0.0) -> FlowDraws:
    """Draw a batch's randomness on the CPU, in a fixed order (noise, times, label-drop uniforms, condition-drop
    uniforms; each drop's only where it is used). Drawn once for a global batch and sliced with `rows`, it gives
    every sample the same draws however the batch is split over ranks and micro-batches."""
    noise = torch.randn((n, *sample_shape), generator=generator)
    t = sample_time(n, cfg, generator)
    u = torch.rand(n, generator=generator) if label_dropout > 0 else None
    return FlowDraws(noise, t, u, torch.rand(n, generator=generator) if cond_dropout > 0 else None)


def flow_matching_loss(model, x0: torch.Tensor, y: torch.Tensor | None, cfg: FlowConfig,
                       generator: torch.Generator | None = None, label_dropout: float = 0.0,
                       cond: torch.Tensor | None = None, draws: FlowDraws | None = None,
                       cond_dropout: float = 0.0) -> torch.Tensor:
    """E_{t, ε} ‖v(x_t, t) − u‖², averaged over elements. All randomness comes from `generator` (CPU), or from
    `draws` made by `draw_flow`, so a step is reproducible from its seed alone: what makes resumed runs exact."""
    if draws is None:
        draws = draw_flow(x0.shape[0], tuple(x0.shape[1:]), cfg, generator, label_dropout, cond_dropout if cond is not None else 0.0)
    draws = draws.to(x0.device)  # a no-op for draws the loop moved already
    noise, t = draws.noise.to(x0.dtype), draws.t
    if y is not None and draws.u is not None and getattr(model, "config", None) is not None and model.config.num_classes:
        y = drop_labels(y, label_dropout, model.config.num_classes, draws.u)
    if cond is not None and draws.uc is not None:  # rows that train the null condition (CFG on the condition)
        drop = (draws.uc < cond_dropout).view(-1, *([1] * (cond.dim() - 1)))
        cond = torch.where(drop, null_condition(model.config.condition, cond), cond)
    v = model(interpolate(x0, noise, t, cfg.sigma_min), t, y, cond)
    return (v.float() - target_velocity(x0, noise, cfg.sigma_min).float()).pow(2).mean()
