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

import diffusers  # noqa: E402 (a hard dependency: a broken import fails, never skips)
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


@pytest.mark.parametrize("order", ["mae", "rows"])
def test_ours_to_diffusers_computes_the_same_velocity(tmp_path, order):
    """"mae" (ours since 0.2) maps weight for weight; "rows" (checkpoints before 0.2) through the channel swap."""
    model = ours(dataclasses.replace(CFG, pos_embed=order))
    assert write_diffusers(model, str(tmp_path / "d")) == 0.0
    other = diffusers.DiTTransformer2DModel.from_pretrained(str(tmp_path / "d")).eval()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        assert (theirs(other, x, t, y) - ref).abs().max() <= 1e-5
        back = read_diffusers(str(tmp_path / "d"))
        assert (back(x, t, y) - ref).abs().max() <= 1e-5
    if order == "mae":  # and back: the same weights, bit for bit
        assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


def test_a_checkpoint_from_before_the_saved_position_table_loads_as_it_was(tmp_path):
    """0.1 wrote no `pos_embed` tensor and no `model.pos_embed` field, and its table was row-first."""
    import json

    from safetensors.torch import load_file, save_file

    model = ours(dataclasses.replace(CFG, pos_embed="rows"))
    model.save_pretrained(str(tmp_path))
    state = load_file(str(tmp_path / "model.safetensors"))
    assert torch.equal(state.pop("pos_embed"), model.pos_embed)  # saved with the weights now
    save_file(state, str(tmp_path / "model.safetensors"))
    config = json.loads((tmp_path / "config.json").read_text())
    del config["model"]["pos_embed"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    old = DiT.from_pretrained(str(tmp_path))
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(old(x, t, y), model(x, t, y))
    assert old.config.pos_embed == "rows"
    assert not torch.equal(model.pos_embed, DiT(CFG).pos_embed)  # the two orders do differ


def test_a_dit_convention_model_says_how_far_its_time_embedding_moves():
    from lfm_fast.convert import time_table_effect

    model = ours(dataclasses.replace(CFG, time_freq_shift=0.0))
    _, _, diff = to_diffusers(model)
    assert 0.1 < diff <= 2.0  # sin/cos features: the frequency tables differ, the converter says by how much
    worst, rel = time_table_effect(model)  # and how far the velocity moves
    assert worst > 1e-3 and 0 < rel < 1 and time_table_effect(ours()) == (0.0, 0.0)


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
    assert main(["convert", "--from", "diffusers", str(tmp_path / "d"), "--out", str(tmp_path / "back")]) == 0
    assert "autoencoder builtin:shapes" in capsys.readouterr().out  # the checkpoint's meta rides along and back
    common = ["sample", "--num", "4", "--solver", "euler", "--steps", "2"]
    assert main(common + ["--ckpt", str(src), "--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--ckpt", str(tmp_path / "back"), "--out", str(tmp_path / "b")]) == 0
    a, b = np.load(tmp_path / "a" / "samples.npz")["arr_0"], np.load(tmp_path / "b" / "samples.npz")["arr_0"]
    assert np.array_equal(a, b)
    capsys.readouterr()
    assert main(["convert", "--to", "diffusers", str(src), str(tmp_path / "d")]) == 2  # exists: refused
    dit = tmp_path / "dit-convention"
    ours(dataclasses.replace(CFG, time_freq_shift=0.0)).save_pretrained(str(dit))
    assert main(["convert", "--to", "diffusers", str(dit), "--out", str(tmp_path / "d0")]) == 0
    said = capsys.readouterr().out
    assert "not exact" in said and "% of its RMS" in said
    assert main(["convert", "--from", "diffusers", str(src), str(tmp_path / "x")]) == 2  # not a diffusers folder
    assert "expected config.json and diffusion_pytorch_model.safetensors" in capsys.readouterr().err


# --- the LFM paper's .pth checkpoints --------------------------------------------------------------------------
# The reference is diffusers' DiT again, with its timestep table set to DiT's (downscale_freq_shift 0) and fed LFM's
# unscaled t: then it computes what LFM's models/DiT.py computes (the same MAE position table, timm-equivalent
# blocks). The test writes its weights in LFM's key layout itself.


def lfm_reference(num_classes=5, learned_sigma=False, seed=3):
    torch.manual_seed(seed)
    other = diffusers.DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4,
                                            out_channels=8 if learned_sigma else 4, num_layers=12, sample_size=8,
                                            patch_size=2, num_embeds_ada_norm=num_classes, norm_eps=1e-6).eval()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for block in other.transformer_blocks:
            block.norm1.emb.load_state_dict(other.transformer_blocks[0].norm1.emb.state_dict())
            block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT's (and LFM's) frequency table
    return other


