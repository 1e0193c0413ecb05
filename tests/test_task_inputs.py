"""The conditional tasks' input reading, compositing, palette and grid (lfm_fast/tasks.py) on small files made here,
with no model: each rule and each one-line error as the user meets it. The end-to-end runs are in test_tasks.py."""

import colorsys
import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from lfm_fast.errors import InputError
from lfm_fast.fileio import image_grid
from lfm_fast.tasks import (_files, _read, composite, palette, read_inpaint_inputs, read_semantic_inputs, semantic_condition,
                            task_grid)
from tests.conftest import PoolAE


def png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array), mode).save(path)
    return str(path)


def rgb(seed, size=8):
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_a_file_or_a_folders_images_by_name_and_the_other_files_named_in_one_warning(tmp_path):
    one = png(tmp_path / "a" / "x.png", rgb(0))
    assert _files("--image", one) == {"x.png": one}
    for name in ("b.png", "a.jpg", "notes.txt", "c.csv", "d.json", "e.yaml"):
        (tmp_path / "f" / name).parent.mkdir(exist_ok=True)
        (tmp_path / "f" / name).write_bytes(b"")
    with pytest.warns(UserWarning) as seen:
        files = _files("--mask", str(tmp_path / "f"))
    assert list(files) == ["a.jpg", "b.png"] and files["b.png"] == str(tmp_path / "f" / "b.png")
    assert str(seen[0].message) == (f"--mask {tmp_path / 'f'}: skipped 4 files that are not an image "
                                    f"(c.csv, d.json, e.yaml, …)")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "only.txt").write_text("")
    with pytest.raises(InputError, match=r"--image .*g: no images in this folder"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _files("--image", str(tmp_path / "g"))
    (tmp_path / "h").mkdir()
    png(tmp_path / "h" / "y.png", rgb(1))
    (tmp_path / "h" / "z.txt").write_text("")
    with pytest.warns(UserWarning, match=r"skipped 1 file that is not an image \(z.txt\)$"):
        _files("--image", str(tmp_path / "h"))
    with pytest.raises(InputError, match=r"--image .*nowhere: no such file or folder"):
        _files("--image", str(tmp_path / "nowhere"))


def test_reading_checks_the_size_the_mode_of_class_ids_and_unreadable_files(tmp_path):
    image = rgb(2)
    assert np.array_equal(_read("--image", png(tmp_path / "i.png", image), "RGB", 8), image)
    wide = png(tmp_path / "w.png", np.zeros((4, 6, 3), np.uint8))  # 6 wide, 4 high
    with pytest.raises(InputError, match=r"--image .*w.png is 6×4; this checkpoint works at 8×8"):
        _read("--image", wide, "RGB", 8)
    with pytest.raises(InputError, match=r"an image of mode RGB; expected a palette or grey PNG"):
        _read("--semantic", str(tmp_path / "i.png"), "ids", 8)
    ids = np.arange(64, dtype=np.uint8).reshape(8, 8) % 5
    got = _read("--semantic", png(tmp_path / "ids.png", ids, "L"), "ids", 8)
    assert got.dtype == np.int64 and np.array_equal(got, ids)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"--image .*bad.png: cannot read it as an image \(UnidentifiedImageError\)"):
        _read("--image", str(tmp_path / "bad.png"), "RGB", 8)


def test_inpaint_inputs_pair_by_name_threshold_white_as_hole_and_refuse_empty_or_full_masks(tmp_path):
    mask = np.zeros((8, 8), np.uint8)
    mask[:, :4] = 255
    mask[0, 0], mask[0, 4] = 127, 128  # 127 is known, 128 a hole
    for n in ("p", "q"):
        png(tmp_path / "img" / f"{n}.png", rgb(ord(n)))
        png(tmp_path / "mask" / f"{n}.png", mask if n == "p" else 255 - mask)
    names, pixels, holes = read_inpaint_inputs(str(tmp_path / "img"), str(tmp_path / "mask"), 8)
    assert names == ["p.png", "q.png"]
    assert pixels.dtype == np.uint8 and np.array_equal(pixels[1], rgb(ord("q")))
    want = mask > 127
    assert holes.dtype == bool and np.array_equal(holes[0], want) and not holes[0, 0, 0] and holes[0, 0, 4]
    assert np.array_equal(holes[1], (255 - mask) > 127)
    # one mask file serves every image of a folder
    _, _, one = read_inpaint_inputs(str(tmp_path / "img"), str(tmp_path / "mask" / "p.png"), 8)
    assert np.array_equal(one, np.stack([want, want]))
    # a mask folder lacking an image's name: the first missing one named; masks without an image: a warning
    png(tmp_path / "img2" / "p.png", rgb(3))
    png(tmp_path / "img2" / "r.png", rgb(4))
    with pytest.raises(InputError, match=r"--mask .*mask: no mask named r.png for --image .*r.png \(folders pair"):
        read_inpaint_inputs(str(tmp_path / "img2"), str(tmp_path / "mask"), 8)
    with pytest.warns(UserWarning, match=r"--mask .*mask: 1 mask without an image of the same name, not used \(q.png\)$"):
        read_inpaint_inputs(str(tmp_path / "img2" / "p.png"), str(tmp_path / "mask"), 8)
    for fill, words in ((0, "has no hole (all black): there is nothing to inpaint"),
                        (255, "is all hole (all white): nothing is known")):
        m = png(tmp_path / f"m{fill}.png", np.full((8, 8), fill, np.uint8))
        with pytest.raises(InputError, match=rf"--mask .*m{fill}.png {re.escape(words)}"):
            read_inpaint_inputs(str(tmp_path / "img" / "p.png"), m, 8)


