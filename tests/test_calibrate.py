import json
import shutil

import numpy as np
import pytest
import torch

from lfm_fast.calibrate import GRIDS_FILE, fit_grid, grid_key, load_times, reference_solution, rel_error
from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT, DiTConfig
from lfm_fast.sampling import SampleConfig, per_image_noise, sample_with, time_grid
from tests.conftest import perturbed
from tests.test_cli import assert_input_error, run_cli


def test_fitted_grid_beats_every_analytic_start_on_held_out_noise():
    torch.manual_seed(0)
    # a fixed random field (the one this test was written on: its position table row-first; in MAE's order the
    # best analytic grid is already within 5 % of the fitted one on this field, so the margin would say nothing)
    model = perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=1, num_heads=2, num_classes=3, time_scale=1.0,
                                    pos_embed="rows")), scale=0.3)
    cfg = SampleConfig(solver="euler", steps=4, cfg=2.0)

    def batch(seed, n=24):
        noise, y = per_image_noise(list(range(seed, seed + n)), (4, 8, 8)), torch.arange(n) % 3
        return noise, y, reference_solution(model, noise, y, cfg, tol=1e-6)

    noise, y, ref = batch(100)
    model.train()
    fit = fit_grid(model, noise, y, ref, cfg, iters=25, progress=False)
    assert model.training and all(p.requires_grad for p in model.parameters())  # the caller's model, as it was
    times = fit["times"]
    assert times[0] == 1 and times[-1] == 0 and all(b < a for a, b in zip(times, times[1:]))
    assert fit["error"] < 0.95 * min(fit["start_errors"].values())
    # the grid generalises to other noise: better than the start grid there too
    noise, y, ref = batch(200)
    err = lambda c: float(rel_error(sample_with(model, noise, y, c).latents, ref))  # noqa: E731
    start, _, shift = fit["start"].partition(":")
    assert err(SampleConfig("euler", 4, 2.0, "calibrated", times=tuple(times))) < err(SampleConfig("euler", 4, 2.0, start, float(shift)))


@pytest.fixture
def ckpt(tiny_pipeline, tmp_path):
    folder = tmp_path / "dit"
    shutil.copytree(tiny_pipeline / "dit", folder, ignore=shutil.ignore_patterns("checkpoints"))
    return str(folder)


def test_cli_calibrate_then_sample_and_export_on_the_calibrated_grid(ckpt, tiny_pipeline, tmp_path, capsys):
    code, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--solver", "dpm++2m", "--steps", "2", "--grid", "calibrated",
                        "--out", str(tmp_path / "s"))
    assert_input_error(code, err, "no grid for dpm++2m/2/cfg", "lfm-fast calibrate --ckpt", "--nfe 2")
    assert not (tmp_path / "s").exists()
    code, _ = run_cli(capsys, "calibrate", "--ckpt", ckpt, "--solver", "dpm++2m", "--nfe", "2", "--num", "4", "--iters", "3")
    assert code == 0
    before = open(f"{ckpt}/{GRIDS_FILE}").read()  # a stored grid is replaced only with --overwrite
    code, err = run_cli(capsys, "calibrate", "--ckpt", ckpt, "--solver", "dpm++2m", "--nfe", "2", "--num", "4", "--iters", "2")
    assert_input_error(code, err, "already has a grid for dpm++2m/2/cfg", "(fitted on 4 images)", "--overwrite")
    assert open(f"{ckpt}/{GRIDS_FILE}").read() == before
    stored = json.load(open(f"{ckpt}/{GRIDS_FILE}"))
    cfg = json.load(open(f"{ckpt}/config.json"))["meta"]["experiment"]["sample"]["cfg"]
    scfg = SampleConfig("dpm++2m", 2, cfg, "calibrated")
    (key, entry), = stored.items()
    assert key == grid_key(scfg) and entry["num"] == 4 and len(entry["times"]) == 3
    times = load_times(ckpt, scfg)
    assert time_grid(2, "calibrated", times=times) == list(times)

    code, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--solver", "dpm++2m", "--steps", "2", "--grid", "calibrated",
                        "--num", "3", "--ae", str(tiny_pipeline / "ae"), "--out", str(tmp_path / "s"))
    assert code == 0, err
    model = DiT.from_pretrained(ckpt).eval()
    with np.load(tmp_path / "s" / "samples.npz") as f:
        images = f["arr_0"]
    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.generate import latents_to_images

    ae = load_autoencoder(str(tiny_pipeline / "ae"), device="cpu")
    noise = per_image_noise([0, 1, 2], (4, model.config.input_size, model.config.input_size))
    ref = latents_to_images(ae, sample_with(model, noise, torch.arange(3) % model.config.num_classes,
                                            SampleConfig("dpm++2m", 2, cfg, "calibrated", times=times)).latents)
    assert np.abs(images.astype(int) - ref.astype(int)).max() <= 1
    from lfm_fast import LFMPipeline  # the pipeline finds the same stored grid: the same images

    pipe = LFMPipeline.from_pretrained(ckpt, device="cpu", vae=str(tiny_pipeline / "ae"))
    out = pipe(num_images=3, solver="dpm++2m", num_inference_steps=2, grid="calibrated", seed=0, output_type="np")
    assert np.array_equal(out.images, images)
    with pytest.raises(InputError, match="grid=calibrated: .* no grid for dpm\\+\\+2m/3/"):
        pipe(num_images=1, solver="dpm++2m", num_inference_steps=3, grid="calibrated")
    code, err = run_cli(capsys, "export", "--ckpt", ckpt, "--solver", "dpm++2m", "--steps", "2", "--grid", "calibrated",
                        "--out", str(tmp_path / "c.onnx"))
    assert code == 0, err
    from lfm_fast.export.onnx import read_metadata

    assert read_metadata(str(tmp_path / "c.onnx")).recipe.times == tuple(times)