def lfm_layout(other, label_rows):
    """The state dict LFM's DiT (timm blocks) holds for the same network, under DDP's `module.` prefix."""
    s, e = other.state_dict(), "transformer_blocks.0.norm1.emb."
    sd = {"pos_embed": other.pos_embed.pos_embed.clone(), "x_embedder.proj.weight": s["pos_embed.proj.weight"],
          "x_embedder.proj.bias": s["pos_embed.proj.bias"],
          "t_embedder.mlp.0.weight": s[e + "timestep_embedder.linear_1.weight"], "t_embedder.mlp.0.bias": s[e + "timestep_embedder.linear_1.bias"],
          "t_embedder.mlp.2.weight": s[e + "timestep_embedder.linear_2.weight"], "t_embedder.mlp.2.bias": s[e + "timestep_embedder.linear_2.bias"],
          "y_embedder.embedding_table.weight": s[e + "class_embedder.embedding_table.weight"][:label_rows]}
    for i in range(len(other.transformer_blocks)):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for w in ("weight", "bias"):
            sd.update({b + f"attn.qkv.{w}": torch.cat([s[o + f"attn1.to_{n}.{w}"] for n in "qkv"]),
                       b + f"attn.proj.{w}": s[o + f"attn1.to_out.0.{w}"], b + f"mlp.fc1.{w}": s[o + f"ff.net.0.proj.{w}"],
                       b + f"mlp.fc2.{w}": s[o + f"ff.net.2.{w}"], b + f"adaLN_modulation.1.{w}": s[o + f"norm1.linear.{w}"]})
    for w in ("weight", "bias"):
        sd[f"final_layer.adaLN_modulation.1.{w}"] = s[f"proj_out_1.{w}"]
        sd[f"final_layer.linear.{w}"] = s[f"proj_out_2.{w}"]
    return {"module." + k: v.clone() for k, v in sd.items()}


def content_pth(ema: dict, args) -> dict:
    """LFM's content.pth: raw weights in model_dict, EMA in the optimizer state (none for the frozen pos_embed)."""
    model = {k: v + 0.5 for k, v in ema.items()}
    state = {i: {"step": torch.tensor(7.0), "exp_avg": torch.zeros_like(v), "exp_avg_sq": torch.zeros_like(v),
                 **({} if k.endswith("pos_embed") else {"ema": v})} for i, (k, v) in enumerate(ema.items())}
    return {"epoch": 3, "global_step": 70, "args": args, "model_dict": model, "scheduler": {},
            "optimizer": {"state": state, "param_groups": [{"lr": 1e-4, "params": list(range(len(ema)))}]}}


@pytest.mark.parametrize("kind", ["label", "unconditional", "learned_sigma"])
def test_an_lfm_checkpoint_computes_what_lfms_dit_computes(tmp_path, kind):
    from lfm_fast.convert import read_lfm

    other = lfm_reference(num_classes=1 if kind == "unconditional" else 5, learned_sigma=kind == "learned_sigma")
    path = str(tmp_path / "model_475.pth")
    torch.save(lfm_layout(other, 1 if kind == "unconditional" else 6), path)
    model, notes, _ = read_lfm(path, "DiT-S/2")
    assert model.config.time_scale == 1.0 and model.config.num_classes == (0 if kind == "unconditional" else 5)
    g = torch.Generator().manual_seed(4)
    x, t = torch.randn(4, 4, 8, 8, generator=g), torch.rand(4, generator=g)
    y = torch.zeros(4, dtype=torch.long) if kind == "unconditional" else torch.tensor([0, 3, 4, 5])  # 5: the null class
    with torch.no_grad():
        ref = other(hidden_states=x, timestep=t, class_labels=y).sample[:, :4]  # LFM: t unscaled
        assert (model(x, t, None if kind == "unconditional" else y) - ref).abs().max() <= 1e-5
    assert any({"unconditional": "folded", "learned_sigma": "first C", "label": "null class"}[kind] in n for n in notes)


