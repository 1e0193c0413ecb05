"""Every data source on tiny data written in its real on-disk format: image folders (nested classes, odd image
modes, EXIF, corrupt files), both LMDB layouts the LFM code reads, CelebAMask-HQ; ADM's resize, pixel for pixel."""

import io
import os

import numpy as np
import pytest
from PIL import Image

from lfm_fast.data import open_image_dataset, parse_spec
from lfm_fast.data.images import UnreadableImage, center_crop_arr, open_rgb
from lfm_fast.errors import InputError

lmdb = pytest.importorskip("lmdb")


def adm_resize(img: Image.Image, size: int) -> np.ndarray:
    """ADM's center_crop_arr, written here from its description: while the short side ≥ 2·size, halve both sides
    (integer division) with BOX; resize so the short side is size (BICUBIC, other side rounded); crop the centre
    with offsets (side − size) // 2."""
    w, h = img.size
    while min(w, h) >= 2 * size:
        w, h = w // 2, h // 2
        img = img.resize((w, h), Image.BOX)
    s = size / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    a = np.array(img)
    y, x = (a.shape[0] - size) // 2, (a.shape[1] - size) // 2
    return a[y:y + size, x:x + size]


def noise_image(w, h, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").convert(mode)


@pytest.mark.parametrize("w,h,size", [(600, 400, 64), (130, 300, 64), (64, 64, 64), (65, 200, 32), (1024, 1024, 256),
                                      (513, 260, 128)])
def test_center_crop_arr_is_adm_pixel_for_pixel(w, h, size):
    img = noise_image(w, h, seed=w + h)
    ours = center_crop_arr(img, size)
    assert ours.shape == (size, size, 3) and ours.dtype == np.uint8
    assert np.array_equal(ours, adm_resize(img, size))


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_odd_image_modes_decode_to_what_a_viewer_shows(tmp_path):
    grey = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    assert np.array_equal(np.asarray(open_rgb(encoded(Image.fromarray(grey, "L"), "PNG")))[..., 1], grey)
    sixteen = Image.fromarray(grey.astype(np.uint16) * 257)  # a 16-bit grey PNG: 0…65535
    decoded = np.asarray(open_rgb(encoded(sixteen, "PNG")))
    assert decoded.shape == (8, 64, 3) and np.abs(decoded[..., 0].astype(int) - grey).max() <= 1  # not clipped to 255
    rgba = np.dstack([np.full((4, 4, 3), (10, 200, 30), np.uint8), np.zeros((4, 4), np.uint8)])
    assert np.array_equal(np.asarray(open_rgb(encoded(Image.fromarray(rgba, "RGBA"), "PNG")))[0, 0], (10, 200, 30))
    palette = noise_image(16, 16).convert("P")
    assert np.array_equal(np.asarray(open_rgb(encoded(palette, "PNG"))), np.asarray(palette.convert("RGB")))
    # an EXIF-rotated JPEG (orientation 6: the camera was turned 90°) is read upright, as viewers show it
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left of the stored pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    upright = open_rgb(encoded(img, "JPEG", exif=exif, quality=95))
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:5].mean((0, 1))
    assert top[2] > 200 and top[0] < 60  # rotated 90° clockwise: the stored left edge is now the top


def write_folder(root, layout: dict[str, int], size=(48, 40)):
    for k, (rel, n) in enumerate(layout.items()):
        os.makedirs(root / rel, exist_ok=True)
        for i in range(n):
            noise_image(*size, seed=10 * k + i).save(root / rel / f"img{i}.png")


