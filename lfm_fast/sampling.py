"""ODE samplers for dx/dt = v(x, t), integrated from t = 1 (noise) to t = 0 (data).

Fixed-step, on a time grid (`time_grid`): Euler (order 1), midpoint and Heun (order 2), classic RK4 (order 4);
and the multistep solvers, one NFE per step: Adams–Bashforth 2 and 3 on the velocity (variable-step weights),
and DPM-Solver++(2M) (Lu et al. 2022), which extrapolates the data prediction x̂0 in λ = log(α/σ) of the LFM
path. Adaptive: dopri5 (the LFM paper's default), bosh3 and adaptive_heun, with torchdiffeq's tableaus and
step-size rule, each image with its own steps (`integrate_adaptive`), so an image never depends on its batch.

The ODE state, the times and the solver's arithmetic are fp32 (or the noise's dtype if wider); only the
network runs in its own dtype, cast at its boundary (`Field`). NFE counts network evaluations: one CFG
evaluation (conditional and unconditional halves in one batch) is one NFE, as LFM counts; `Field` also counts
the network rows, the FLOPs measure that tells a half-batch (guidance-interval) evaluation from a full one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Sequence

import numpy as np
import torch

from lfm_fast.choices import ADAPTIVE_SOLVERS, FIXED_SOLVERS, GRIDS, NFE_PER_STEP, SOLVERS  # noqa: F401 (their home here)


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


def data_prediction(x, v, t, sigma_min: float):
    """x̂0 from (x_t, v) on the LFM path: x_t = α x0 + σ ε, v = −x0 + (1 − σ_min) ε with α = 1 − t,
    σ = σ_min + (1 − σ_min) t. Solving the 2×2 system, its determinant (1 − σ_min)α + σ is exactly 1."""
    return (1 - sigma_min) * x - (sigma_min + (1 - sigma_min) * t) * v


def _adams_weights(nodes: list, start, end):
    """Variable-step Adams weights: w with Σ_j w_j p(nodes[j]) = (1/h)∫_start^end p, h = end − start, for every
    polynomial p of degree < len(nodes). Bashforth: nodes = the current time and earlier ones, start = the current
    time; Moulton: the same with the step's end time first. Python floats in, floats out (constants of an
    exported graph); tensors in (a grid being calibrated), a differentiable tensor out."""
    k = len(nodes)
    if not torch.is_tensor(start):
        tau = np.array([n - start for n in nodes], np.float64)
        return np.linalg.solve(np.vander(tau, k, increasing=True).T, [(end - start) ** m / (m + 1) for m in range(k)]).tolist()
    h = end - start
    tau = torch.stack([n - start for n in nodes])
    vander = torch.stack([tau ** m for m in range(k)])  # rows: monomial m, columns: node j
    moments = torch.stack([h ** m / (m + 1) for m in range(k)])
    return torch.linalg.solve(vander, moments)


def integrate_fixed(f: Callable, x: torch.Tensor, times, solver: str, sigma_min: float = 1e-5) -> torch.Tensor:
    """Integrate dx/dt = f(x, t, t_float) over `times` (Python floats, or a float64 tensor to differentiate
    through the grid, as `calibrate` does). Multistep solvers start (and DPM-Solver++ ends) at a lower order."""
    if solver not in FIXED_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    fitting = torch.is_tensor(times)
    tf = times.detach().tolist() if fitting else [float(v) for v in times]  # one read of a fitted grid a solve
    # The step arithmetic runs on Python floats (constants of an exported graph, no device work), or on the grid's
    # tensor on the state's device where the grid is being fitted; the network's time is made on the state's device.
    tt = times.to(x.device) if fitting else tf
    sc = lambda c: c if isinstance(c, float) else c.to(x.dtype)  # noqa: E731 - a coefficient in the state's dtype
    at = lambda v: sc(v) if fitting else torch.full((), v, dtype=x.dtype, device=x.device)  # noqa: E731 - t for f
    log = torch.log if fitting else math.log
    ev = lambda x_, i: f(x_, at(tt[i]), tf[i])  # noqa: E731
    history = []  # multistep: the last velocities or data predictions
    pending = None  # abm3: the last step's corrector, waiting for the evaluation at its end
    steps = len(tf) - 1
    for i in range(steps):
        h = tt[i + 1] - tt[i]
        if solver == "euler":
            x = x + sc(h) * ev(x, i)
        elif solver in ("midpoint", "rk4"):
            tm, tm_f = (tt[i] + tt[i + 1]) / 2, (tf[i] + tf[i + 1]) / 2
            k1 = ev(x, i)
            k2 = f(x + sc(h / 2) * k1, at(tm), tm_f)
            if solver == "midpoint":
                x = x + sc(h) * k2
            else:
                k3 = f(x + sc(h / 2) * k2, at(tm), tm_f)
                k4 = f(x + sc(h) * k3, at(tt[i + 1]), tf[i + 1])
                x = x + sc(h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
        elif solver == "heun":  # explicit trapezoid
            k1 = ev(x, i)
            k2 = f(x + sc(h) * k1, at(tt[i + 1]), tf[i + 1])
            x = x + sc(h / 2) * (k1 + k2)
        elif solver in ("ab2", "ab3", "abm3"):
            history = (history + [ev(x, i)])[-(3 if solver == "abm3" else int(solver[2])):]  # v at t_i, t_i−1, …
            if pending is not None:  # abm3 (PEC): Moulton corrects the last step with v at its predicted end
                x_start, w, earlier, h_last = pending
                x = x_start + sc(h_last) * sum(sc(wj) * vj for wj, vj in zip(w, [history[-1]] + earlier[::-1]))
            w = _adams_weights([tt[i - j] for j in range(len(history))], tt[i], tt[i + 1])
            x_start, x = x, x + sc(h) * sum(sc(wj) * vj for wj, vj in zip(w, history[::-1]))
            if solver == "abm3":
                w = _adams_weights([tt[i + 1]] + [tt[i - j] for j in range(len(history))], tt[i], tt[i + 1])
                pending = (x_start, w, list(history), h)
        else:  # dpm++2m: x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·D, D = x̂0 extrapolated linearly in λ
            sig = lambda k: sigma_min + (1 - sigma_min) * tt[k]  # noqa: E731
            alpha = lambda k: 1 - tt[k]  # noqa: E731
            lam = lambda k: log(alpha(k)) - log(sig(k))  # noqa: E731
            x0 = data_prediction(x, ev(x, i), sc(tt[i]), sigma_min)
            d = x0
            if history and i < steps - 1:  # second order (the last step first order)
                if i == 1:  # λ = −∞ at t = 1: the slope in ρ = e^λ = α/σ instead, which is 0 there
                    rho = lambda k: alpha(k) / sig(k)  # noqa: E731
                    c = (rho(2) - rho(1)) / (2 * (rho(1) - rho(0)))
                else:
                    c = (lam(i + 1) - lam(i)) / (2 * (lam(i) - lam(i - 1)))
                d = x0 + sc(c) * (x0 - history[-1])
            history = [x0]
            x = sc(sig(i + 1) / sig(i)) * x + sc(alpha(i + 1) - sig(i + 1) * alpha(i) / sig(i)) * d
    return x


def _tableau(solver: str):
    """(stage times α, stage weights β, solution weights, error weights, midpoint weights, order): torchdiffeq's own."""
    from torchdiffeq._impl import adaptive_heun, bosh3, dopri5

    tab, mid, order = {"dopri5": (dopri5._DORMAND_PRINCE_SHAMPINE_TABLEAU, dopri5.DPS_C_MID, 5),
                       "bosh3": (bosh3._BOGACKI_SHAMPINE_TABLEAU, bosh3._BS_C_MID, 3),
                       "adaptive_heun": (adaptive_heun._ADAPTIVE_HEUN_TABLEAU, adaptive_heun._AH_C_MID, 2)}[solver]
    return [float(a) for a in tab.alpha], [b.tolist() for b in tab.beta], tab.c_sol.tolist(), tab.c_error.tolist(), mid.tolist(), order


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


