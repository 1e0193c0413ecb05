import math

import pytest
import torch

from lfm_fast.sampling import Field, per_image_noise, sample, time_grid
from lfm_fast.solvers import data_prediction
from tests.conftest import perturbed


class KnownField(torch.nn.Module):
    """dx/dt = −t·x + 0.5·sin(3t)·x², a smooth nonlinear field; reference: RK4 with many steps."""

    def forward(self, x, t, y=None, cond=None):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        return -t * x + 0.5 * torch.sin(3 * t) * x**2


def reference_solution(x1):
    return sample(KnownField(), x1, solver="rk4", steps=4096).latents


@pytest.mark.parametrize("solver,order,nfe_per_step", [("euler", 1, 1), ("midpoint", 2, 2), ("heun", 2, 2), ("rk4", 4, 4),
                                                       ("ab2", 2, 1), ("ab3", 2, 1), ("abm3", 3, 1)])
@pytest.mark.parametrize("grid,shift", [("uniform", 1.0), ("power", 1.5)])
def test_fixed_step_convergence_order_and_nfe(solver, order, nfe_per_step, grid, shift):
    """Orders on uniform and on variable steps (the power grid): the multistep weights follow the step ratios.
    AB3's steps are third order, but its first (Euler) step bounds it to second order globally; AB3 with Moulton's
    corrector (PEC) is third order, its start being Heun in effect."""
    x1 = torch.linspace(-0.5, 0.5, 7, dtype=torch.float64).view(1, 7)
    exact = reference_solution(x1)
    errors = []
    for steps in (32, 64, 128):
        res = sample(KnownField(), x1, solver=solver, steps=steps, grid=grid, shift=shift)
        assert res.nfe == nfe_per_step * steps and res.image_nfe.tolist() == [res.nfe]
        errors.append((res.latents - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.4 for o in orders), (solver, errors, orders)
    if solver == "ab3" and grid == "uniform":
        ab2 = sample(KnownField(), x1, solver="ab2", steps=128, grid=grid, shift=shift).latents
        assert errors[-1] < 0.7 * (ab2 - exact).abs().max().item()


def test_adams_weights_integrate_polynomials_on_uneven_nodes():
    """Floats in (an exported graph's constants) and a float64 grid being calibrated (gradients through it) give
    the same weights, which integrate every polynomial of degree < len(nodes) exactly."""
    from lfm_fast.solvers import adams_weights

    for nodes, start, end in [([0.3], 0.3, 0.1), ([0.3, 0.45], 0.3, 0.1), ([0.3, 0.45, 0.7, 0.72], 0.3, 0.1),
                              ([0.1, 0.3, 0.45], 0.3, 0.1)]:  # the last: Moulton's, the step's end first
        w = adams_weights(nodes, start, end)
        for m in range(len(nodes)):
            exact = (end ** (m + 1) - start ** (m + 1)) / (m + 1) / (end - start)
            assert abs(sum(float(wj) * n ** m for wj, n in zip(w, nodes)) - exact) < 1e-12
        grid = torch.tensor([*nodes, start, end], dtype=torch.float64, requires_grad=True)
        wt = adams_weights(list(grid[:len(nodes)]), grid[-2], grid[-1])
        torch.testing.assert_close(wt, torch.tensor(w, dtype=torch.float64), rtol=1e-12, atol=1e-12)
        (wt * torch.arange(1.0, len(nodes) + 1, dtype=torch.float64)).sum().backward()
        assert torch.isfinite(grid.grad).all() and (grid.grad.abs().sum() > 0) == (len(nodes) > 1)


class GaussianFlow(torch.nn.Module):
    """The exact LFM velocity for data N(μ, s²) (per element): x_t = α_t μ + r_t z, r_t = √(α_t² s² + σ_t²), so the
    ODE maps x(1) to x(0) = μ + √(s² + σ_min²)·x(1). With s = 0 (one data point) x̂0 ≡ μ along every path."""

    def __init__(self, mu, s, sigma_min=1e-5):
        super().__init__()
        self.mu, self.s, self.sigma_min = mu, s, sigma_min

    def forward(self, x, t, y=None, cond=None):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        a, sig = 1 - t, self.sigma_min + (1 - self.sigma_min) * t
        r = (a ** 2 * self.s ** 2 + sig ** 2).sqrt()
        return -self.mu + (-a * self.s ** 2 + sig * (1 - self.sigma_min)) / r * (x - a * self.mu) / r

    def exact(self, x1):
        return self.mu + (self.s ** 2 + self.sigma_min ** 2) ** 0.5 * x1


def test_dpm_solver_is_exact_where_its_data_prediction_is_and_converges_on_a_gaussian():
    """DPM-Solver++(2M) integrates the path's linear part exactly: for a single data point (x̂0 constant) any grid is
    exact, σ_min included; on Gaussian data it converges. Its last step, into σ_min (λ → log 1/σ_min), is first
    order, as DPM-Solver++ has it: that step's error is O(h·dx̂0/dt), so the observed order sits between 1.5 and 2."""
    mu = torch.linspace(-1, 1, 7, dtype=torch.float64).view(1, 7)
    x1 = torch.linspace(-2, 2, 7, dtype=torch.float64).view(1, 7)
    for sigma_min in (1e-5, 0.01):
        point = GaussianFlow(mu, torch.zeros_like(mu), sigma_min)
        for steps, grid in ((1, "uniform"), (3, "uniform"), (5, "power")):
            out = sample(point, x1, solver="dpm++2m", steps=steps, grid=grid, shift=2.0, sigma_min=sigma_min).latents
            torch.testing.assert_close(out, point.exact(x1), rtol=1e-10, atol=1e-10)
    gauss = GaussianFlow(mu, torch.full_like(mu, 0.5))
    errors = [(sample(gauss, x1, solver="dpm++2m", steps=n).latents - gauss.exact(x1)).abs().max().item() for n in (64, 128, 256)]
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.5 < o < 2.3 for o in orders) and errors[-1] < 3e-4, (errors, orders)


