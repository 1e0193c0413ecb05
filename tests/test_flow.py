import torch

from lfm_fast.flow import FlowConfig, draw_flow, flow_matching_loss, interpolate, sample_time, target_velocity
from lfm_fast.models.cond import drop_labels


def test_path_endpoints_and_target_by_hand():
    x0, eps, s = torch.tensor([[2.0]]), torch.tensor([[-1.0]]), 1e-5
    assert abs(interpolate(x0, eps, torch.tensor([0.0]), s).item() - (2.0 - s)) < 1e-7
    assert abs(interpolate(x0, eps, torch.tensor([1.0]), s).item() - (-1.0)) < 1e-7
    # t = 0.25: 0.75·2 + (1e-5 + 0.99999·0.25)·(−1)
    assert abs(interpolate(x0, eps, torch.tensor([0.25]), s).item() - (1.5 - (1e-5 + 0.99999 * 0.25))) < 1e-6
    assert abs(target_velocity(x0, eps, s).item() - (0.99999 * -1.0 - 2.0)) < 1e-6
    # the target is the time derivative of the path
    t, h = torch.tensor([0.4]), 1e-3
    fd = (interpolate(x0, eps, t + h, s) - interpolate(x0, eps, t - h, s)) / (2 * h)
    assert torch.allclose(fd, target_velocity(x0, eps, s), atol=1e-4)


class ConstantModel(torch.nn.Module):
    config = None

    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x, t, y=None, cond=None):
        return torch.full_like(x, self.value)


