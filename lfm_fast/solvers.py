"""ODE solvers for dx/dt = f(x, t), integrated from t = 1 (noise) to t = 0 (data): one function per solver.

Fixed-step (`FIXED`), each `solver(f, x, grid, sigma_min) -> x` walking a `Grid`: Euler (order 1), midpoint and
Heun (order 2), classic RK4 (order 4), and the multistep solvers, one network evaluation (NFE) per step:
Adams–Bashforth 2 and 3 on the velocity (variable-step weights), Adams–Bashforth–Moulton 3 (the corrector applied
with the next step's evaluation) and DPM-Solver++(2M) (Lu et al. 2022), which extrapolates the data prediction x̂0
in λ = log(α/σ) of the LFM path. `f(x, t, t_float)` is the velocity at time tensor `t` (`t_float` its Python
value, which decides guidance statically, as an exported graph must).

Adaptive (`TABLEAUS`, `integrate_adaptive`): dopri5 (the LFM paper's default), bosh3 and adaptive_heun, with
torchdiffeq's step-size rule run per image, so an image never depends on its batch (torchdiffeq's `odeint` steps a
whole batch with one step size); tests/test_sampling.py checks each against `torchdiffeq.odeint` on one image.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch

from lfm_fast.choices import FIXED_SOLVERS, SOLVERS


class Grid:
    """The time grid a fixed-step solve walks, from t[0] = 1 to t[-1] = 0. The step arithmetic runs on Python
    floats (constants of an exported graph, no device work), or, where the grid is a float64 tensor being fitted
    (`calibrate` differentiates through it), on that tensor on the state's device; the network's time is made on
    the state's device."""

    def __init__(self, times, x: torch.Tensor):
        self.fitting = torch.is_tensor(times)
        self.tf = times.detach().tolist() if self.fitting else [float(v) for v in times]  # one read of a fitted grid
        self.t = times.to(x.device) if self.fitting else self.tf
        self.steps = len(self.tf) - 1
        self.dtype, self.device = x.dtype, x.device

    def c(self, v):
        """A step coefficient in the state's dtype (a Python float stays one)."""
        return v if isinstance(v, float) else v.to(self.dtype)

    def log(self, v):
        return torch.log(v) if self.fitting else math.log(v)

    def h(self, i: int):
        return self.t[i + 1] - self.t[i]

    def f(self, f: Callable, x: torch.Tensor, t, t_float: float) -> torch.Tensor:
        """f at time t (a grid value or a combination of them) with its float `t_float`."""
        return f(x, self.c(t) if self.fitting else torch.full((), t, dtype=self.dtype, device=self.device), t_float)

    def at(self, f: Callable, x: torch.Tensor, i: int) -> torch.Tensor:
        """f at grid time i."""
        return self.f(f, x, self.t[i], self.tf[i])

    def mid(self, f: Callable, x: torch.Tensor, i: int) -> torch.Tensor:
        """f halfway through step i."""
        return self.f(f, x, (self.t[i] + self.t[i + 1]) / 2, (self.tf[i] + self.tf[i + 1]) / 2)


def euler(f, x, g: Grid, sigma_min):
    for i in range(g.steps):
        x = x + g.c(g.h(i)) * g.at(f, x, i)
    return x


def midpoint(f, x, g: Grid, sigma_min):
    for i in range(g.steps):
        h = g.h(i)
        x = x + g.c(h) * g.mid(f, x + g.c(h / 2) * g.at(f, x, i), i)
    return x


def heun(f, x, g: Grid, sigma_min):
    """The explicit trapezoid."""
    for i in range(g.steps):
        h = g.h(i)
        k1 = g.at(f, x, i)
        k2 = g.at(f, x + g.c(h) * k1, i + 1)
        x = x + g.c(h / 2) * (k1 + k2)
    return x


