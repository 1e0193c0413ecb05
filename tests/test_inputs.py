"""Every bad input: one line `lfm-fast: error: …`, exit code 2, nothing written. Config fields are checked when
parsed (presets, overrides, config.json), not when first used."""

import json
import shutil

import pytest

from lfm_fast.config import from_dict, get_preset, to_dict
from lfm_fast.errors import InputError
from tests.test_cli import assert_input_error, run_cli


@pytest.mark.parametrize("flags,words", [
    (["--ode-steps", "0"], "--ode-steps 0"), (["--batch-size", "0"], "--batch-size 0"), (["--cfg", "-1"], "--cfg -1.0"),
    (["--num-images", "0"], "--num-images 0"), (["--solver", "dopri5", "--atol", "0"], "--atol 0.0"), (["--cfg", "nan"], "--cfg nan"),
    (["--solver", "foo"], "sample: argument --solver: invalid choice"),
])
def test_sample_refuses_bad_numbers(tiny_pipeline, tmp_path, capsys, flags, words):
    assert_input_error(*run_cli(capsys, "sample", "--ckpt", str(tiny_pipeline / "dit"), "--out", str(tmp_path / "s"), *flags), words)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("override,words", [
    ("model.attn_backend=flash", "model.attn_backend='flash': expected one of auto"),
    ("flow.time_sampling=foo", "flow.time_sampling='foo'"), ("train.batch_size=0", "train.batch_size=0: expected a positive"),
    ("sample.solver=foo", "sample.solver='foo'"), ("train.ema_decay=1.5", "train.ema_decay=1.5: expected a number in [0, 1)"),
    ("train.activation_checkpointing=some", "activation_checkpointing"), ("train.lr=-1", "train.lr=-1.0"),
    ("train.lr=nan", "train.lr=nan: expected a finite number"), ("flow.sigma_min=inf", "expected a finite number"),
])
def test_overrides_are_checked_when_parsed(random_latents, tmp_path, capsys, override, words):
    assert_input_error(*run_cli(capsys, "train", "--latents", random_latents, "--preset", "small-data", "--out",
                                str(tmp_path / "run"), override), words)
    assert not (tmp_path / "run").exists()


def test_every_preset_is_valid_and_config_json_is_checked_too():
    from lfm_fast.config import PRESETS

    for name in PRESETS:
        assert from_dict(to_dict(get_preset(name))).name == name
    d = to_dict(get_preset("small-data"))
    d["train"]["steps"] = "many"
    with pytest.raises(InputError, match="train.steps='many': expected an int"):
        from_dict(d)
    d = to_dict(get_preset("small-data"))
    d["model"]["wings"] = 2
    with pytest.raises(InputError, match="wings"):
        from_dict(d)


def test_a_broken_checkpoint_gets_one_line(tiny_pipeline, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_pipeline / "dit", ckpt, ignore=shutil.ignore_patterns("checkpoints"))
    (ckpt / "model.safetensors").write_bytes(b"12345")
    assert_input_error(*run_cli(capsys, "sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s")), "cannot read model.safetensors")
    shutil.copy(tiny_pipeline / "dit" / "model.safetensors", ckpt / "model.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["depth"] = "two"
    (ckpt / "config.json").write_text(json.dumps(config))
    assert_input_error(*run_cli(capsys, "sample", "--ckpt", str(ckpt), "--out", str(tmp_path / "s")), "model.depth='two'")
    config["model"]["depth"], config["model"]["hidden_size"] = 2, 64  # the right types, the wrong sizes for the weights
    (ckpt / "config.json").write_text(json.dumps(config))
    for command in (["sample", "--out", str(tmp_path / "s")], ["export", "--out", str(tmp_path / "x.onnx")]):
        assert_input_error(*run_cli(capsys, command[0], "--ckpt", str(ckpt), *command[1:]),
                           "model.safetensors does not match its config.json (size mismatch for")
    assert not (tmp_path / "s").exists() and not (tmp_path / "x.onnx").exists()


def test_image_folders_of_mixed_sizes_keep_the_common_size(tmp_path):
    """A `sample` folder holds grid.png beside the images: as an eval reference it is skipped, with a warning."""
    import numpy as np
    from PIL import Image

    from lfm_fast.eval.fid import load_images

    for i in range(3):
        Image.new("RGB", (32, 32), (i, 0, 0)).save(tmp_path / f"{i:06d}.png")
    Image.new("RGB", (140, 70)).save(tmp_path / "grid.png")
    with pytest.warns(UserWarning, match=r"skipped 1 image not of the common size 32×32 \(grid.png\)"):
        images = load_images(str(tmp_path))
    assert images.shape == (3, 32, 32, 3) and np.array_equal(images[:, 0, 0, 0], [0, 1, 2])


def test_metrics_needing_inception_say_which(tmp_path, capsys, monkeypatch):
    import numpy as np

    monkeypatch.delenv("LFM_FAST_INCEPTION", raising=False)
    np.savez(tmp_path / "two.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    assert_input_error(*run_cli(capsys, "eval", "--samples", str(tmp_path / "two.npz"), "--ref", str(tmp_path / "two.npz"),
                                "--metrics", "pr"), "precision/recall needs the Inception weights file")


def test_export_refuses_before_writing_anything(tiny_pipeline, tmp_path, capsys):
    ckpt = str(tiny_pipeline / "dit")
    out = tmp_path / "x.onnx"
    assert_input_error(*run_cli(capsys, "export", "--ckpt", ckpt, "--steps", "0", "--out", str(out)), "--ode-steps 0")
    assert_input_error(*run_cli(capsys, "export", "--ckpt", ckpt, "--solver", "dopri5", "--out", str(out)),
                       "--solver: invalid choice: 'dopri5'", "'euler', 'midpoint', 'heun'")
    code, err = run_cli(capsys, "export", "--ckpt", ckpt, "--format", "tensorrt", "--out", str(tmp_path / "x.plan"))
    assert code == 2 and "TensorRT" in err and len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_small_sample_metrics_warn_or_refuse():
    import numpy as np

    from lfm_fast.eval.frechet import frechet_distance, latent_fd
    from lfm_fast.eval.precision_recall import precision_recall

    rng = np.random.default_rng(0)
    with pytest.warns(UserWarning, match="needs more samples than dimensions"):
        latent_fd(rng.normal(size=(2, 8)), rng.normal(size=(2, 8)))
    with pytest.raises(InputError, match="at least 2 samples"):
        latent_fd(rng.normal(size=(1, 8)), rng.normal(size=(5, 8)))
    with pytest.raises(InputError, match="8 vs 4"):
        frechet_distance(np.zeros(8), np.eye(8), np.zeros(4), np.eye(4))
    with pytest.raises(InputError, match="more than 3 samples"):
        precision_recall(rng.normal(size=(2, 8)), rng.normal(size=(10, 8)))
