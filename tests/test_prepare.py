"""`lfm-fast prepare`: streaming over any source, skipping (or with --strict refusing) unreadable images, resuming
after a kill to the bytes of an uninterrupted run, the same shards from 2 ranks; and the paper's augmentation
(mirror-image latents, posterior samples) as training reads it."""

import math
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.data.prepare import prepare_latents
from tests.test_cli import assert_input_error, run_cli


def folder_of_odd_images(root):
    """Two classes of images in the modes users' folders hold, a corrupt one, and a file that is no image."""
    rng = np.random.default_rng(0)
    os.makedirs(root / "cat" / "nested")
    os.makedirs(root / "dog")
    rgb = lambda: rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)  # noqa: E731
    Image.fromarray(rgb()).save(root / "cat" / "a.png")
    Image.fromarray(rgb()).convert("L").save(root / "cat" / "grey.jpg")
    Image.fromarray(rgb()[..., 0].astype(np.uint16) * 257).save(root / "cat" / "nested" / "sixteen.png")
    Image.fromarray(np.dstack([rgb(), rgb()[..., :1]])).save(root / "dog" / "rgba.png")
    Image.fromarray(rgb()).convert("P").save(root / "dog" / "palette.png")
    (root / "dog" / "broken.png").write_bytes(b"\x89PNG but truncated")
    (root / "dog" / "notes.txt").write_text("not an image")


def test_prepare_skips_unreadable_images_and_lists_them_or_stops_with_strict(tmp_path, capsys):
    folder_of_odd_images(tmp_path / "data")
    out = tmp_path / "lat"
    with pytest.warns(UserWarning, match="skipped 1 file"):
        code, err = run_cli(capsys, "prepare", "--ae", "builtin:shapes", "--data", str(tmp_path / "data"),
                            "--image-size", "32", "--out", str(out), "--shard-size", "3", "--batch-size", "2")
    assert code == 0, err
    report = json.loads((out / "prepare_report.json").read_text())
    assert report["encoded"] == 5
    assert {s["path"] for s in report["skipped"]} == {"dog/broken.png", "dog/notes.txt"}
    assert "UnidentifiedImageError" in next(s["reason"] for s in report["skipped"] if s["path"] == "dog/broken.png")
    ds = LatentShardDataset(str(out))
    assert len(ds) == 5 and ds.meta["class_names"] == ["cat", "dog"] and ds.get_batch(range(5))[1].tolist() == [0, 0, 0, 1, 1]
    strict = tmp_path / "strict"
    with pytest.warns(UserWarning):
        code, err = run_cli(capsys, "prepare", "--ae", "builtin:shapes", "--data", str(tmp_path / "data"),
                            "--image-size", "32", "--out", str(strict), "--strict", "--shard-size", "64")
    lines = [line for line in err.splitlines() if not line.startswith("prepare:")]  # the progress bar's last state
    assert code == 2 and len(lines) == 1 and lines[0].startswith("lfm-fast: error:") and "cannot read dog/broken.png" in err
    assert not strict.exists()  # no shard was finished: nothing left behind