def test_semantic_inputs_are_class_ids_in_range_and_become_one_hot(tmp_path):
    ids = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    png(tmp_path / "maps" / "a.png", ids, "L")
    png(tmp_path / "maps" / "b.png", 3 - ids, "L")
    names, maps = read_semantic_inputs(str(tmp_path / "maps"), 8, num_classes=4)
    assert names == ["a.png", "b.png"] and maps.dtype == np.int64 and np.array_equal(maps[1], 3 - ids)
    with pytest.raises(InputError, match=r"--semantic .*a.png: class id 3 out of range; this checkpoint knows ids 0..2"):
        read_semantic_inputs(str(tmp_path / "maps"), 8, num_classes=3)
    negative = png(tmp_path / "neg.tif", np.full((8, 8), -2, np.int32))  # 32-bit ids (mode I): TIFF, not PNG
    with pytest.raises(InputError, match=r"class id -2 out of range; this checkpoint knows ids 0..3"):
        read_semantic_inputs(negative, 8, num_classes=4)
    onehot = semantic_condition(maps, 5)
    assert onehot.shape == (2, 5, 8, 8) and onehot.dtype == torch.float32 and onehot.sum(1).eq(1).all()
    assert torch.equal(onehot.argmax(1), torch.from_numpy(maps))


def test_composite_palette_and_grid():
    generated, images = rgb(5)[None].repeat(2, 0), rgb(6)[None].repeat(2, 0)
    holes = np.zeros((2, 8, 8), bool)
    holes[0, 2:5, 1:7] = True
    out = composite(generated, images, holes)
    assert np.array_equal(out[holes], generated[holes]) and np.array_equal(out[~holes], images[~holes])
    assert np.array_equal(palette(1), [[0, 0, 0]])
    want = [(0, 0, 0)] + [tuple(round(255 * c) for c in colorsys.hsv_to_rgb(k / 3, 0.75, 0.95)) for k in range(3)]
    assert palette(4).dtype == np.uint8 and palette(4).tolist() == [list(w) for w in want]
    # one row per input: its panels, its outputs (up to max_per_row), blanks to the widest row
    outputs = np.stack([np.full((4, 4, 3), 10 * i, np.uint8) for i in range(5)])
    source = np.array([0, 0, 1, 0, 1])
    panels = [np.full((2, 4, 4, 3), 200, np.uint8), np.full((2, 4, 4, 3), 100, np.uint8)]
    blank, p0, p1 = np.full((4, 4, 3), 255, np.uint8), panels[0][0], panels[1][0]
    want = image_grid(np.stack([p0, p1, outputs[0], outputs[1], outputs[3], p0, p1, outputs[2], outputs[4], blank]), nrow=5)
    assert np.array_equal(task_grid(outputs, source, panels), want)
    want = image_grid(np.stack([p0, p1, outputs[0], outputs[1], p0, p1, outputs[2], outputs[4]]), nrow=4)
    assert np.array_equal(task_grid(outputs, source, panels, max_per_row=2), want)
    one = task_grid(outputs[:1], np.array([0]), [panel[:1] for panel in panels])  # a single output
    assert np.array_equal(one, image_grid(np.stack([p0, p1, outputs[0]]), nrow=3))
    nine = np.stack([outputs[0]] * 9)  # 8 outputs a row by default
    assert np.array_equal(task_grid(nine, np.zeros(9, int), [panel[:1] for panel in panels]),
                          image_grid(np.stack([p0, p1, *nine[:8]]), nrow=10))