def test_loss_equals_a_hand_computation_with_the_same_draws():
    cfg = FlowConfig()
    x0 = torch.randn(5, 2, 3, 3)
    loss = flow_matching_loss(ConstantModel(0.5), x0, None, cfg, torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    eps = torch.randn(x0.shape, generator=g)
    expected = ((0.5 - ((1 - 1e-5) * eps - x0)) ** 2).mean()
    torch.testing.assert_close(loss, expected)


def test_time_sampling_ranges():
    g = torch.Generator().manual_seed(0)
    u = sample_time(20000, FlowConfig(), g)
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    ln = sample_time(20000, FlowConfig(time_sampling="logit_normal"), g)
    assert 0 < ln.min() and ln.max() < 1 and abs(ln.median() - 0.5) < 0.01 and ln.std() < u.std()


def test_times_come_from_the_generator_as_written_out_and_an_unknown_kind_is_named():
    torch.manual_seed(0)
    for cfg in (FlowConfig(), FlowConfig(time_sampling="logit_normal", logit_mean=0.4, logit_std=1.3)):
        g, replay = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
        want = (torch.rand(6, generator=replay) if cfg.time_sampling == "uniform"
                else torch.sigmoid(0.4 + 1.3 * torch.randn(6, generator=replay)))
        assert torch.equal(sample_time(6, cfg, g), want), cfg.time_sampling  # the generator's draws, not torch's global
    import pytest

    with pytest.raises(ValueError, match="unknown time_sampling 'beta'; expected 'uniform' or 'logit_normal'"):
        sample_time(2, FlowConfig(time_sampling="beta"))


def test_label_dropout_rate_and_null_class():
    y = torch.zeros(20000, dtype=torch.long)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    d = drop_labels(y, 0.1, 10, u)
    assert set(d.unique().tolist()) == {0, 10} and abs((d == 10).float().mean() - 0.1) < 0.01
    assert torch.equal(d == 10, u < 0.1)
    assert drop_labels(y, 0.0, 10, u) is y


def test_loss_split_over_parts_equals_whole_batch():
    """A global batch split into parts (ranks × micro-batches) sees the same draws: mean of part losses = whole loss."""
    cfg = FlowConfig(time_sampling="logit_normal")
    torch.manual_seed(0)
    net = torch.nn.Conv2d(2, 2, 1)
    model = lambda x, t, y, cond: net(x) * t.view(-1, 1, 1, 1)  # noqa: E731
    x0 = torch.randn(8, 2, 4, 4)
    whole = flow_matching_loss(model, x0, None, cfg, torch.Generator().manual_seed(3))
    draws = draw_flow(8, (2, 4, 4), cfg, torch.Generator().manual_seed(3))
    parts = [flow_matching_loss(model, x0[lo:lo + 2], None, cfg, draws=draws.rows(lo, 2)) for lo in range(0, 8, 2)]
    torch.testing.assert_close(torch.stack(parts).mean(), whole, rtol=1e-6, atol=0)


def test_condition_dropout_trains_the_null_condition_on_the_drawn_rows():
    """Rows with uc < p see the null condition (inpaint: all hole, latent 0), the others their own; the label-drop
    draws before them are unchanged (a run without conditions draws exactly as before)."""
    from types import SimpleNamespace

    seen = []

    class Spy(torch.nn.Module):
        config = SimpleNamespace(num_classes=0, condition="inpaint")

        def forward(self, x, t, y=None, cond=None):
            seen.append(cond)
            return torch.zeros_like(x)

    cfg, n = FlowConfig(), 4000
    x0, cond = torch.randn(n, 2, 2, 2), torch.cat([torch.randn(n, 2, 2, 2), torch.zeros(n, 1, 2, 2)], dim=1)
    draws = draw_flow(n, (2, 2, 2), cfg, torch.Generator().manual_seed(5), label_dropout=0.1, cond_dropout=0.2)
    plain = draw_flow(n, (2, 2, 2), cfg, torch.Generator().manual_seed(5), label_dropout=0.1)
    assert torch.equal(draws.u, plain.u) and torch.equal(draws.noise, plain.noise) and plain.uc is None
    flow_matching_loss(Spy(), x0, None, cfg, cond=cond, draws=draws, cond_dropout=0.2)
    dropped = draws.uc < 0.2
    assert abs(dropped.float().mean() - 0.2) < 0.02
    assert (seen[0][dropped, -1] == 1).all() and not seen[0][dropped, :-1].any()
    assert torch.equal(seen[0][~dropped], cond[~dropped])


def test_the_loss_from_a_generator_draws_and_drops_labels_and_conditions_as_written_out():
    """Without `draws`, the loss draws noise, t, then the label-drop uniforms (label_dropout > 0), then the condition
    ones (a condition and cond_dropout > 0), in that order and nothing more; the model sees x_t in x0's dtype, the
    labels with the drawn rows set to the null class, the condition with its drawn rows null; the loss is the mean
    square error to the target velocity. A model without a config (a bare function) keeps its labels."""
    from types import SimpleNamespace

    from lfm_fast.flow import FlowDraws

    seen = {}

    class Spy(torch.nn.Module):
        config = SimpleNamespace(num_classes=5, condition="semantic")

        def forward(self, x, t, y=None, cond=None):
            seen.update(x=x, t=t, y=y, cond=cond)
            return 0.5 * x

    cfg, n, shape = FlowConfig(sigma_min=1e-3), 64, (2, 3, 3)
    x0, y, cond = torch.randn(n, *shape), torch.arange(n) % 5, torch.rand(n, 4, 3, 3)
    g = torch.Generator().manual_seed(9)
    loss = flow_matching_loss(Spy(), x0, y, cfg, g, label_dropout=0.3, cond=cond, cond_dropout=0.4)
    replay = torch.Generator().manual_seed(9)
    noise, t, u, uc = torch.randn((n, *shape), generator=replay), *(torch.rand(n, generator=replay) for _ in range(3))
    assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=replay))  # four draws, no more
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + (1e-3 + (1 - 1e-3) * t.view(-1, 1, 1, 1)) * noise
    torch.testing.assert_close(seen["x"], x_t)
    assert torch.equal(seen["t"], t)
    assert torch.equal(seen["y"], torch.where(u < 0.3, 5, y)) and 0 < (u < 0.3).sum() < n
    assert torch.equal(seen["cond"], torch.where((uc < 0.4).view(-1, 1, 1, 1), 0.0, cond)) and 0 < (uc < 0.4).sum() < n
    torch.testing.assert_close(loss, (0.5 * x_t - ((1 - 1e-3) * noise - x0)).pow(2).mean())
    # no condition: no condition draws, whatever cond_dropout says; no label dropout by default: no label draws
    for kwargs, draws in (({"label_dropout": 0.3, "cond_dropout": 0.4}, 3), ({}, 2)):
        g, replay = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        flow_matching_loss(Spy(), x0, y, cfg, g, **kwargs)
        torch.randn((n, *shape), generator=replay)
        [torch.rand(n, generator=replay) for _ in range(draws - 1)]
        assert torch.equal(torch.rand(1, generator=g), torch.rand(1, generator=replay)), kwargs
    assert torch.equal(seen["y"], y) and seen["cond"] is None  # the default call: labels kept
    flow_matching_loss(Spy(), x0, y, cfg, torch.Generator().manual_seed(2), cond=cond)  # no condition dropout by default
    assert torch.equal(seen["cond"], cond)
    # x0's dtype throughout (bf16 data stays bf16 into the model); a bare function keeps its labels
    flow_matching_loss(Spy(), x0.bfloat16(), y, cfg, torch.Generator().manual_seed(0))
    assert seen["x"].dtype == torch.bfloat16
    got = []
    flow_matching_loss(lambda x, t, y, cond: got.append(y) or x, x0, y, cfg, torch.Generator().manual_seed(0), label_dropout=0.9)
    assert torch.equal(got[0], y)
    plain = draw_flow(n, shape, cfg, torch.Generator().manual_seed(1))  # no drop uniforms unless asked for
    assert plain.u is None and plain.uc is None
    # draws with condition uniforms and no condition: the model gets none
    flow_matching_loss(Spy(), x0, y, cfg, draws=draw_flow(n, shape, cfg, torch.Generator().manual_seed(1), 0.3, 0.4), cond_dropout=0.4)
    assert seen["cond"] is None
    # rows of a batch's draws: every field sliced alike
    d = FlowDraws(noise, t, u, uc).rows(8, 4)
    assert all(torch.equal(a, b[8:12]) for a, b in zip((d.noise, d.t, d.u, d.uc), (noise, t, u, uc)))