def test_prepare_reads_lmdb_and_celebamask_through_dataloader_workers(tmp_path, capsys):
    """Each worker opens its own LMDB handle (py-lmdb refuses one a parent held open at the fork); a CelebAMask-HQ
    image without any part mask is skipped and listed, not drawn as all background."""
    from tests.test_sources import encoded, noise_image, write_celebamask, write_lmdb

    write_lmdb(tmp_path / "lsun", {f"{k:03x}".encode(): encoded(noise_image(40, 30, k), "PNG") for k in range(6)}
               | {b"zz": b"garbage!!!"})  # 10 bytes: neither encoded nor 3·S² raw RGB
    code, err = run_cli(capsys, "prepare", "--ae", "builtin:shapes", "--data", f"lmdb:{tmp_path / 'lsun'}", "--image-size", "32",
                        "--workers", "2", "--batch-size", "2", "--out", str(tmp_path / "a"))
    assert code == 0, err
    report = json.loads((tmp_path / "a" / "prepare_report.json").read_text())
    assert report["encoded"] == 6 and [s["key"] for s in report["skipped"]] == ["zz"]
    write_celebamask(tmp_path / "cm", n=3, image=64, mask=32)
    for f in (tmp_path / "cm" / "CelebAMask-HQ-mask-anno" / "0").glob("00002_*.png"):
        f.unlink()
    code, err = run_cli(capsys, "prepare", "--ae", "builtin:shapes", "--data", f"celebamask:{tmp_path / 'cm'}", "--image-size",
                        "32", "--workers", "2", "--out", str(tmp_path / "b"))
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "prepare_report.json").read_text())
    assert report["encoded"] == 2 and report["skipped"][0]["path"] == "CelebA-HQ-img/2.jpg" and "no part masks" in report["skipped"][0]["reason"]
    meta = json.loads((tmp_path / "b" / "meta.json").read_text())
    assert meta["conditions"] == ["semantic"] and meta["semantic_classes"] == 19
    for bad, words in ((["--num-images", "5"], "--num-images is for --data shapes"), (["--image-size", "0"], "--image-size")):
        assert_input_error(*run_cli(capsys, "prepare", "--ae", "builtin:shapes", "--data", f"lmdb:{tmp_path / 'lsun'}",
                                    "--out", str(tmp_path / "c"), *bad), words)
    assert not (tmp_path / "c").exists()


def test_prepare_resumes_after_a_kill_to_the_bytes_of_an_uninterrupted_run_and_two_ranks_write_the_same(tmp_path, capsys):
    args = ["--ae", "builtin:shapes", "--data", "shapes", "--num-images", "40", "--shard-size", "12", "--batch-size", "5",
            "--inpaint-masks", "2"]
    whole = tmp_path / "whole"
    prepare_latents("builtin:shapes", "shapes", str(whole), num_images=40, shard_size=12, batch_size=5, inpaint_masks=2,
                    progress=False)
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "lfm_fast", "prepare", *args, "--out", str(cut)]
    env = dict(os.environ, LFM_FAST_FAULT="prepare-shard:1")  # SIGKILL right after shard 1 is written
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr
    assert sorted(p.name for p in cut.iterdir() if p.name.startswith("shard-")) == ["shard-00000.safetensors",
                                                                                   "shard-00001.safetensors"]
    assert not (cut / "meta.json").exists() and not [p for p in cut.iterdir() if ".tmp" in p.name]
    with pytest.raises(Exception, match="unfinished"):
        LatentShardDataset(str(cut))
    # the refusal and the resume in this process (the kill above and the ranks below need their own processes)
    assert_input_error(*run_cli(capsys, "prepare", *args, "--seed", "1", "--out", str(cut)), "differ in: mask_seed, seed")
    code, err = run_cli(capsys, "prepare", *args, "--out", str(cut))
    assert code == 0 and "resuming" in err and "2 of 4 shards" in err
    two = tmp_path / "two"
    ranks = subprocess.run([*cmd[:-2], "--out", str(two), "--nproc", "2"], capture_output=True, text=True, timeout=300)
    assert ranks.returncode == 0, ranks.stderr
    names = sorted(p.name for p in whole.iterdir() if p.name != "prepare_report.json")
    for other in (cut, two):
        assert sorted(p.name for p in other.iterdir() if p.name != "prepare_report.json") == names
    for name in names:
        assert (cut / name).read_bytes() == (whole / name).read_bytes(), name  # resumed: bit for bit
        if name.endswith(".safetensors"):  # 2 ranks: the same items in the same shards; torchrun runs each rank on
            a, b = load_file(two / name), load_file(whole / name)  # one thread, whose float sums may differ in the last bit
            assert a.keys() == b.keys()
            for k in a:
                if a[k].is_floating_point():
                    torch.testing.assert_close(a[k], b[k])
                else:
                    assert torch.equal(a[k], b[k]), k
        else:
            assert (two / name).read_bytes() == (whole / name).read_bytes(), name
    assert json.loads((two / "prepare_report.json").read_text())["encoded"] == 40


