import numpy as np
import pytest
import torch
from PIL import Image

from lfm_fast.data.folder import ImageFolderDataset
from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.data.masks import masked_image_condition
from lfm_fast.data.shapes import SHAPE_CLASSES, SHAPE_COLORS, make_shapes
from lfm_fast.errors import InputError
from tests.conftest import write_random_latents


def test_shapes_are_deterministic_by_seed_and_cover_every_class():
    a, la, sa = make_shapes(300, 32, seed=3)
    b, lb, sb = make_shapes(300, 32, seed=3)
    c, _, _ = make_shapes(300, 32, seed=4)
    assert np.array_equal(a, b) and np.array_equal(la, lb) and np.array_equal(sa, sb)
    assert not np.array_equal(a, c)
    assert a.shape == (300, 32, 32, 3) and a.dtype == np.uint8
    assert len(SHAPE_CLASSES) >= 6 and set(la.tolist()) == set(range(len(SHAPE_CLASSES)))


def test_semantic_maps_mark_the_shape_with_its_kind():
    images, labels, semantic = make_shapes(120, 32, seed=0)
    for img, lab, sem in zip(images, labels, semantic):
        assert set(np.unique(sem).tolist()) == {0, lab + 1}
        inside = img[sem == lab + 1].astype(float) / 255
        # the shape's pixels carry the class colour (± jitter and anti-aliasing)
        assert np.abs(inside.mean(0) - SHAPE_COLORS[lab]).max() < 0.15
    # shapes of different classes differ in colour
    d = np.abs(SHAPE_COLORS[:, None] - SHAPE_COLORS[None]).max(-1)
    assert (d + np.eye(len(d))).min() > 0.3


def save_png(path, size=(40, 30), colour=(255, 0, 0)):
    Image.new("RGB", size, colour).save(path)


def test_image_folder_with_classes_and_without(tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "labelled" / cls).mkdir(parents=True)
        for i in range(2):
            save_png(tmp_path / "labelled" / cls / f"{i}.png")
    ds = ImageFolderDataset(str(tmp_path / "labelled"), 16)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2 and len(ds) == 4
    x, y = ds[3]
    assert x.shape == (3, 16, 16) and y.item() == 1
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    (tmp_path / "flat").mkdir()
    save_png(tmp_path / "flat" / "a.jpg")
    flat = ImageFolderDataset(str(tmp_path / "flat"), 8)
    assert flat.num_classes == 0 and flat[0][1].item() == 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        ImageFolderDataset(str(tmp_path / "missing"), 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no images"):
        ImageFolderDataset(str(tmp_path / "empty"), 16)
    (tmp_path / "mixed").mkdir()
    save_png(tmp_path / "mixed" / "a.png")
    (tmp_path / "mixed" / "notes.txt").write_text("hello")
    (tmp_path / "mixed" / "b").mkdir()  # a sub-folder makes classes: a.png and notes.txt are then beside them
    (tmp_path / "mixed" / "b" / "Thumbs.db").write_text("")
    save_png(tmp_path / "mixed" / "b" / "c.PNG")
    with pytest.warns(UserWarning, match=r"skipped 3 files \(a.png, b/Thumbs.db, notes.txt\): only images"):
        ds = ImageFolderDataset(str(tmp_path / "mixed"), 16)
    assert len(ds) == 1 and ds.classes == ["b"]
    (tmp_path / "flat2").mkdir()
    save_png(tmp_path / "flat2" / "a.png")
    (tmp_path / "flat2" / "notes.txt").write_text("hello")
    with pytest.warns(UserWarning, match=r"skipped 1 file \(notes.txt\)"):
        assert len(ImageFolderDataset(str(tmp_path / "flat2"), 16)) == 1
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "b.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        ImageFolderDataset(str(tmp_path / "broken"), 16)[0]


def test_latent_shards_round_trip_across_shards(tmp_path):
    meta = write_random_latents(tmp_path, n=45, shard_size=20)
    assert [s["num"] for s in meta["shards"]] == [20, 20, 5]
    ds = LatentShardDataset(str(tmp_path))
    assert len(ds) == 45 and ds.latent_shape == (4, 8, 8) and ds.num_classes == 3
    g = torch.Generator().manual_seed(0)
    expected = torch.randn((45, 4, 8, 8), generator=g) * 0.5 + (torch.arange(45) % 3).view(-1, 1, 1, 1).float() - 1
    for i in (0, 19, 20, 39, 44):
        x, y = ds[i]
        assert torch.equal(x, expected[i]) and y.item() == i % 3
    xb, yb = ds.get_batch([44, 0, 21])
    assert torch.equal(xb, expected[[44, 0, 21]]) and yb.tolist() == [2, 0, 0]
    with pytest.raises(IndexError):
        ds[45]


def test_prepare_stores_the_conditions_the_data_has(tmp_path):
    """Shapes keep their semantic maps; `inpaint_masks=K` stores, per image, the latent of the image with mask k's
    holes grey and mask k max-pooled to the latent grid (a cell is a hole if any of its pixels is)."""
    import torch.nn.functional as F

    from lfm_fast.autoencoder import encode, load_autoencoder
    from lfm_fast.data.prepare import prepare_latents
    from lfm_fast.data.masks import make_masks
    from lfm_fast.data.shapes import ShapesDataset

    meta = prepare_latents("builtin:shapes", "shapes", str(tmp_path / "lat"), 32, 10, batch_size=4, progress=False,
                           inpaint_masks=3, hole_range=(0.2, 0.4))
    assert meta["conditions"] == ["semantic", "inpaint"] and meta["semantic_classes"] == len(SHAPE_CLASSES) + 1
    ds, shapes = LatentShardDataset(str(tmp_path / "lat")), ShapesDataset(10, 32, seed=0)
    onehot = ds.get_condition([7, 2], "semantic")
    assert onehot.shape == (2, 7, 32, 32) and torch.equal(onehot.argmax(1), shapes.semantic[[7, 2]].long())
    cond = ds.get_condition([7, 2], "inpaint", picks=[1, 2])
    holes = torch.from_numpy(make_masks(30, 32, 0, (0.2, 0.4)))[[7 * 3 + 1, 2 * 3 + 2]]
    share = F.avg_pool2d(holes[:, None].float(), 4)[:, 0]  # each latent cell's share of hole pixels (k / 16)
    assert torch.allclose(cond[:, 4], share, atol=0.5 / 255) and ((cond[:, 4] > 0) & (cond[:, 4] < 1)).any()
    ae = load_autoencoder("builtin:shapes")
    # training reads the very values sampling builds (the stored uint8 levels), not a float that sampling would differ from
    assert torch.equal(cond[:, 4:], masked_image_condition(ae, shapes.images[[7, 2]], holes, 4)[1])
    torch.testing.assert_close(cond[:, :4], encode(ae, shapes.images[[7, 2]] * (~holes[:, None]).float()), rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="no 'inpaint' conditions"):
        write_random_latents(tmp_path / "plain")
        LatentShardDataset(str(tmp_path / "plain")).get_condition([0], "inpaint")