def test_data_prediction_inverts_the_path():
    """x̂0 from (x_t, v) recovers x0 exactly on the LFM path, for any σ_min (its 2×2 determinant is 1)."""
    from lfm_fast.flow import interpolate, target_velocity

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.randn(5, 3, generator=g, dtype=torch.float64)
    for sigma_min in (0.0, 1e-5, 0.1):
        for t in (0.0, 0.3, 1.0):
            xt = interpolate(x0, eps, torch.full((5,), t, dtype=torch.float64), sigma_min)
            torch.testing.assert_close(data_prediction(xt, target_velocity(x0, eps, sigma_min), t, sigma_min), x0)


def test_linear_field_has_closed_form():
    # dx/dt = −2t·x from t = 1 to 0: x(0) = x(1)·e
    class Linear(torch.nn.Module):
        def forward(self, x, t, y=None, cond=None):
            return -2 * t.view(-1, 1) * x

    x1 = torch.ones(1, 3, dtype=torch.float64)
    out = sample(Linear(), x1, solver="rk4", steps=64).latents
    torch.testing.assert_close(out, x1 * math.e, rtol=1e-7, atol=0)


def test_solver_registry_one_function_or_tableau_per_choice():
    """Every solver a flag or config may name has its own function (fixed-step) or tableau (adaptive), and every
    tableau is a consistent embedded pair: each stage's weights sum to its time, the solution's to 1, the error
    estimate's to 0, the midpoint's to 1/2 (a mistyped coefficient breaks one of these)."""
    from lfm_fast import solvers
    from lfm_fast.choices import ADAPTIVE_SOLVERS, FIXED_SOLVERS

    assert tuple(solvers.FIXED) == FIXED_SOLVERS and tuple(solvers.TABLEAUS) == ADAPTIVE_SOLVERS
    assert len(set(solvers.FIXED.values())) == len(FIXED_SOLVERS)
    for tab in solvers.TABLEAUS.values():
        assert len(tab.alpha) == len(tab.beta) and len(tab.c_sol) == len(tab.c_error) == len(tab.c_mid) == len(tab.alpha) + 1
        for a, b in zip(tab.alpha, tab.beta):
            assert abs(sum(b) - a) < 1e-14
        assert abs(sum(tab.c_sol) - 1) < 1e-14 and abs(sum(tab.c_error)) < 1e-14 and abs(sum(tab.c_mid) - 0.5) < 1e-14
    with pytest.raises(ValueError, match="unknown solver 'rk5'"):
        solvers.integrate_fixed(lambda x, t, tf: x, torch.zeros(1, 2), [1.0, 0.0], "rk5")


