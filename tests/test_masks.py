import numpy as np
import pytest

from lfm_fast.data.masks import make_masks


def test_hole_ratio_stays_in_the_requested_range_and_spreads_over_it():
    ratios = make_masks(1000, 32, seed=0, hole_range=(0.3, 0.5)).mean(axis=(1, 2))
    assert ratios.min() >= 0.3 and ratios.max() <= 0.5
    assert 0.37 < ratios.mean() < 0.45 and np.quantile(ratios, 0.9) > 0.45  # a target drawn across the range
    for kind in ("strokes", "boxes"):
        r = make_masks(200, 64, seed=1, hole_range=(0.05, 0.2), kind=kind).mean(axis=(1, 2))
        assert r.min() >= 0.05 and r.max() <= 0.2, kind


def test_masks_are_deterministic_by_seed_and_index():
    a = make_masks(5, 32, seed=7)
    assert np.array_equal(a, make_masks(5, 32, seed=7)) and np.array_equal(a[:3], make_masks(3, 32, seed=7))
    assert not np.array_equal(a, make_masks(5, 32, seed=8))
    assert a.dtype == bool and a.shape == (5, 32, 32)
    boxes, strokes = make_masks(20, 32, seed=7, kind="boxes"), make_masks(20, 32, seed=7, kind="strokes")
    rows_cols_boxy = [(m.any(axis=0).sum() * m.any(axis=1).sum()) / m.sum() for m in boxes]
    assert min(rows_cols_boxy) >= 1 and np.median([(m.any(axis=0).sum() * m.any(axis=1).sum()) / m.sum()
                                                   for m in strokes]) > np.median(rows_cols_boxy)  # strokes are thin
    with pytest.raises(ValueError, match="hole_range"):
        make_masks(1, 32, hole_range=(0.6, 0.2))


def test_the_semantic_rescaler_maps_to_the_latent_grid_and_is_trained():
    """One-hot 32×32 map → 2 bilinear halvings → 8×8 → 1×1 conv; one optimizer step through a loss on its output
    changes its weights (LFM's own code never gave the rescaler gradients)."""
    import torch
    import torch.nn.functional as F

    from lfm_fast.models.cond import SpatialRescaler

    torch.manual_seed(0)
    enc = SpatialRescaler(num_classes=7, out_channels=4, stages=2)
    onehot = F.one_hot(torch.randint(0, 7, (3, 32, 32)), 7).permute(0, 3, 1, 2).float()
    out = enc(onehot)
    assert out.shape == (3, 4, 8, 8)
    flat = torch.zeros(1, 7, 32, 32)  # a one-class map stays one-hot through the halvings: out = weight column + bias
    flat[:, 2] = 1
    torch.testing.assert_close(enc(flat), (enc.proj.weight[:, 2, 0, 0] + enc.proj.bias).view(1, 4, 1, 1).expand(1, 4, 8, 8))
    before = [p.detach().clone() for p in enc.parameters()]
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(onehot).pow(2).mean().backward()
    opt.step()
    assert all(not torch.equal(a, b) for a, b in zip(before, enc.parameters()))


def test_a_target_between_pixel_counts_still_ends():
    """At 8×8 a pixel is 1/64 of the image: ranges narrower than the pieces end on the range, not the target."""
    r = make_masks(300, 8, seed=3, hole_range=(0.3, 0.32)).mean(axis=(1, 2))
    assert r.min() >= 0.3 and r.max() <= 0.32
    with pytest.raises(ValueError, match="widen the range"):
        make_masks(1, 8, hole_range=(0.3, 0.301))
