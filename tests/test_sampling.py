import math

import pytest
import torch

from lfm_fast.sampling import CountingField, SampleConfig, integrate, per_image_noise, sample, time_grid
from tests.conftest import perturbed


class KnownField(torch.nn.Module):
    """dx/dt = −t·x + 0.5·sin(3t)·x², a smooth nonlinear field; reference: RK4 with many steps."""

    def forward(self, x, t, y=None, cond=None):
        t = t.view(-1, *([1] * (x.dim() - 1)))
        return -t * x + 0.5 * torch.sin(3 * t) * x**2


def reference_solution(x1):
    return sample(KnownField(), x1, solver="rk4", steps=4096).latents


@pytest.mark.parametrize("solver,order,nfe_per_step", [("euler", 1, 1), ("midpoint", 2, 2), ("heun", 2, 2), ("rk4", 4, 4)])
def test_fixed_step_convergence_order_and_nfe(solver, order, nfe_per_step):
    x1 = torch.linspace(-0.5, 0.5, 7, dtype=torch.float64).view(1, 7)
    exact = reference_solution(x1)
    errors = []
    for steps in (16, 32, 64):
        res = sample(KnownField(), x1, solver=solver, steps=steps)
        assert res.nfe == nfe_per_step * steps
        errors.append((res.latents - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(abs(o - order) < 0.35 for o in orders), (solver, errors, orders)


def test_linear_field_has_closed_form():
    # dx/dt = −2t·x from t = 1 to 0: x(0) = x(1)·e
    class Linear(torch.nn.Module):
        def forward(self, x, t, y=None, cond=None):
            return -2 * t.view(-1, 1) * x

    x1 = torch.ones(1, 3, dtype=torch.float64)
    out = sample(Linear(), x1, solver="rk4", steps=64).latents
    torch.testing.assert_close(out, x1 * math.e, rtol=1e-7, atol=0)


@pytest.mark.parametrize("solver,stages", [("dopri5", 6), ("bosh3", 3)])
def test_adaptive_nfe_agrees_with_torchdiffeq_step_count(solver, stages):
    x1 = torch.linspace(-0.5, 0.5, 7, dtype=torch.float64).view(1, 7)
    field = CountingField(lambda x, t: KnownField()(x, t.expand(x.shape[0])))
    res = integrate(field, x1, SampleConfig(solver=solver, atol=1e-8, rtol=1e-8))
    steps = field.accepted + field.rejected
    assert steps > 3
    # f(t0) + one more for the initial step size, then (stages − 1) new evaluations per step (FSAL)
    assert res.nfe == 2 + stages * steps
    assert (res.latents - reference_solution(x1)).abs().max() < 1e-4  # global error of a 1e-8 local tolerance


def test_time_grids():
    u = time_grid(8)
    assert u[0] == 1 and u[-1] == 0 and (u[1:] < u[:-1]).all()
    s = time_grid(8, "shifted", shift=3.0)
    assert s[0] == 1 and s[-1] == 0 and (s[1:] < s[:-1]).all() and (s[1:-1] > u[1:-1]).all()
    with pytest.raises(ValueError, match="time grid"):
        time_grid(8, "cosine")


def test_same_seed_same_samples_and_batch_independence():
    from lfm_fast.models.dit import DiT, DiTConfig

    torch.manual_seed(0)
    model = perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3)))
    noise = per_image_noise([5, 6, 7], (4, 8, 8))
    y = torch.tensor([0, 1, 2])
    a = sample(model, noise, y, solver="heun", steps=4, cfg=2.0)
    b = sample(model, per_image_noise([5, 6, 7], (4, 8, 8)), y, solver="heun", steps=4, cfg=2.0)
    assert a.nfe == 8 and torch.equal(a.latents, b.latents)  # one CFG batch = one NFE
    single = sample(model, per_image_noise([6], (4, 8, 8)), y[1:2], solver="heun", steps=4, cfg=2.0)
    torch.testing.assert_close(single.latents[0], a.latents[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(per_image_noise([5], (4, 8, 8)), per_image_noise([6], (4, 8, 8)))


def test_unknown_solver():
    with pytest.raises(ValueError, match="unknown solver"):
        sample(KnownField(), torch.zeros(1, 2), solver="rk45")