def test_cli_converts_lfms_content_pth_ema_or_raw_and_samples_it(tmp_path, capsys):
    import argparse

    other = lfm_reference()
    ema = lfm_layout(other, 6)
    args = argparse.Namespace(model_type="DiT-S/2", num_classes=5, pretrained_autoencoder_ckpt="builtin:shapes",
                              scale_factor=0.18215, label_dropout=0.1)
    torch.save(content_pth(ema, args), tmp_path / "content.pth")
    assert main(["convert", "--from", "lfm", str(tmp_path / "content.pth"), "--out", str(tmp_path / "ema")]) == 0
    out = capsys.readouterr().out
    assert "EMA weights" in out and "autoencoder builtin:shapes" in out and "5 classes" in out
    assert main(["convert", "--from", "lfm", str(tmp_path / "content.pth"), "--weights", "model", "--out", str(tmp_path / "raw")]) == 0
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])
    with torch.no_grad():
        ref = other(hidden_states=x, timestep=t, class_labels=y).sample
        assert (DiT.from_pretrained(str(tmp_path / "ema"))(x, t, y) - ref).abs().max() <= 1e-5
        assert (DiT.from_pretrained(str(tmp_path / "raw"))(x, t, y) - ref).abs().max() > 0.1  # model_dict: other weights
    assert main(["sample", "--ckpt", str(tmp_path / "ema"), "--num", "3", "--labels", "0,4", "--solver", "euler",
                 "--steps", "2", "--cfg", "2", "--out", str(tmp_path / "s")]) == 0  # the AE comes from the checkpoint
    written = np.load(tmp_path / "s" / "samples.npz")["arr_0"]
    from lfm_fast import LFMPipeline  # and through the Python API: the same images

    pipe = LFMPipeline.from_pretrained(str(tmp_path / "ema"), device="cpu")
    out = pipe(class_labels=[0, 4, 0], num_inference_steps=2, solver="euler", guidance_scale=2.0, seed=0, output_type="np")
    assert written.shape == (3, 32, 32, 3) and np.array_equal(out.images, written)
    capsys.readouterr()
    bad = [(["--arch", "DiT-B/2"], "hidden size 384"), (["--num-classes", "9"], "6 rows"), ([], "exists")]
    for extra, msg in bad:
        assert main(["convert", "--from", "lfm", str(tmp_path / "content.pth"), "--out", str(tmp_path / "ema")] + extra) == 2
        assert msg in capsys.readouterr().err
    torch.save({"model_dict": {}, "args": args}, tmp_path / "bad.pth")
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    torch.save({"foo": 1}, tmp_path / "notensor.pth")
    torch.save({k: v for k, v in ema.items() if "y_embedder" not in k}, tmp_path / "nolabels.pth")
    torch.save({**ema, "module.blocks.a.x": torch.zeros(1)}, tmp_path / "badblock.pth")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "module.pth")
    for name, msg in (("junk.pth", "not a PyTorch checkpoint that loads safely"), ("none.pth", "no such file"),
                      ("notensor.pth", "'foo' holds a int"), ("nolabels.pth", "no y_embedder.embedding_table.weight"),
                      ("badblock.pth", "not numbered"), ("module.pth", "objects other than tensors")):
        assert main(["convert", "--from", "lfm", str(tmp_path / name), "--arch", "DiT-S/2", "--out", str(tmp_path / "z")]) == 2
        assert msg in capsys.readouterr().err
    assert not (tmp_path / "z").exists()