def integrate_adaptive(f: Callable, x: torch.Tensor, solver: str, atol: float, rtol: float,
                       max_steps: int = 100_000) -> torch.Tensor:
    """Adaptive Runge–Kutta with a step size per image: each image runs torchdiffeq's algorithm (its tableau,
    Hairer's initial step, the error ratio RMS(err / (atol + rtol·max(|y0|, |y1|))), safety 0.9, growth ≤ 10,
    shrink ≥ 0.2, steps past t = 0 and its quartic interpolant) on its own, as if alone in the batch: the
    batch only shares network calls. Images that have reached t = 0 leave the batch. f(x, t (n,), rows=idx)."""
    alpha, beta, c_sol, c_err, c_mid, order = _tableau(solver)
    b = x.shape[0]
    # torchdiffeq integrates decreasing t as τ = −t increasing, with the field −f(−τ): the same here, per image
    g = lambda y, tau, rows: -f(y, -tau.to(y.dtype), rows=rows)  # noqa: E731
    tau0 = torch.full((b,), -1.0, dtype=torch.float64, device=x.device)
    everyone = torch.arange(b, device=x.device)
    f0 = g(x, tau0, everyone)
    scale = atol + x.abs() * rtol  # Hairer's initial step (torchdiffeq's _select_initial_step), per image
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = g(x + h0.view(-1, *[1] * (x.dim() - 1)) * f0, tau0 + h0.double(), everyone)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1.0 / order))
    dt = torch.minimum(100 * h0, h1).double()
    y, fy, out = x.clone(), f0, torch.empty_like(x)
    active = everyone
    for _ in range(max_steps):
        if len(active) == 0:
            return out
        view = lambda v: v.view(-1, *[1] * (x.dim() - 1))  # noqa: E731
        y0, fa, t0, h = y[active], fy[active], tau0[active], dt[active]
        hs = view(h.to(x.dtype))
        k = [fa]
        for a_i, b_i in zip(alpha, beta):
            ti = t0 + h if a_i == 1.0 else (t0.to(x.dtype) + a_i * h.to(x.dtype)).double()
            k.append(g(y0 + hs * sum(bj * kj for bj, kj in zip(b_i, k)), ti, active))
        y1 = y0 + hs * sum(c * kj for c, kj in zip(c_sol, k) if c != 0)
        err = hs * sum(c * kj for c, kj in zip(c_err, k) if c != 0)
        ratio = _rms(err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))).double()
        accept = ratio <= 1
        factor = torch.clamp(0.9 / ratio ** (1.0 / order), max=10.0)  # never below 1 when the error is under 1
        factor = torch.where(ratio < 1, torch.clamp(factor, min=1.0), torch.clamp(factor, min=0.2))
        dt[active] = torch.where(ratio == 0, h * 10, h * factor)
        t1 = t0 + h
        finished = accept & (t1 >= 0)
        if finished.any():  # torchdiffeq's quartic through y0, y1, the midpoint and the end slopes, at τ = 0
            i = finished.nonzero()[:, 0]
            ym = y0[i] + hs[i] * sum(c * kj[i] for c, kj in zip(c_mid, k) if c != 0)
            s = view((-t0[i] / h[i]).to(x.dtype))
            p0, p1, pm, q0, q1, hh = y0[i], y1[i], ym, k[0][i], k[-1][i], hs[i]
            a4 = 2 * hh * (q1 - q0) - 8 * (p1 + p0) + 16 * pm
            a3 = hh * (5 * q0 - 3 * q1) + 18 * p0 + 14 * p1 - 32 * pm
            a2 = hh * (q1 - 4 * q0) - 11 * p0 - 5 * p1 + 16 * pm
            out[active[i]] = p0 + s * (hh * q0 + s * (a2 + s * (a3 + s * a4)))
        moved = accept & ~finished
        idx = active[moved]
        y[idx], fy[idx], tau0[idx] = y1[moved], k[-1][moved], t1[moved]
        active = active[~finished]
    raise RuntimeError(f"{solver}: more than {max_steps} steps (atol {atol}, rtol {rtol})")


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