def test_the_inpaint_condition_is_the_grey_holed_images_latent_then_each_cells_hole_share():
    """[latent of the image with its holes grey, the holes' share of each latent cell], channels in that order, on a
    stand-in autoencoder whose posterior mode is an average over each 4×4 cell (scaled by its scaling factor)."""
    import torch.nn.functional as F

    from lfm_fast.tasks import inpaint_condition


    images = np.stack([rgb(7), rgb(8)])
    holes = np.zeros((2, 8, 8), bool)
    holes[0, :4, :4], holes[1, 4:, :2] = True, True
    cond = inpaint_condition(PoolAE(0.25), images, holes, 4, batch_size=1)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1  # [-1, 1]; grey is 0
    x = x.masked_fill(torch.from_numpy(holes)[:, None], 0.0)
    assert cond.shape == (2, 4, 2, 2)
    torch.testing.assert_close(cond[:, :3], F.avg_pool2d(x, 4) * 0.25)
    assert cond[0, 3].tolist() == [[1.0, 0.0], [0.0, 0.0]] and cond[1, 3, 1, 0] == torch.tensor(128 / 255)  # a half cell


def test_each_reading_error_names_the_flag_of_the_input_it_is_about(tmp_path):
    """The inpaint and semantic readers pass their own flag to every check: a missing file, a wrong size, a grey image
    given as the image (read as RGB), a colour mask (read as grey), palette and 16-bit maps, plurals and '…'."""
    good = png(tmp_path / "ok" / "a.png", rgb(9))
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 255
    good_mask = png(tmp_path / "okm" / "a.png", mask)
    small = png(tmp_path / "small.png", np.zeros((4, 4, 3), np.uint8))
    for args, flag in (((str(tmp_path / "none"), good_mask), "--image"), ((good, str(tmp_path / "none")), "--mask"),
                       ((small, good_mask), "--image"), ((good, small), "--mask")):
        with pytest.raises(InputError, match=rf"^{flag} "):
            read_inpaint_inputs(*args, 8)
    grey = png(tmp_path / "grey.png", np.full((8, 8), 90, np.uint8))  # an L image as the image: RGB, 3 equal channels
    colour = png(tmp_path / "colour.png", np.stack([mask, mask // 2, mask // 3], -1))  # an RGB mask: its grey level
    _, pixels, holes = read_inpaint_inputs(grey, colour, 8)
    assert pixels.shape == (1, 8, 8, 3) and (pixels == 90).all() and holes.shape == (1, 8, 8)
    assert np.array_equal(holes[0], np.asarray(Image.open(colour).convert("L")) > 127)
    for path, flag in ((str(tmp_path / "none"), "--semantic"), (small, "--semantic")):
        with pytest.raises(InputError, match=rf"^{flag} "):
            read_semantic_inputs(path, 8, 4)
    ids = (np.arange(64).reshape(8, 8) % 3).astype(np.uint8)
    p = Image.fromarray(ids, "L").convert("P")  # palette indices are the ids
    p.putdata(ids.flatten().tolist())
    p.save(tmp_path / "p.png")
    png(tmp_path / "i16.png", ids.astype(np.uint16))  # 16-bit grey: mode I;16
    for name in ("p.png", "i16.png"):
        _, maps = read_semantic_inputs(str(tmp_path / name), 8, 3)
        assert np.array_equal(maps[0], ids), name
    mixed = np.full((8, 8), 1, np.int32)
    mixed[0, 0] = -2  # the offending id is the low one even where the high one is in range
    with pytest.raises(InputError, match=r"class id -2 out of range"):
        read_semantic_inputs(png(tmp_path / "mixed.tif", mixed), 8, 4)
    # plurals and the ellipsis at their thresholds
    for n, words in ((2, "skipped 2 files that are not an image (f0.txt, f1.txt)"),
                     (3, "skipped 3 files that are not an image (f0.txt, f1.txt, f2.txt)")):
        folder = tmp_path / f"skip{n}"
        png(folder / "x.png", rgb(0))
        for i in range(n):
            (folder / f"f{i}.txt").write_text("")
        with pytest.warns(UserWarning) as seen:
            _files("--image", str(folder))
        assert str(seen[0].message).endswith(words), seen[0].message
    for n, words in ((2, "2 masks without an image of the same name, not used (m0.png, m1.png)"),
                     (4, "4 masks without an image of the same name, not used (m0.png, m1.png, m2.png, …)"),
                     (3, "3 masks without an image of the same name, not used (m0.png, m1.png, m2.png)")):
        for i in range(n):
            png(tmp_path / f"masks{n}" / f"m{i}.png", mask)
        png(tmp_path / f"masks{n}" / "a.png", mask)
        with pytest.warns(UserWarning) as seen:
            read_inpaint_inputs(good, str(tmp_path / f"masks{n}"), 8)
        assert str(seen[0].message).endswith(words), seen[0].message