@pytest.mark.parametrize("solver", ["dopri5", "bosh3", "adaptive_heun"])
def test_adaptive_solver_is_torchdiffeq_per_image(solver):
    """Each image runs torchdiffeq's own algorithm alone: at batch 1, the same NFE and the same result as
    torchdiffeq.odeint; in a batch, every image its own NFE and the result it has alone."""
    from torchdiffeq import odeint

    rows = torch.linspace(0.2, 1.5, 4, dtype=torch.float64)[:, None] * torch.linspace(-0.5, 0.5, 7, dtype=torch.float64)
    # and the first step's special cases: a row of zeros (a zero field: the smallest first step) and one of the
    # tolerance's size (the first step from the ratio of the state's and the field's norms)
    rows = torch.cat([rows, torch.zeros(1, 7, dtype=torch.float64), 3e-8 * rows[-1:]])
    batch = sample(KnownField(), rows, solver=solver, atol=1e-7, rtol=1e-7)
    for i in range(len(rows)):
        calls = []
        ref = odeint(lambda t, x: calls.append(1) or KnownField()(x, t.expand(1)), rows[i:i + 1],
                     torch.tensor([1.0, 0.0], dtype=torch.float64), method=solver, atol=1e-7, rtol=1e-7)[-1]
        alone = sample(KnownField(), rows[i:i + 1], solver=solver, atol=1e-7, rtol=1e-7)
        assert alone.nfe == len(calls) == batch.image_nfe[i]
        torch.testing.assert_close(alone.latents, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch.latents[i:i + 1], ref, rtol=1e-12, atol=1e-12)
    assert batch.nfe == batch.image_nfe.max() and len(set(batch.image_nfe.tolist())) > 1  # images differ in steps
    assert (batch.latents - reference_solution(rows)).abs().max() < 1e-3


def test_time_grid_errors_name_what_is_wrong_and_the_default_shift_is_one():
    """Each refusal of time_grid says which input is wrong; a shifted or power grid without a shift is the uniform one."""
    assert time_grid(4, "power") == time_grid(4) == time_grid(4, "shifted")
    with pytest.raises(ValueError, match="steps must be ≥ 1, got 0"):
        time_grid(0)
    with pytest.raises(ValueError, match="the 'power' grid needs a finite shift > 0, got -1"):
        time_grid(4, "power", shift=-1.0)
    with pytest.raises(ValueError, match="needs its times"):
        time_grid(2, "calibrated")
    for times in ([0.9, 0.5, 0.0], [1.0, 0.5, 0.1]):  # either end wrong
        with pytest.raises(ValueError, match="must run from 1 to 0"):
            time_grid(2, "calibrated", times=times)
    with pytest.raises(ValueError, match="fall strictly"):  # a repeated time is a step of length 0
        time_grid(3, "calibrated", times=[1.0, 0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="expected one of uniform, shifted, power, calibrated"):
        time_grid(2, "cosine")


def test_guidance_runs_only_where_it_changes_something():
    """CFG doubles the rows only for a guidance scale ≠ 1 on a model given labels or a condition: an unconditional
    model or scale 1 runs the plain forward, with the same result."""
    labelled, noise = _tiny_dit(), per_image_noise([1, 2], (4, 8, 8))
    for model, y, cfg in ((labelled, torch.tensor([0, 2]), 1.0), (_tiny_dit(num_classes=0), None, 3.0)):
        res = sample(model, noise, y, solver="euler", steps=2, cfg=cfg)
        assert res.net_rows == 2 * 2
        torch.testing.assert_close(res.latents, sample(model, noise, y, solver="euler", steps=2).latents)


def test_time_grids():
    u = torch.tensor(time_grid(8))
    assert u[0] == 1 and u[-1] == 0 and (u[1:] < u[:-1]).all()
    s = torch.tensor(time_grid(8, "shifted", shift=3.0))
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all() and (s[1:-1] > u[1:-1]).all()
    p = torch.tensor(time_grid(8, "power", shift=2.0))
    torch.testing.assert_close(p, u ** 2)
    assert (p[1:-1] < u[1:-1]).all()  # more steps near the data end
    assert time_grid(2, "calibrated", times=[1, 0.3, 0]) == [1.0, 0.3, 0.0]
    with pytest.raises(ValueError, match="time grid"):
        time_grid(8, "cosine")
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="shift > 0"):
            time_grid(8, "shifted", shift=bad)
    with pytest.raises(ValueError, match="fall strictly"):
        time_grid(3, "calibrated", times=[1, 0.5, 0.7, 0])
    with pytest.raises(ValueError, match="of 1 steps"):
        time_grid(2, "calibrated", times=[1, 0])


