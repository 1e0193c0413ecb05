"""Our DiT against diffusers' DiTTransformer2DModel, an implementation we did not write, through the converter both
ways: the same weights and inputs give the same velocity (fp32, 1e-5), which also proves the position-embedding
and timestep conventions map exactly."""

import dataclasses

import numpy as np
import pytest
import torch

from lfm_fast.cli import main
from lfm_fast.convert import from_diffusers, read_diffusers, swap_position_halves, to_diffusers, write_diffusers
from lfm_fast.models.dit import DiT, DiTConfig
from tests.conftest import perturbed

diffusers = pytest.importorskip("diffusers")
CFG = DiTConfig(input_size=8, hidden_size=48, depth=2, num_heads=3, num_classes=5, time_scale=1000.0, time_freq_shift=1.0)


def ours(cfg=CFG):
    torch.manual_seed(0)
    return perturbed(DiT(cfg)).eval()


def inputs(cfg=CFG, b=3):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(b, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g), torch.rand(b, generator=g),
            torch.arange(b) % (cfg.num_classes + 1))  # the null class too


def theirs(model, x, t, y, scale=1000.0):
    with torch.no_grad():
        return model(hidden_states=x, timestep=t * scale, class_labels=y).sample


def test_ours_to_diffusers_computes_the_same_velocity(tmp_path):
    model = ours()
    assert write_diffusers(model, str(tmp_path / "d")) == 0.0
    other = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "d")).eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
    assert (theirs(other, x, t, y) - ref).abs().max() <= 1e-5
    back = read_diffusers(str(tmp_path / "d"))  # and back: the same weights, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_a_dit_convention_model_says_how_far_its_time_embedding_moves():
    model = ours(dataclasses.replace(CFG, time_freq_shift=0.0))
    _, _, diff = to_diffusers(model)
    assert 0.1 < diff <= 2.0  # sin/cos features: the frequency tables differ, the converter says by how much


@pytest.mark.parametrize("learned_sigma", [False, True])
def test_diffusers_to_ours_computes_the_same_velocity(learned_sigma):
    torch.manual_seed(2)
    other = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                            out_channels=8 if learned_sigma else 4, num_layers=2, sample_size=8,
                                            patch_size=2, num_embeds_ada_norm=5, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for block in other.transformer_blocks[1:]:  # DiT's checkpoints: one embedder, repeated in every block
            block.norm1.emb.load_state_dict(other.transformer_blocks[0].norm1.emb.state_dict())
    model = from_diffusers(dict(other.config), other.state_dict())
    x, t, y = inputs(model.config)
    with torch.no_grad():
        ref = model(x, t, y)
    assert (theirs(other, x, t, y)[:, :4] - ref).abs().max() <= 1e-5  # learned sigma: the first C channels


def test_the_position_halves_swap_is_an_exact_reparametrisation():
    model = ours()
    swapped = swap_position_halves(model.state_dict(), CFG)
    assert all(torch.equal(a, b) for a, b in zip(swap_position_halves(swapped, CFG).values(), model.state_dict().values()))


def test_cli_convert_both_ways_and_sample_the_converted_model(tmp_path, capsys):
    src = tmp_path / "run"
    ours().save_pretrained(str(src), meta={"autoencoder": "builtin:shapes"})
    assert main(["convert", "--to", "diffusers", str(src), str(tmp_path / "d")]) == 0
    assert "exact" in capsys.readouterr().out
    assert main(["convert", "--from", "diffusers", str(tmp_path / "d"), str(tmp_path / "back")]) == 0
    common = ["sample", "--num", "4", "--solver", "euler", "--steps", "2", "--ae", "builtin:shapes"]
    assert main(common + ["--ckpt", str(src), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--ckpt", str(tmp_path / "back"), "--out", str(tmp_path / "b")]) == 0
    a, b = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    capsys.readouterr()
    assert main(["convert", "--to", "diffusers", str(src), str(tmp_path / "d")]) == 2  # exists: refused
    assert main(["convert", "--from", "diffusers", str(src), str(tmp_path / "x")]) == 2  # not a diffusers folder
    assert "expected config.json and diffusion_pytorch_model.safetensors" in capsys.readouterr().err