def test_cli_sampler_flag_errors(ckpt, tmp_path, capsys):
    out = str(tmp_path / "s")
    for argv, words in ((["calibrate", "--solver", "heun", "--nfe", "5"], ("--nfe 5", "multiple of 2")),
                        (["sample", "--cfg-interval", "0.8:0.2", "--out", out], ("--cfg-interval 0.8:0.2", "LO ≤ HI")),
                        (["sample", "--cfg-interval", "half", "--out", out], ("expected LO:HI",)),
                        (["sample", "--grid", "shifted", "--shift", "0", "--out", out], ("--shift 0",)),
                        (["export", "--grid", "power", "--shift", "-2", "--out", str(tmp_path / "x.onnx")], ("--shift -2",)),
                        # flags the chosen solver or grid would ignore are refused
                        (["sample", "--solver", "dopri5", "--steps", "8", "--out", out], ("--ode-steps 8", "adaptive")),
                        (["sample", "--solver", "bosh3", "--grid", "shifted", "--out", out], ("--grid shifted", "adaptive")),
                        (["sample", "--solver", "heun", "--atol", "1e-3", "--out", out], ("--atol 0.001", "fixed-step")),
                        (["sample", "--grid", "uniform", "--shift", "3", "--out", out], ("--shift 3.0", "takes no shift"))):
        code, err = run_cli(capsys, argv[0], "--ckpt", ckpt, *argv[1:])
        assert_input_error(code, err, *words)


def test_a_shifted_grid_with_shift_1_warns_that_it_is_uniform(ckpt):
    import argparse

    from lfm_fast.cli.recipe import sample_config, sampler
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    args = argparse.Namespace(ckpt=ckpt, solver="heun", steps=4, cfg=None, grid="shifted", shift=None, atol=None, rtol=None,
                              cfg_interval=None, backend="eager")
    with pytest.warns(UserWarning, match="--grid shifted with shift 1 is the uniform grid"):
        scfg = sample_config(sampler(args, DiT.from_pretrained(ckpt), read_checkpoint_config(ckpt)), args)
    assert time_grid(4, scfg.grid, scfg.shift) == time_grid(4)


def test_a_broken_grids_file_is_one_line(ckpt, capsys, tmp_path):
    cfg = SampleConfig("heun", 4, 2.0, "calibrated")
    for text in ("{not json", "[1, 2]", "5", json.dumps({grid_key(cfg): "x"}), json.dumps({grid_key(cfg): {"times": None}})):
        with open(f"{ckpt}/{GRIDS_FILE}", "w") as f:
            f.write(text)
        with pytest.raises(InputError, match="not a calibrated-grids file"):
            load_times(ckpt, cfg)
    for times, words in (([1, float("nan"), 0.5, 0.2, 0], "fall strictly"), ([7, 0.8, 0.5, 0.2, -5], "from 1 to 0")):
        with open(f"{ckpt}/{GRIDS_FILE}", "w") as f:
            json.dump({grid_key(cfg): {"times": times}}, f)
        code, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--solver", "heun", "--steps", "4", "--cfg", "2",
                            "--grid", "calibrated", "--out", str(tmp_path / "s"))
        assert_input_error(code, err, words)
    code, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--solver", "dopri5", "--grid", "calibrated", "--out", str(tmp_path / "s"))
    assert_input_error(code, err, "adaptive")
