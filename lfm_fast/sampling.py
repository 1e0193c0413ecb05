"""ODE samplers for dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

Fixed-step: Euler (order 1), midpoint and Heun (order 2), classic RK4 (order 4) on a time grid.
Adaptive: dopri5 (the LFM paper's default), bosh3, adaptive_heun through torchdiffeq.
Every call returns the exact number of function evaluations (NFE); one CFG evaluation (conditional
and unconditional halves in one batch) counts as one NFE, as LFM counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

FIXED_SOLVERS = ("euler", "midpoint", "heun", "rk4")
ADAPTIVE_SOLVERS = ("dopri5", "bosh3", "adaptive_heun")
SOLVERS = FIXED_SOLVERS + ADAPTIVE_SOLVERS
GRIDS = ("uniform", "shifted")


@dataclass
class SampleConfig:
    solver: str = "heun"
    steps: int = 8  # fixed-step solvers
    cfg: float = 1.0
    grid: str = "uniform"
    shift: float = 1.0  # for grid="shifted"
    atol: float = 1e-5  # adaptive solvers (LFM's defaults)
    rtol: float = 1e-5


class SampleResult(NamedTuple):
    latents: torch.Tensor
    nfe: int


def time_grid(steps: int, grid: str = "uniform", shift: float = 1.0, device=None, dtype=torch.float32) -> torch.Tensor:
    """steps + 1 times from 1 to 0. "shifted" maps u ↦ s·u / (1 + (s − 1)·u) (SD3's time shift):
    s > 1 spends more steps near the noise end, s < 1 near the data end."""
    u = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    if grid == "shifted":
        u = shift * u / (1 + (shift - 1) * u)
    elif grid != "uniform":
        raise ValueError(f"unknown time grid {grid!r}; expected one of {', '.join(GRIDS)}")
    return u.to(dtype)


def solver_step(solver: str, f: Callable, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    h = t1 - t0
    if solver == "euler":
        return x + h * f(x, t0)
    if solver == "midpoint":
        return x + h * f(x + 0.5 * h * f(x, t0), t0 + 0.5 * h)
    if solver == "heun":  # explicit trapezoid
        k1 = f(x, t0)
        k2 = f(x + h * k1, t1)
        return x + 0.5 * h * (k1 + k2)
    if solver == "rk4":
        k1 = f(x, t0)
        k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
        k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
        k4 = f(x + h * k3, t1)
        return x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")


class CountingField(torch.nn.Module):
    """v(t, x) in torchdiffeq's argument order, counting evaluations (NFE) and, through torchdiffeq's own
    step callbacks, the accepted and rejected steps of an adaptive solver."""

    def __init__(self, f: Callable):
        super().__init__()
        self.f = f
        self.nfe = self.accepted = self.rejected = 0

    def forward(self, t, x):
        self.nfe += 1
        return self.f(x, t)

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1

    def callback_reject_step(self, t0, y0, dt):
        self.rejected += 1


def integrate(field: CountingField, x: torch.Tensor, cfg: SampleConfig) -> SampleResult:
    """Integrate dx/dt = field.f(x, t) (t a 0-d tensor) from t = 1 to t = 0 with `cfg.solver`."""
    if cfg.solver in ADAPTIVE_SOLVERS:
        from torchdiffeq import odeint

        ts = torch.tensor([1.0, 0.0], device=x.device, dtype=x.dtype)
        out = odeint(field, x, ts, method=cfg.solver, atol=cfg.atol, rtol=cfg.rtol)[-1]
        return SampleResult(out, field.nfe)
    if cfg.solver not in FIXED_SOLVERS:
        raise ValueError(f"unknown solver {cfg.solver!r}; expected one of {', '.join(SOLVERS)}")
    if cfg.steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {cfg.steps}")
    ts = time_grid(cfg.steps, cfg.grid, cfg.shift, device=x.device, dtype=x.dtype)
    for i in range(cfg.steps):
        x = solver_step(cfg.solver, lambda x_, t_: field(t_, x_), x, ts[i], ts[i + 1])
    return SampleResult(x, field.nfe)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, solver: str = "heun", steps: int = 8,
           cfg: float = 1.0, cond: torch.Tensor | None = None, grid: str = "uniform", shift: float = 1.0,
           atol: float = 1e-5, rtol: float = 1e-5) -> SampleResult:
    """Generate latents from `noise` (B, C, H, W) at t = 1; returns (latents at t = 0, NFE)."""
    config = SampleConfig(solver=solver, steps=steps, cfg=cfg, grid=grid, shift=shift, atol=atol, rtol=rtol)

    def velocity(x, t):
        tb = t.expand(x.shape[0]).to(x.dtype)
        if hasattr(model, "forward_with_cfg"):
            return model.forward_with_cfg(x, tb, y, cfg, cond).to(x.dtype)
        return model(x, tb, y, cond).to(x.dtype)

    return integrate(CountingField(velocity), noise, config)


def per_image_noise(seeds: list[int], shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """One generator per image, so image i's noise depends on its seed alone (not on the batch it is in)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device, dtype)