class Recorder(torch.nn.Module):
    """A bf16 'network' v = −x (in bf16) that records the dtypes and times it is called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))
        self.seen = []

    def forward(self, x, t, y=None, cond=None):
        self.seen.append((x.dtype, t.dtype, t[0].item()))
        return -self.w * x


@pytest.mark.parametrize("solver", ["heun", "dpm++2m", "dopri5"])
def test_state_and_time_stay_fp32_around_a_bf16_network(solver):
    """Only the network runs in bf16: it gets bf16 x and fp32 t (never quantised to bf16's 2⁻⁸ steps near 1);
    the state accumulates in fp32, so dopri5 meets its tolerance and the result is fp32."""
    net = Recorder()
    x1 = torch.ones(2, 3, dtype=torch.bfloat16)
    res = sample(net, x1, solver=solver, steps=100, atol=1e-5, rtol=1e-5)
    assert res.latents.dtype == torch.float32
    assert {d for d, _, _ in net.seen} == {torch.bfloat16} and {d for _, d, _ in net.seen} == {torch.float32}
    assert any(t != torch.tensor(t).bfloat16().item() for _, _, t in net.seen)  # times bf16 cannot hold (0.99, …)
    # dx/dt = −x from 1 to 0: x(0) = e·x(1); the bf16 network's rounding bounds the error, not the state's
    torch.testing.assert_close(res.latents, torch.full((2, 3), math.e), rtol=1e-2, atol=0)


def _tiny_dit(**kw):
    from lfm_fast.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    return perturbed(DiT(DiTConfig(**{**dict(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3), **kw})))


def test_guidance_interval_counts_rows_and_matches_a_switched_field():
    """CFG only for t in [0.5, 1]: Heun × 4 evaluates at 1, .75, .75, .5, .5 (guided) and .25, .25, 0 (the
    conditional half alone): 8 NFE, 5·2 + 3 rows per image; the same as integrating the switched field by hand."""
    model = _tiny_dit()
    noise, y = per_image_noise([1, 2], (4, 8, 8)), torch.tensor([0, 2])
    res = sample(model, noise, y, solver="heun", steps=4, cfg=3.0, cfg_interval=(0.5, 1.0))
    assert res.nfe == 8 and res.net_rows == 2 * (5 * 2 + 3)
    x = noise.clone()
    v = lambda x_, t: (model.forward_with_cfg if t >= 0.5 else lambda a, b, c, s: model(a, b, c))(  # noqa: E731
        x_, torch.full((2,), t), y, 3.0)
    with torch.no_grad():
        for t0, t1 in zip([1, 0.75, 0.5, 0.25], [0.75, 0.5, 0.25, 0]):
            k1 = v(x, t0)
            x = x + (t1 - t0) / 2 * (k1 + v(x + (t1 - t0) * k1, t1))
    torch.testing.assert_close(res.latents, x, rtol=1e-5, atol=1e-5)
    full = sample(model, noise, y, solver="heun", steps=4, cfg=3.0)
    assert full.net_rows == 2 * 16 and not torch.allclose(full.latents, res.latents)


class CondRecorder(torch.nn.Module):
    """A bf16 network with a condition and CFG that records the condition of every call."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones((), dtype=torch.bfloat16))
        self.seen = []

    def forward(self, x, t, y=None, cond=None):
        self.seen.append(cond)
        return -self.w * x

    def forward_with_cfg(self, x, t, y, scale, cond=None, guided=None):
        return self.forward(x, t, y, cond)


@pytest.mark.parametrize("solver", ["heun", "dopri5"])
def test_the_condition_reaches_every_guided_and_unguided_call_in_the_networks_dtype(solver):
    net, cond = CondRecorder(), torch.rand(2, 3, dtype=torch.float64)
    sample(net, torch.ones(2, 3), cond=cond, solver=solver, steps=2, cfg=2.0, cfg_interval=(0.5, 1.0))
    assert len(net.seen) > 2 and all(c is not None and c.dtype == torch.bfloat16 for c in net.seen)
    assert all(torch.equal(c, cond.to(torch.bfloat16)[:len(c)]) or len(c) < len(cond) for c in net.seen)


def test_a_batch_straddling_the_guidance_interval_guides_only_its_rows_inside():
    """An adaptive batch at a time per image: the rows inside the interval get CFG, the others the conditional
    half alone, in one network call of 3 rows (2 + 1), the condition and labels of each row kept."""
    model = _tiny_dit()
    x, y = per_image_noise([1, 2], (4, 8, 8)), torch.tensor([0, 2])
    field = Field(model, 2, y, None, 3.0, (0.5, 1.0))
    with torch.no_grad():
        v = field(x, torch.tensor([0.8, 0.2]), rows=torch.arange(2))
        inside = model.forward_with_cfg(x[:1], torch.tensor([0.8]), y[:1], 3.0)
        outside = model(x[1:], torch.tensor([0.2]), y[1:])
    torch.testing.assert_close(v, torch.cat([inside, outside]), rtol=1e-5, atol=1e-5)
    assert field.net_rows == 3 and field.image_nfe.tolist() == [1, 1]


def test_adaptive_sampling_is_batch_invariant():
    """float64 (where the network itself is batch-invariant): an image alone and among 7 others, with CFG on an
    interval (so a batch mixes guided and unguided rows), has the same trajectory, image and NFE."""
    model = _tiny_dit().double()
    seeds, y = [3, 4, 5, 6, 7, 8, 9, 10], torch.arange(8) % 3
    batch = sample(model, per_image_noise(seeds, (4, 8, 8), dtype=torch.float64), y, solver="dopri5", cfg=2.0,
                   cfg_interval=(0.3, 0.9))
    for i in (0, 5):
        alone = sample(model, per_image_noise(seeds[i:i + 1], (4, 8, 8), dtype=torch.float64), y[i:i + 1],
                       solver="dopri5", cfg=2.0, cfg_interval=(0.3, 0.9))
        assert alone.nfe == batch.image_nfe[i]
        torch.testing.assert_close(batch.latents[i:i + 1], alone.latents, rtol=1e-5, atol=1e-5)
    # rows outside the interval ran unguided, those inside guided (each image's own time decides)
    assert int(batch.image_nfe.sum()) < batch.net_rows < 2 * int(batch.image_nfe.sum())


def test_adaptive_overshoot_past_t0_keeps_the_guidance():
    """dopri5's last step runs past t = 0 and interpolates back: with CFG on all of [0, 1] every evaluation is
    guided, those beyond t = 0 too (unguided ones there made the field jump at t = 0: more rejected steps)."""
    model = _tiny_dit()
    res = sample(model, per_image_noise([1, 2, 3], (4, 8, 8)), torch.arange(3), solver="dopri5", cfg=2.0)
    assert res.net_rows == 2 * int(res.image_nfe.sum())


def test_same_seed_same_samples_and_batch_independence():
    from lfm_fast.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)))
    noise = per_image_noise([5, 6, 7], (4, 8, 8))
    y = torch.tensor([0, 1, 2])
    a = sample(model, noise, y, solver="heun", steps=4, cfg=2.0)
    b = sample(model, per_image_noise([5, 6, 7], (4, 8, 8)), y, solver="heun", steps=4, cfg=2.0)
    assert a.nfe == 8 and a.net_rows == 3 * 2 * 8 and torch.equal(a.latents, b.latents)  # one CFG batch = one NFE
    single = sample(model, per_image_noise([6], (4, 8, 8)), y[1:2], solver="heun", steps=4, cfg=2.0)
    torch.testing.assert_close(single.latents[0], a.latents[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_image_noise([5], (4, 8, 8)), per_image_noise([6], (4, 8, 8)))
    # the fp32 draws of each seed, on the device and in the dtype asked for
    wide = per_image_noise([5, 6, 7], (4, 8, 8), dtype=torch.float64)
    assert wide.dtype == torch.float64 and torch.equal(wide, noise.double())
    assert per_image_noise([5], (4, 8, 8), device="meta").device.type == "meta"


class ConditionedField(torch.nn.Module):
    """A velocity that reads its labels and its condition."""

    def forward(self, x, t, y=None, cond=None):
        scale = (1 + y.to(x.dtype)).view(-1, *[1] * (x.dim() - 1))
        return -scale * x + cond.mean(dim=tuple(range(1, cond.dim())), keepdim=True) * t.view(-1, *[1] * (x.dim() - 1))


def test_sample_with_passes_every_field_of_its_config():
    """`sample_with(cfg)` is `sample` with the config's solver, steps, tolerances, grid and guidance written out,
    the labels, the condition and sigma_min (the data prediction of DPM-Solver++ reads it) passed on."""
    from lfm_fast.sampling import SampleConfig, sample_with

    noise, y, cond = per_image_noise([1, 2], (2, 4, 4)), torch.tensor([0, 2]), torch.randn(2, 3, 4, 4)
    for cfg, sigma_min in [(SampleConfig("dopri5", atol=1e-3, rtol=1e-2), 1e-5), (SampleConfig("dpm++2m", 6, grid="power", shift=2.0), 0.2)]:
        got = sample_with(ConditionedField(), noise, y, cfg, cond, sigma_min=sigma_min)
        want = sample(ConditionedField(), noise, y, cfg.solver, cfg.steps, cond=cond, grid=cfg.grid, shift=cfg.shift,
                      atol=cfg.atol, rtol=cfg.rtol, sigma_min=sigma_min)
        assert got.nfe == want.nfe and torch.equal(got.latents, want.latents)
        other = sample(ConditionedField(), noise, y, cfg.solver, cfg.steps, cond=cond, grid=cfg.grid, shift=cfg.shift)
        assert not torch.equal(got.latents, other.latents)  # the tolerances and sigma_min matter here


def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        sample(KnownField(), torch.zeros(1, 2), solver="rk45")


def test_a_config_describes_itself_in_one_line():
    """The line `sample` prints and the reports keep: solver and steps or tolerances, grid (with its shift where it
    has one), guidance scale and its interval where it is not the whole of [0, 1]."""
    from lfm_fast.sampling import SampleConfig

    assert SampleConfig("ab3", 16, 3, grid="calibrated", cfg_lo=0.2, cfg_hi=0.8).describe() == \
        "ab3 × 16 steps, calibrated grid, cfg 3 on t in [0.2, 0.8]"
    assert SampleConfig("heun", 8, 1.5, grid="shifted", shift=3.0).describe() == "heun × 8 steps, shifted 3 grid, cfg 1.5"
    assert SampleConfig("euler", 4, grid="power", shift=1.5, cfg_hi=0.5).describe() == \
        "euler × 4 steps, power 1.5 grid, cfg 1 on t in [0, 0.5]"
    assert SampleConfig("dopri5", cfg=2, atol=1e-4, rtol=2e-5).describe() == "dopri5 atol 0.0001 rtol 2e-05, cfg 2"
