"""Sampling: noise at t = 1 to latents at t = 0 along the network's velocity field v(x, t), with classifier-free
guidance. `sample` builds the field (`Field`) and the time grid (`time_grid`) and hands them to a solver of
lfm_fast/solvers.py (fixed-step on the grid, or adaptive with a step size per image).

The ODE state, the times and the solver's arithmetic are fp32 (or the noise's dtype if wider); only the
network runs in its own dtype, cast at its boundary (`Field`). NFE counts network evaluations: one CFG
evaluation (conditional and unconditional halves in one batch) is one NFE, as LFM counts; `Field` also counts
the network rows, the FLOPs measure that tells a half-batch (guidance-interval) evaluation from a full one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import torch

from lfm_fast.choices import ADAPTIVE_SOLVERS, FIXED_SOLVERS, GRIDS, NFE_PER_STEP, SOLVERS
from lfm_fast.solvers import integrate_adaptive, integrate_fixed


@dataclass
class SampleConfig:
    solver: str = "heun"
    steps: int = 8  # fixed-step solvers
    cfg: float = 1.0
    grid: str = "uniform"
    shift: float = 1.0  # grid="shifted": SD3's time shift; grid="power": the exponent ρ
    atol: float = 1e-5  # adaptive solvers (LFM's defaults)
    rtol: float = 1e-5
    cfg_lo: float = 0.0  # guidance interval: CFG where cfg_lo ≤ t ≤ cfg_hi, the conditional half alone elsewhere
    cfg_hi: float = 1.0
    times: tuple[float, ...] | None = None  # grid="calibrated": the steps + 1 times (`lfm-fast calibrate`)

    @property
    def nfe(self) -> int | None:
        """NFE of a fixed-step run (None for the adaptive solvers)."""
        return NFE_PER_STEP[self.solver] * self.steps if self.solver in NFE_PER_STEP else None

    def describe(self) -> str:
        """One line: 'ab3 × 16 steps, calibrated grid, cfg 3 on t in [0.2, 0.8]'."""
        if self.solver in NFE_PER_STEP:
            shift = f" {self.shift:g}" if self.grid in ("shifted", "power") else ""
            what = f"{self.solver} × {self.steps} steps, {self.grid}{shift} grid"
        else:
            what = f"{self.solver} atol {self.atol:g} rtol {self.rtol:g}"
        interval = "" if (self.cfg_lo, self.cfg_hi) == (0.0, 1.0) else f" on t in [{self.cfg_lo:g}, {self.cfg_hi:g}]"
        return f"{what}, cfg {float(self.cfg):g}{interval}"


class SampleResult(NamedTuple):
    latents: torch.Tensor
    nfe: int  # network calls of the batch (the per-batch count)
    image_nfe: torch.Tensor  # (B,) int64: the evaluations each image took part in (LFM's per-image NFE)
    net_rows: int  # network rows evaluated: a CFG row pair counts 2, so FLOPs = net_rows × FLOPs per row


def time_grid(steps: int, grid: str = "uniform", shift: float = 1.0, times: Sequence[float] | None = None) -> list[float]:
    """steps + 1 times from 1 to 0, as Python floats (constants of an exported graph).
    "shifted" maps u ↦ s·u / (1 + (s − 1)·u) (SD3's time shift): s > 1 spends more steps near the noise end,
    s < 1 near the data end. "power" is the EDM/Karras-style t_i = (1 − i/N)^ρ (ρ = `shift`; ρ > 1 spends more
    steps near the data end). "calibrated" takes `times` (fitted by `lfm-fast calibrate`)."""
    if steps < 1:
        raise ValueError(f"steps must be ≥ 1, got {steps}")
    if grid in ("shifted", "power") and not (shift > 0 and math.isfinite(shift)):
        raise ValueError(f"the {grid!r} grid needs a finite shift > 0, got {shift}")
    u = [1 - i / steps for i in range(steps + 1)]
    if grid == "shifted":
        u = [shift * v / (1 + (shift - 1) * v) for v in u]
    elif grid == "power":
        u = [v ** shift for v in u]
    elif grid == "calibrated":
        if times is None:
            raise ValueError("the 'calibrated' grid needs its times (lfm-fast calibrate fits them)")
        u = [float(v) for v in times]
        if len(u) != steps + 1:
            raise ValueError(f"a calibrated grid of {len(u) - 1} steps, asked for {steps}")
        if u[0] != 1 or u[-1] != 0:
            raise ValueError(f"a calibrated grid must run from 1 to 0: {u}")
    elif grid != "uniform":
        raise ValueError(f"unknown time grid {grid!r}; expected one of {', '.join(GRIDS)}")
    u[0], u[-1] = 1.0, 0.0
    if not all(b < a for a, b in zip(u, u[1:])):  # (NaN fails too)
        raise ValueError(f"a time grid must fall strictly from 1 to 0: {u}")
    return u


class Field:
    """v(x, t) of `model` for a batch (labels `y`, condition `cond`) with CFG `scale` on the interval `interval`
    of t, in fp32 with the network in its own dtype. Counts per-image NFE and network rows.

    Called as field(x, t, t_float) by the fixed-step solvers (every image at time t; `t_float`, a Python float,
    decides guidance statically, as an exported graph must) or field(x, t, rows=idx) by the adaptive one (a
    time per image, for the images `rows` of the batch)."""

    def __init__(self, model, batch: int, y=None, cond=None, scale: float = 1.0, interval=(0.0, 1.0)):
        self.model, self.y, self.cond, self.scale, self.interval = model, y, cond, float(scale), interval
        p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
        self.net_dtype = None if p is None else p.dtype
        conditioned = (y is not None and getattr(getattr(model, "config", None), "num_classes", 0)) or cond is not None
        self.guides = self.scale != 1.0 and hasattr(model, "forward_with_cfg") and bool(conditioned)
        self.batch, self.calls, self.net_rows = batch, 0, 0
        self._each = None  # (B,) calls per image, kept from the first call that names its rows (adaptive solving)

    @property
    def image_nfe(self) -> torch.Tensor:
        """(B,) int64: the evaluations each image took part in."""
        return torch.full((self.batch,), self.calls, dtype=torch.int64) if self._each is None else self._each.clone()

    def in_interval(self, t: float) -> bool:
        return self.guides and self.interval[0] <= min(max(t, 0.0), 1.0) <= self.interval[1]

    def __call__(self, x: torch.Tensor, t: torch.Tensor, t_float: float | None = None, rows=None) -> torch.Tensor:
        n = x.shape[0]
        tb = (t.expand(n) if t.dim() == 0 else t).to(x.dtype)  # fp32 (fp64 for a float64 state), never the net's
        y = self.y if self.y is None or rows is None else self.y[rows]
        cond = self.cond if self.cond is None or rows is None else self.cond[rows]
        xin = x if self.net_dtype is None else x.to(self.net_dtype)
        cin = cond if cond is None or self.net_dtype is None else cond.to(self.net_dtype)
        if rows is not None:
            if self._each is None:
                self._each = torch.full((self.batch,), self.calls, dtype=torch.int64)
            self._each[rows.cpu()] += 1
        elif self._each is not None:
            self._each += 1
        self.calls += 1
        if t_float is not None:
            guided = self.in_interval(t_float)
        else:  # a time per image: guide those inside the interval, in one batch with the rest. An adaptive
            # solver's last step runs past t = 0 and interpolates back: beyond [0, 1] the field continues the one at
            # the end it passed (unguided stages there made the field jump at t = 0 and cost ~20 rejected evaluations)
            tc = tb.clamp(0.0, 1.0)
            g = (tc >= self.interval[0]) & (tc <= self.interval[1]) if self.guides else torch.zeros(n, dtype=torch.bool, device=x.device)
            guided = bool(g.all()) or (g.nonzero()[:, 0] if g.any() else False)
        if guided is True:
            self.net_rows += 2 * n
            v = self.model.forward_with_cfg(xin, tb, y, self.scale, cin)
        elif guided is False:
            self.net_rows += n
            v = self.model(xin, tb, y, cin)
        else:
            self.net_rows += n + len(guided)
            mask = torch.zeros(n, dtype=torch.bool, device=x.device).index_fill(0, guided, True)
            v = self.model.forward_with_cfg(xin, tb, y, self.scale, cin, guided=mask)
        return v.to(x.dtype)


@torch.no_grad()
def sample(model, noise: torch.Tensor, y: torch.Tensor | None = None, solver: str = "heun", steps: int = 8,
           cfg: float = 1.0, cond: torch.Tensor | None = None, grid: str = "uniform", shift: float = 1.0,
           atol: float = 1e-5, rtol: float = 1e-5, cfg_interval=(0.0, 1.0), times=None,
           sigma_min: float = 1e-5) -> SampleResult:
    """Generate latents from `noise` (B, C, H, W) at t = 1: (latents at t = 0, NFE, per-image NFE, network rows).
    The state is fp32 (float64 noise stays float64) whatever the network's dtype."""
    x = noise if noise.dtype == torch.float64 else noise.float()
    field = Field(model, x.shape[0], y, cond, cfg, cfg_interval)
    if solver in ADAPTIVE_SOLVERS:
        out = integrate_adaptive(field, x, solver, atol, rtol)
    else:
        if solver not in FIXED_SOLVERS:
            raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
        out = integrate_fixed(field, x, time_grid(steps, grid, shift, times), solver, sigma_min)
    return SampleResult(out, field.calls, field.image_nfe, field.net_rows)


def sample_with(model, noise, y, cfg: SampleConfig, cond=None, sigma_min: float = 1e-5) -> SampleResult:
    """`sample` with a SampleConfig."""
    return sample(model, noise, y, cfg.solver, cfg.steps, cfg.cfg, cond, cfg.grid, cfg.shift, cfg.atol, cfg.rtol,
                  (cfg.cfg_lo, cfg.cfg_hi), cfg.times, sigma_min)


def per_image_noise(seeds: list[int], shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """One generator per image, so image i's noise depends on its seed alone (not on the batch it is in)."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(device, dtype)
