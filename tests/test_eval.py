import numpy as np
import pytest
import torch

from lfm_fast.errors import InputError
from lfm_fast.eval.fid import FIDInceptionV3, inception_features, load_inception
from lfm_fast.eval.frechet import frechet_distance


def random_stats(rng, d):
    a = rng.normal(size=(3 * d, d))
    return rng.normal(size=d), a.T @ a / (3 * d)


def frechet_by_eigenvalues(m1, s1, m2, s2):
    """An independent route: Tr((Σ₁Σ₂)^½) = Σ √λᵢ(Σ₁Σ₂), the eigenvalues of a product of PSD matrices being ≥ 0."""
    lam = np.linalg.eigvals(s1 @ s2).real.clip(min=0)
    return float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum())


def test_frechet_distance_against_an_eigenvalue_computation():
    rng = np.random.default_rng(0)
    for d in (2, 16, 64):
        (m1, s1), (m2, s2) = random_stats(rng, d), random_stats(rng, d)
        ours, theirs = frechet_distance(m1, s1, m2, s2), frechet_by_eigenvalues(m1, s1, m2, s2)
        assert abs(ours - theirs) <= 1e-6 * abs(theirs)
    assert abs(frechet_distance(m1, s1, m1, s1)) < 1e-6
    # 1-D closed form: (μ₁ − μ₂)² + (σ₁ − σ₂)²
    assert abs(frechet_distance([1.0], [[4.0]], [3.0], [[9.0]]) - (4 + 1)) < 1e-9


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """Random weights (with BatchNorm statistics) in the layout of pytorch-fid's weights file."""
    torch.manual_seed(0)
    net = FIDInceptionV3()
    state = net.state_dict()
    for k, v in state.items():
        if k.endswith("running_var"):
            state[k] = torch.rand_like(v) + 0.5
        elif k.endswith("running_mean") or k.endswith("bn.bias"):
            state[k] = 0.1 * torch.randn_like(v)
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(state, path)
    return str(path), state


def test_inception_features_shapes_determinism_and_batching(random_inception):
    path, _ = random_inception
    net = load_inception(path)
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3), dtype=np.uint8)
    a = inception_features(net, images, batch_size=2, progress=False)
    b = inception_features(load_inception(path), images, batch_size=3, progress=False)
    assert a.shape == (3, 2048) and np.isfinite(a).all() and (a >= 0).all()  # pool3 follows a ReLU
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_load_inception_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("LFM_FAST_INCEPTION", raising=False)
    with pytest.raises(InputError, match="pt_inception-2015-12-05"):
        load_inception(None)
    with pytest.raises(InputError, match="no such file"):
        load_inception(str(tmp_path / "missing.pth"))
    torch.save({"x": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not the FID InceptionV3 weights"):
        load_inception(str(tmp_path / "other.pth"))