def test_prepare_stores_the_mirror_images_latents_and_the_posterior_and_training_reads_them(tmp_path):
    from lfm_fast.autoencoder import encode, load_autoencoder
    from lfm_fast.config import DataConfig
    from lfm_fast.data.masks import masked_image_condition
    from lfm_fast.data.shapes import ShapesDataset
    from lfm_fast.train.step import draw_augmentation, step_generator

    prepare_latents("builtin:shapes", "shapes", str(tmp_path / "lat"), num_images=8, inpaint_masks=1, progress=False)
    ds, shapes, ae = LatentShardDataset(str(tmp_path / "lat")), ShapesDataset(8, 32), load_autoencoder("builtin:shapes")
    assert ds.augmentations == {"flip", "posterior"}
    mean, std = encode(ae, shapes.images[:4].flip(-1), std=True)
    torch.testing.assert_close(ds.get_batch([0, 1, 2, 3], flips=[True] * 4)[0], mean, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(mean, ds.get_batch([0, 1, 2, 3])[0].flip(-1), atol=1e-2)  # the AE's flip ≠ a flipped latent
    eps = torch.randn(4, *ds.latent_shape)
    flips = np.array([True, False, False, True])
    x, _ = ds.get_batch([0, 1, 2, 3], flips, eps)
    base = ds.get_batch([0, 1, 2, 3], flips)[0]
    std_rows = torch.from_numpy(np.where(flips[:, None, None, None], ds._gather("latents_flip_std", [0, 1, 2, 3]),
                                         ds._gather("latents_std", [0, 1, 2, 3]))).float()
    torch.testing.assert_close(x, base + std_rows * eps)
    torch.testing.assert_close(std_rows[[0, 3]], std[[0, 3]], rtol=2e-3, atol=1e-5)  # fp16 storage
    sem = ds.get_condition([0, 1], "semantic", flips=[True, False]).argmax(1)
    assert torch.equal(sem[0], shapes.semantic[0].flip(-1).long()) and torch.equal(sem[1], shapes.semantic[1].long())
    cond = ds.get_condition([0, 1], "inpaint", flips=[True, False])
    plain = ds.get_condition([0, 1], "inpaint")
    assert torch.equal(cond[1], plain[1]) and torch.equal(cond[0, 4], plain[0, 4].flip(-1))
    from lfm_fast.data.masks import make_masks

    holes = torch.from_numpy(make_masks(1, 32, 0, (0.1, 0.6), start=0))
    lat_f, _ = masked_image_condition(ae, shapes.images[:1].flip(-1), holes.flip(-1), 4)
    torch.testing.assert_close(cond[:1, :4], lat_f, rtol=1e-4, atol=1e-4)
    # a step's draws depend on (seed, step) alone, and a rank's rows are the global draw's rows
    a = draw_augmentation(8, (4, 8, 8), DataConfig(), step_generator(0, 3, 5))
    b = draw_augmentation(8, (4, 8, 8), DataConfig(), step_generator(0, 3, 5))
    c = draw_augmentation(8, (4, 8, 8), DataConfig(), step_generator(0, 3, 6))
    assert np.array_equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])
    assert 0 < a[0].sum() < 8 or 0 < c[0].sum() < 8
    none = draw_augmentation(8, (4, 8, 8), DataConfig(flip=False, posterior="mean"), step_generator(0, 3, 5))
    assert none == (None, None)


def test_training_refuses_augmentation_its_latents_cannot_give(tmp_path, capsys):
    from lfm_fast.data.latents import LatentShardWriter

    writer = LatentShardWriter(str(tmp_path / "old"))  # latents from before the augmentation: means only
    writer.add(torch.randn(8, 4, 8, 8), torch.zeros(8))
    writer.close({"latent_shape": [4, 8, 8], "num_classes": 0, "autoencoder": "", "image_size": 32})
    argv = ["train", "--latents", str(tmp_path / "old"), "--preset", "small-data", "--steps", "1", "--out", str(tmp_path / "r")]
    assert_input_error(*run_cli(capsys, *argv, "data.flip=true", "data.posterior=sample"), "no mirror-image latents",
                       "no posterior std", "data.flip=false data.posterior=mean")
    assert not (tmp_path / "r").exists()
    code, err = run_cli(capsys, *argv, "train.batch_size=8")  # small-data: no flips, posterior means
    assert code == 0, err


