import json

import pytest
import torch

from lfm_fast.autoencoder import decode, downsample_factor, encode, load_autoencoder, train_autoencoder
from lfm_fast.data.shapes import ShapesDataset
from lfm_fast.errors import InputError


def test_small_ae_trains_measures_its_scale_and_round_trips(tmp_path):
    images = ShapesDataset(256, 32, seed=0).images
    summary = train_autoencoder(images, str(tmp_path / "ae"), steps=40, batch_size=16, progress=False)
    ae = load_autoencoder(str(tmp_path / "ae"))
    assert downsample_factor(ae) == 4
    # the measured scaling factor is persisted in the diffusers config and makes latents unit-variance
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["scaling_factor"] == pytest.approx(summary["scaling_factor"])
    z = encode(ae, images)
    assert z.shape == (256, 4, 8, 8) and abs(z.std().item() - 1) < 0.05
    rec = decode(ae, z)
    assert rec.shape == images.shape and rec.min() >= -1 and rec.max() <= 1
    # 40 steps already reconstruct better than the mean image does (measured: 0.76 of its error; 30 steps: 0.82)
    baseline = (images - images.mean(0)).pow(2).mean()
    assert (rec - images).pow(2).mean() < 0.85 * baseline
    # encode is deterministic (posterior mean) and the saved weights reload exactly
    torch.testing.assert_close(encode(ae, images[:8]), encode(load_autoencoder(str(tmp_path / "ae")), images[:8]), rtol=0, atol=0)


def test_load_autoencoder_errors(tmp_path):
    with pytest.raises(InputError, match="no such folder"):
        load_autoencoder(str(tmp_path / "missing"))
    with pytest.raises(InputError, match="no config.json"):
        load_autoencoder(str(tmp_path))


def test_a_folder_that_is_not_an_autoencoder_is_one_input_error(tmp_path):
    """A config.json without weights (or of another model) beside it: one line, not diffusers' traceback."""
    import json

    import pytest

    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.errors import InputError

    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(InputError, match="not a diffusers AutoencoderKL folder"):
        load_autoencoder(str(tmp_path), device="cpu")