def test_nested_class_folders_with_a_stable_class_index_map(tmp_path):
    # created in an order unlike the sorted one, with nested sub-folders, upper case and non-ASCII names
    write_folder(tmp_path / "a", {"zebra/2019/jan": 2, "Zebra": 1, "ärm/deep/er": 1, "n01440764": 2, "zebra": 1})
    (tmp_path / "a" / "README.txt").write_text("beside the classes")
    (tmp_path / "a" / "n01440764" / "notes.md").write_text("not an image")
    (tmp_path / "a" / "n01440764" / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.warns(UserWarning, match="skipped 2 files"):
        ds, names = open_image_dataset(str(tmp_path / "a"), 16)
    assert names == sorted(names) == ["Zebra", "n01440764", "zebra", "ärm"]  # code-point order, not the locale's
    assert len(ds) == 8 and [ds.samples[i][1] for i in range(len(ds))] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert ds.key(4) == "zebra/2019/jan/img0.png"  # found recursively, paths sorted
    assert {s["path"] for s in ds.skipped} == {"README.txt", "n01440764/notes.md"}
    with pytest.raises(UnreadableImage, match="broken.jpg"):
        ds.read([ds.key(i) for i in range(len(ds))].index("n01440764/broken.jpg"))
    # the same classes written in another order give the same map
    write_folder(tmp_path / "b", {"ärm/x": 1, "zebra": 1, "n01440764": 1, "Zebra": 1})
    assert open_image_dataset(str(tmp_path / "b"), 16)[1] == names
    flat = tmp_path / "flat"
    write_folder(flat, {".": 2})
    ds, names = open_image_dataset(str(flat), 16)
    assert names == [] and ds.num_classes == 0 and len(ds) == 2


def write_lmdb(path, items: dict[bytes, bytes]):
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(str(path), map_size=1 << 26)
    with env.begin(write=True) as txn:
        for k, v in items.items():
            txn.put(k, v)
    env.close()


def test_lsun_lmdb_encoded_values_in_key_order_with_a_limit(tmp_path):
    imgs = {b"f2a": noise_image(80, 60, 1), b"0b7": noise_image(60, 90, 2), b"c11": noise_image(64, 64, 3)}
    values = {b"f2a": encoded(imgs[b"f2a"], "WEBP", lossless=True), b"0b7": encoded(imgs[b"0b7"], "PNG"),
              b"c11": encoded(imgs[b"c11"], "JPEG"), b"zzz": b"garbage bytes", b"zzz12": b"not an image"}
    write_lmdb(tmp_path / "church_outdoor_train_lmdb", values)
    ds, names = open_image_dataset(f"lmdb:{tmp_path / 'church_outdoor_train_lmdb'}", 32)
    assert names == [] and ds.layout == "lsun" and [ds.key(i) for i in range(len(ds))] == ["0b7", "c11", "f2a", "zzz", "zzz12"]
    assert np.array_equal(ds.read(0)[0], center_crop_arr(imgs[b"0b7"], 32))
    assert np.array_equal(ds.read(2)[0], center_crop_arr(imgs[b"f2a"], 32))  # lossless WebP
    with pytest.raises(UnreadableImage, match="zzz"):
        ds.read(3)
    with pytest.raises(UnreadableImage, match="zzz12.*12 bytes: neither an encoded image nor raw RGB .LSUN"):
        ds.read(4)  # 12 = 3·2²: never a 2×2 image in LSUN's layout
    limited, _ = open_image_dataset(f"lmdb:{tmp_path / 'church_outdoor_train_lmdb'}?limit=2", 32)
    assert len(limited) == 2 and limited.key(1) == "c11"
    with pytest.raises(InputError, match="splits are folders"):
        open_image_dataset(f"lmdb:{tmp_path / 'church_outdoor_train_lmdb'}?split=validation", 32)
    from lfm_fast.eval.fid import load_images, reference_stats  # eval --ref takes the same SPECs

    spec = f"lmdb:{tmp_path / 'church_outdoor_train_lmdb'}?limit=3"
    ref = load_images(spec, size=16)
    assert reference_stats(spec) is None and ref.shape == (3, 16, 16, 3)
    assert np.array_equal(ref[0], center_crop_arr(imgs[b"0b7"], 16))


def test_lfm_lmdb_layout_raw_and_encoded_with_splits(tmp_path):
    root = tmp_path / "celeba-lmdb"
    raw = [np.asarray(noise_image(40, 40, s)) for s in range(3)]
    write_lmdb(root / "train.lmdb", {**{str(i).encode(): a.tobytes() for i, a in enumerate(raw)}, b"3": b"not an image",
                                     b"4": np.asarray(noise_image(20, 20, 5)).tobytes()})
    write_lmdb(root / "validation.lmdb", {b"0": encoded(noise_image(50, 50, 9), "PNG"), b"1": b"\x01\x02\x03\x04"})
    ds, _ = open_image_dataset(f"lmdb:{root}", 32)
    assert ds.layout == "lfm" and len(ds) == 5 and ds.raw_side == 40
    for i in range(3):
        assert np.array_equal(ds.read(i)[0], center_crop_arr(Image.fromarray(raw[i]), 32))
    for i, size in ((3, 12), (4, 1200)):  # raw only at the dataset's side: not 2×2, not 20×20
        with pytest.raises(UnreadableImage, match=f"{size} bytes: neither an encoded image nor raw RGB of this dataset's 40×40"):
            ds.read(i)
    val, _ = open_image_dataset(f"lmdb:{root}?split=validation", 32)
    assert np.array_equal(val.read(0)[0], center_crop_arr(noise_image(50, 50, 9), 32))
    with pytest.raises(UnreadableImage, match="neither an encoded image nor raw RGB"):
        val.read(1)
    with pytest.raises(InputError, match="nor a folder with test.lmdb"):
        open_image_dataset(f"lmdb:{root}?split=test", 32)
    with pytest.raises(InputError, match="unknown option"):
        open_image_dataset(f"lmdb:{root}?splt=train", 32)
    assert parse_spec(f"lmdb:{root}?split=validation&limit=5") == ("lmdb", str(root), {"split": "validation", "limit": "5"})


def write_celebamask(root, n=3, image=1024, mask=512):
    """CelebAMask-HQ's layout: CelebA-HQ-img/{i}.jpg, CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png."""
    os.makedirs(root / "CelebA-HQ-img")
    for i in range(n):
        noise_image(image, image, i).save(root / "CelebA-HQ-img" / f"{i}.jpg")
        folder = root / "CelebAMask-HQ-mask-anno" / str(i // 2000)
        os.makedirs(folder, exist_ok=True)
        for part, (y0, y1) in {"skin": (0, 300), "hair": (200, 400), "hat": (350, 512)}.items():
            m = np.zeros((mask, mask), np.uint8)
            m[y0:y1, : 100 * (i + 1)] = 255
            Image.fromarray(m, "L").save(folder / f"{i:05d}_{part}.png")


def test_celebamask_merges_the_part_masks_in_lfms_order(tmp_path):
    from lfm_fast.data.celebamask import NUM_CLASSES, PARTS

    write_celebamask(tmp_path / "CelebAMask-HQ")
    ds, _ = open_image_dataset(f"celebamask:{tmp_path / 'CelebAMask-HQ'}", 64)
    assert len(ds) == 3 and ds.semantic_classes == NUM_CLASSES == 19
    image, label, sem = ds.read(1)
    assert image.shape == (64, 64, 3) and sem.shape == (64, 64) and sem.dtype == np.uint8
    skin, hair, hat = (PARTS.index(p) + 1 for p in ("skin", "hair", "hat"))
    full = ds.read_map(1)
    assert full.shape == (512, 512)
    assert full[100, 50] == skin and full[250, 50] == hair and full[380, 50] == hat  # later parts win the overlaps
    assert full[100, 300] == 0  # background beyond this image's masks
    assert np.array_equal(sem, np.asarray(Image.fromarray(full).resize((64, 64), Image.NEAREST)))
    with Image.open(tmp_path / "CelebAMask-HQ" / "CelebA-HQ-img" / "1.jpg") as jpeg:
        assert np.array_equal(image, center_crop_arr(jpeg.convert("RGB"), 64))
    with pytest.raises(InputError, match="no images of that split"):
        open_image_dataset(f"celebamask:{tmp_path / 'CelebAMask-HQ'}?split=validation", 64)
    with pytest.raises(InputError, match="no CelebA-HQ-img"):
        open_image_dataset(f"celebamask:{tmp_path}", 64)