def test_lfm_cosine_steps_once_per_epoch_to_its_floor():
    from lfm_fast.config import TrainConfig
    from lfm_fast.train.step import lr_lambda

    tc = TrainConfig(steps=100, batch_size=8, lr=2e-4, lr_schedule="cosine_epoch", lr_min=1e-5, lr_period_epochs=10)
    f = lr_lambda(tc, 80)  # 10 steps an epoch
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=2e-4)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-5)  # LFM: stepped after each epoch
    for epoch in range(10):
        for s in range(epoch * 10, epoch * 10 + 10):
            assert tc.lr * f(s) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
        opt.step()
        ref.step()
    cos = TrainConfig(steps=100, lr=1e-3, lr_schedule="cosine", lr_min=1e-4)
    assert lr_lambda(cos, 1)(100) == pytest.approx(0.1) and lr_lambda(cos, 1)(0) == pytest.approx(1.0)


def test_the_stepwise_cosine_is_diffusers_schedule_with_a_floor_and_no_idle_first_step():
    """After the warm-up, "cosine" at lr_min=0 is diffusers' get_cosine_schedule_with_warmup; in the warm-up ours is
    its next step (diffusers spends step 0 at lr 0); lr_min lifts the curve to its floor: floor + (1 − floor)·theirs."""
    from diffusers.optimization import get_cosine_schedule_with_warmup

    from lfm_fast.config import TrainConfig
    from lfm_fast.train.step import lr_lambda

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    ref = get_cosine_schedule_with_warmup(opt, num_warmup_steps=5, num_training_steps=40)
    theirs = [ref.lr_lambdas[0](s) for s in range(41)]
    ours = lr_lambda(TrainConfig(steps=40, lr=1e-3, lr_schedule="cosine", lr_min=0.0, warmup_steps=5), 1)
    floored = lr_lambda(TrainConfig(steps=40, lr=1e-3, lr_schedule="cosine", lr_min=1e-4, warmup_steps=5), 1)
    assert [ours(s) for s in range(5)] == pytest.approx(theirs[1:6], abs=1e-12)
    assert [ours(s) for s in range(5, 41)] == pytest.approx(theirs[5:], abs=1e-12)
    assert [floored(s) for s in range(5, 41)] == pytest.approx([0.1 + 0.9 * v for v in theirs[5:]], abs=1e-12)


def test_lr_schedule_constant_the_cosine_epochs_default_period_and_no_rise_past_the_end():
    """"constant" is 1 after the warm-up; "cosine_epoch" without lr_period_epochs spans the run's epochs
    (⌈steps·batch / samples⌉); past its end a cosine stays at its floor (a run resumed with more steps); a one-step
    cosine after the warm-up ends at the floor; an unknown schedule is named in one line."""
    from lfm_fast.config import TrainConfig
    from lfm_fast.errors import InputError
    from lfm_fast.train.step import lr_lambda

    const = lr_lambda(TrainConfig(steps=20, lr=1e-3, lr_schedule="constant", warmup_steps=4), 1)
    assert [const(s) for s in (0, 3, 4, 19, 50)] == [0.25, 1.0, 1.0, 1.0, 1.0]
    # 100 steps × 8 over 160 samples: 5 epochs of 20 steps; the multiplier of epoch e is the cosine at e / 5
    epoch = lr_lambda(TrainConfig(steps=100, batch_size=8, lr=1e-3, lr_schedule="cosine_epoch", lr_min=1e-4), 160)
    for s, e in ((0, 0), (19, 0), (20, 1), (45, 2), (99, 4), (100, 5), (180, 9)):
        assert epoch(s) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, e / 5)))), s
    cos = lr_lambda(TrainConfig(steps=100, lr=1e-3, lr_schedule="cosine", lr_min=1e-4), 1)
    assert cos(100) == cos(150) == pytest.approx(0.1)
    short = lr_lambda(TrainConfig(steps=3, lr=1e-3, lr_schedule="cosine", lr_min=1e-4, warmup_steps=2), 1)
    assert [short(s) for s in (0, 1, 2, 3)] == pytest.approx([0.5, 1.0, 1.0, 0.1])
    with pytest.raises(InputError, match="train.lr_schedule 'linear': expected 'constant', 'cosine' or 'cosine_epoch'"):
        lr_lambda(TrainConfig(lr_schedule="linear"), 1)
