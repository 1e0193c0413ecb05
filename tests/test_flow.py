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