def rk4(f, x, g: Grid, sigma_min):
    for i in range(g.steps):
        h = g.h(i)
        k1 = g.at(f, x, i)
        k2 = g.mid(f, x + g.c(h / 2) * k1, i)
        k3 = g.mid(f, x + g.c(h / 2) * k2, i)
        k4 = g.at(f, x + g.c(h) * k3, i + 1)
        x = x + g.c(h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


def adams_weights(nodes: list, start, end):
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


def _adams(f, x, g: Grid, order: int, corrector: bool = False):
    """Adams–Bashforth of `order` on the velocities at the current and earlier grid times (a lower order while
    there are fewer); with `corrector`, PEC: Adams–Moulton corrects each step with the velocity at its predicted
    end, which the next step evaluates anyway (the last step stays predicted)."""
    history, pending = [], None  # v at t_i, t_i−1, …; the last step's corrector, waiting for v at its end
    for i in range(g.steps):
        h = g.h(i)
        history = (history + [g.at(f, x, i)])[-order:]
        if pending is not None:
            x_start, w, earlier, h_last = pending
            x = x_start + g.c(h_last) * sum(g.c(wj) * vj for wj, vj in zip(w, [history[-1]] + earlier[::-1]))
        w = adams_weights([g.t[i - j] for j in range(len(history))], g.t[i], g.t[i + 1])
        x_start, x = x, x + g.c(h) * sum(g.c(wj) * vj for wj, vj in zip(w, history[::-1]))
        if corrector:
            w = adams_weights([g.t[i + 1]] + [g.t[i - j] for j in range(len(history))], g.t[i], g.t[i + 1])
            pending = (x_start, w, list(history), h)
    return x


def ab2(f, x, g: Grid, sigma_min):
    return _adams(f, x, g, 2)


def ab3(f, x, g: Grid, sigma_min):
    return _adams(f, x, g, 3)


def abm3(f, x, g: Grid, sigma_min):
    return _adams(f, x, g, 3, corrector=True)


def data_prediction(x, v, t, sigma_min: float):
    """x̂0 from (x_t, v) on the LFM path: x_t = α x0 + σ ε, v = −x0 + (1 − σ_min) ε with α = 1 − t,
    σ = σ_min + (1 − σ_min) t. Solving the 2×2 system, its determinant (1 − σ_min)α + σ is exactly 1."""
    return (1 - sigma_min) * x - (sigma_min + (1 - sigma_min) * t) * v


def dpmpp_2m(f, x, g: Grid, sigma_min):
    """x_t = (σ_t/σ_s)·x_s + α_t(1 − e^{−h})·D, D = x̂0 extrapolated linearly in λ (the first and last steps
    first order)."""
    def sig(k):
        return sigma_min + (1 - sigma_min) * g.t[k]

    def alpha(k):
        return 1 - g.t[k]

    def lam(k):
        return g.log(alpha(k)) - g.log(sig(k))

    last = None  # the previous step's x̂0
    for i in range(g.steps):
        x0 = data_prediction(x, g.at(f, x, i), g.c(g.t[i]), sigma_min)
        d = x0
        if last is not None and i < g.steps - 1:
            if i == 1:  # λ = −∞ at t = 1: the slope in ρ = e^λ = α/σ instead, which is 0 there
                def rho(k):
                    return alpha(k) / sig(k)
                c = (rho(2) - rho(1)) / (2 * (rho(1) - rho(0)))
            else:
                c = (lam(i + 1) - lam(i)) / (2 * (lam(i) - lam(i - 1)))
            d = x0 + g.c(c) * (x0 - last)
        last = x0
        x = g.c(sig(i + 1) / sig(i)) * x + g.c(alpha(i + 1) - sig(i + 1) * alpha(i) / sig(i)) * d
    return x


FIXED = {"euler": euler, "midpoint": midpoint, "heun": heun, "rk4": rk4, "ab2": ab2, "ab3": ab3, "abm3": abm3,
         "dpm++2m": dpmpp_2m}


def integrate_fixed(f: Callable, x: torch.Tensor, times, solver: str, sigma_min: float = 1e-5) -> torch.Tensor:
    """Integrate dx/dt = f(x, t, t_float) over `times` (Python floats, or a float64 tensor to differentiate
    through the grid, as `calibrate` does) with the fixed-step `solver`."""
    if solver not in FIXED_SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {', '.join(SOLVERS)}")
    return FIXED[solver](f, x, Grid(times, x), sigma_min)


class Tableau(NamedTuple):
    """An embedded Runge–Kutta pair: stage times α, stage weights β, solution and error weights, the weights of
    the step's midpoint (for the quartic end interpolant), and the order of the step-size rule."""
    alpha: list
    beta: list
    c_sol: list
    c_error: list
    c_mid: list
    order: int


# The published coefficients (as torchdiffeq writes them, so the same floats): Dormand–Prince 5(4) with
# Shampine's midpoint, Bogacki–Shampine 3(2), and Heun–Euler 2(1).
TABLEAUS = {
    "dopri5": Tableau(
        alpha=[1 / 5, 3 / 10, 4 / 5, 8 / 9, 1., 1.],
        beta=[[1 / 5], [3 / 40, 9 / 40], [44 / 45, -56 / 15, 32 / 9],
              [19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729],
              [9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656],
              [35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84]],
        c_sol=[35 / 384, 0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0],
        c_error=[35 / 384 - 1951 / 21600, 0, 500 / 1113 - 22642 / 50085, 125 / 192 - 451 / 720,
                 -2187 / 6784 - -12231 / 42400, 11 / 84 - 649 / 6300, -1. / 60.],
        c_mid=[6025192743 / 30085553152 / 2, 0, 51252292925 / 65400821598 / 2, -2691868925 / 45128329728 / 2,
               187940372067 / 1594534317056 / 2, -1776094331 / 19743644256 / 2, 11237099 / 235043384 / 2],
        order=5),
    "bosh3": Tableau(
        alpha=[1 / 2, 3 / 4, 1.],
        beta=[[1 / 2], [0., 3 / 4], [2 / 9, 1 / 3, 4 / 9]],
        c_sol=[2 / 9, 1 / 3, 4 / 9, 0.],
        c_error=[2 / 9 - 7 / 24, 1 / 3 - 1 / 4, 4 / 9 - 1 / 3, -1 / 8],
        c_mid=[0., 0.5, 0., 0.],
        order=3),
    "adaptive_heun": Tableau(alpha=[1.], beta=[[1.]], c_sol=[0.5, 0.5], c_error=[0.5, -0.5], c_mid=[0.5, 0.], order=2),
}


def _rms(v: torch.Tensor) -> torch.Tensor:
    return v.flatten(1).pow(2).mean(1).sqrt()


def _first_step(g: Callable, x: torch.Tensor, f0: torch.Tensor, tau0, order: int, atol: float, rtol: float):
    """Hairer's initial step size (torchdiffeq's _select_initial_step), per image: (B,) float64."""
    everyone = torch.arange(x.shape[0], device=x.device)
    scale = atol + x.abs() * rtol
    d0, d1 = _rms(x / scale), _rms(f0 / scale)
    h0 = torch.where((d0 < 1e-5) | (d1 < 1e-5), torch.full_like(d0, 1e-6), 0.01 * d0 / d1)
    f1 = g(x + h0.view(-1, *[1] * (x.dim() - 1)) * f0, tau0 + h0.double(), everyone)
    d2 = _rms((f1 - f0) / scale) / h0
    h1 = torch.where((d1 <= 1e-15) & (d2 <= 1e-15), torch.clamp(h0 * 1e-3, min=1e-6),
                     (0.01 / torch.maximum(d1, d2)) ** (1.0 / order))
    return torch.minimum(100 * h0, h1).double()


def _interpolate(p0, p1, pm, q0, q1, hh, s):
    """torchdiffeq's quartic through the step's ends p0, p1, its midpoint pm and end slopes q0, q1 (step hh), at
    the fraction s of the step."""
    a4 = 2 * hh * (q1 - q0) - 8 * (p1 + p0) + 16 * pm
    a3 = hh * (5 * q0 - 3 * q1) + 18 * p0 + 14 * p1 - 32 * pm
    a2 = hh * (q1 - 4 * q0) - 11 * p0 - 5 * p1 + 16 * pm
    return p0 + s * (hh * q0 + s * (a2 + s * (a3 + s * a4)))


def integrate_adaptive(f: Callable, x: torch.Tensor, solver: str, atol: float, rtol: float,
                       max_steps: int = 100_000) -> torch.Tensor:
    """Adaptive Runge–Kutta with a step size per image: each image runs torchdiffeq's algorithm (its tableau,
    Hairer's initial step, the error ratio RMS(err / (atol + rtol·max(|y0|, |y1|))), safety 0.9, growth ≤ 10,
    shrink ≥ 0.2, steps past t = 0 and its quartic interpolant) on its own, as if alone in the batch: the
    batch only shares network calls. Images that have reached t = 0 leave the batch. f(x, t (n,), rows=idx)."""
    tab = TABLEAUS[solver]
    b = x.shape[0]
    # torchdiffeq integrates decreasing t as τ = −t increasing, with the field −f(−τ): the same here, per image
    g = lambda y, tau, rows: -f(y, -tau.to(y.dtype), rows=rows)  # noqa: E731
    view = lambda v: v.view(-1, *[1] * (x.dim() - 1))  # noqa: E731 - (n,) → (n, 1, …) against the state
    tau0 = torch.full((b,), -1.0, dtype=torch.float64, device=x.device)
    active = torch.arange(b, device=x.device)
    f0 = g(x, tau0, active)
    dt = _first_step(g, x, f0, tau0, tab.order, atol, rtol)
    y, fy, out = x.clone(), f0, torch.empty_like(x)
    for _ in range(max_steps):
        if len(active) == 0:
            return out
        y0, fa, t0, h = y[active], fy[active], tau0[active], dt[active]
        hs = view(h.to(x.dtype))
        k = [fa]
        for a_i, b_i in zip(tab.alpha, tab.beta):
            ti = t0 + h if a_i == 1.0 else (t0.to(x.dtype) + a_i * h.to(x.dtype)).double()
            k.append(g(y0 + hs * sum(bj * kj for bj, kj in zip(b_i, k)), ti, active))
        y1 = y0 + hs * sum(c * kj for c, kj in zip(tab.c_sol, k) if c != 0)
        err = hs * sum(c * kj for c, kj in zip(tab.c_error, k) if c != 0)
        ratio = _rms(err / (atol + rtol * torch.maximum(y0.abs(), y1.abs()))).double()
        accept = ratio <= 1
        factor = torch.clamp(0.9 / ratio ** (1.0 / tab.order), max=10.0)  # never below 1 when the error is under 1
        factor = torch.where(ratio < 1, torch.clamp(factor, min=1.0), torch.clamp(factor, min=0.2))
        dt[active] = torch.where(ratio == 0, h * 10, h * factor)
        t1 = t0 + h
        finished = accept & (t1 >= 0)
        if finished.any():  # the step passed τ = 0: interpolate back to it
            i = finished.nonzero()[:, 0]
            ym = y0[i] + hs[i] * sum(c * kj[i] for c, kj in zip(tab.c_mid, k) if c != 0)
            out[active[i]] = _interpolate(y0[i], y1[i], ym, k[0][i], k[-1][i], hs[i], view((-t0[i] / h[i]).to(x.dtype)))
        moved = accept & ~finished
        idx = active[moved]
        y[idx], fy[idx], tau0[idx] = y1[moved], k[-1][moved], t1[moved]
        active = active[~finished]
    raise RuntimeError(f"{solver}: more than {max_steps} steps (atol {atol}, rtol {rtol})")
