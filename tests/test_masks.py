import numpy as np
import pytest

from tests.conftest import PoolAE

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
    # a range whose only reachable ratio is its low end (16 of 64 pixels): every mask ends exactly there
    assert (make_masks(20, 8, seed=4, hole_range=(0.25, 0.26)).mean(axis=(1, 2)) == 0.25).all()
    with pytest.raises(ValueError, match="widen the range"):
        make_masks(1, 8, hole_range=(0.3, 0.301))


# Mask i of a seed is part of a prepared data set's identity (prepare's resume, the inpainting evaluation's masks):
# the first masks of each kind are pinned, so that any change to how strokes or boxes are drawn is a deliberate one
# (these hashes then change with it). Pillow draws them: a new rasteriser would show here too.
PINNED = {("mixed", 64): "f2a7010750184364", ("strokes", 64): "d9b3cede9b20d978", ("boxes", 64): "fc105d78c4988402",
          ("narrow", 8): "beb13fe7f926c371", ("nearly full", 16): "d2ee54ec269a45de"}


def test_the_first_masks_of_each_kind_are_pinned_and_start_continues_the_sequence():
    import hashlib

    def fingerprint(m):
        return hashlib.sha256(np.packbits(m).tobytes()).hexdigest()[:16]

    got = {(k, 64): fingerprint(make_masks(16, 64, seed=11, kind=k)) for k in ("mixed", "strokes", "boxes")}
    got["narrow", 8] = fingerprint(make_masks(24, 8, seed=3, hole_range=(0.3, 0.32)))  # pieces shrunk to the range
    got["nearly full", 16] = fingerprint(make_masks(4, 16, seed=2, hole_range=(0.9, 1.0)))
    assert got == PINNED
    assert fingerprint(make_masks(16, 64, seed=11)) == PINNED["mixed", 64]  # "mixed" is the default
    assert np.array_equal(make_masks(3, 32, seed=5, start=4), make_masks(7, 32, seed=5)[4:])
    assert np.array_equal(make_masks(2, 32), make_masks(2, 32, seed=0))  # seed 0 by default


def test_the_hole_range_and_kind_are_checked_at_their_bounds():
    from lfm_fast.data.masks import random_mask

    rng = np.random.default_rng(0)
    for ok in ((0.0, 0.2), (0.25, 0.25), (0.9, 1.0)):  # a zero low end, a point range, a hole up to the whole image
        r = random_mask(16, rng, ok).mean()
        assert ok[0] <= r <= ok[1], (ok, r)
    for bad in ((0.0, 0.0), (-0.1, 0.5), (0.2, 1.5), (0.5, 0.4)):
        with pytest.raises(ValueError, match=r"hole_range .*: expected 0 ≤ low ≤ high ≤ 1 and high > 0"):
            random_mask(16, rng, bad)
    with pytest.raises(ValueError, match="mask kind 'blobs': expected one of mixed, strokes, boxes"):
        random_mask(16, rng, kind="blobs")


def test_the_inpainting_condition_greys_the_holes_and_gives_each_cells_hole_share():
    """masked_image_condition on a stand-in autoencoder whose posterior mode is a 4×4 average pool (3 → 3 channels):
    the latents are those of the image with its holes at 0 (grey in [-1, 1]), times the scaling factor, in any batch
    size; the grid holds each 4×4 cell's share of hole pixels, in steps of 1/255."""
    import torch
    import torch.nn.functional as F

    from lfm_fast.data.masks import masked_image_condition

    torch.manual_seed(0)
    images = torch.rand(3, 3, 8, 8) * 2 - 1
    holes = torch.zeros(3, 8, 8, dtype=torch.bool)
    holes[0, 0, 0] = True  # 1 of the cell's 16 pixels
    holes[0, :4, 4:] = True  # a whole cell
    holes[1, 4:, 4:6] = True  # half a cell
    holes[2] = torch.rand(8, 8) < 0.5
    for batch in (1, 2, 64):
        latents, grid = masked_image_condition(PoolAE(0.5), images, holes, 4, batch_size=batch)
        torch.testing.assert_close(latents, F.avg_pool2d(images.masked_fill(holes[:, None], 0.0), 4) * 0.5)
        assert grid.shape == (3, 1, 2, 2) and grid.dtype == torch.float32
        assert torch.equal(grid[0, 0], torch.tensor([[16 / 255, 1.0], [0.0, 0.0]]))  # 1/16 = 15.94/255: the nearest step
        assert torch.equal(grid[1, 0], torch.tensor([[0.0, 0.0], [0.0, 128 / 255]]))  # 1/2 = 127.5/255 → 128 (half to even)
        torch.testing.assert_close(grid[2], (F.avg_pool2d(holes[2:, None].float(), 4)[0] * 255).round() / 255)
