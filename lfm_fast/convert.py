"""DiT weights to and from diffusers' `DiTTransformer2DModel` (the layout of facebookresearch/DiT's converted
checkpoints on the hub).

The two networks compute the same function once three conventions are mapped:

- Position embedding: ours puts the row index in the first half of the channels, MAE/DiT/diffusers the column
  index. The two differ by a swap of the two halves of the residual stream's channels, and a network is unchanged
  when every weight that reads or writes the residual stream is permuted alike (LayerNorm without affine is
  permutation-invariant), so the conversion permutes those weights: exact, no retraining.
- Time: diffusers embeds `timestep` with frequencies exp(−ln(10⁴)·i / (half − 1)) (`downscale_freq_shift=1`),
  DiT with / half: `model.time_freq_shift` 1 or 0. A model converted from diffusers keeps 1 (exact); converting a
  shift-0 model to diffusers changes its embedding, and `to_diffusers` measures by how much. diffusers takes the
  timestep unscaled: pass t · `model.time_scale` (recorded in the folder's config as `_lfm_fast_time_scale`).
- Layout: diffusers repeats the time and label embedders in every block (one copy each here), splits q/k/v, and
  names the final layer's modulation `proj_out_1`. facebookresearch/DiT's learned-sigma models output 2C channels
  (ε and the variance); `from_diffusers` keeps the first C. Those weights predict ε with DiT's discrete time, not a
  flow-matching velocity: they load and run, but do not sample as an LFM model without fine-tuning.
"""

from __future__ import annotations

import json
import os

import torch

from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT, DiTConfig, timestep_features

DIFFUSERS_CONFIG = "config.json"


def _swap(d: int) -> torch.Tensor:
    """The channel permutation between our position embedding's order and MAE's (its own inverse)."""
    return torch.cat([torch.arange(d // 2, d), torch.arange(d // 2)])


def _residual_keys(depth: int) -> dict[str, tuple[int, int]]:
    """Our tensors that read or write the residual stream: name → (dimension, number of D-sized chunks)."""
    keys = {"x_embedder.weight": (0, 1), "x_embedder.bias": (0, 1), "final_layer.linear.weight": (1, 1),
            "final_layer.adaLN_modulation.1.weight": (0, 2), "final_layer.adaLN_modulation.1.bias": (0, 2)}
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update({b + "attn.qkv.weight": (1, 1), b + "attn.proj.weight": (0, 1), b + "attn.proj.bias": (0, 1),
                     b + "mlp.0.weight": (1, 1), b + "mlp.2.weight": (0, 1), b + "mlp.2.bias": (0, 1),
                     b + "adaLN_modulation.1.weight": (0, 6), b + "adaLN_modulation.1.bias": (0, 6)})
    return keys


def swap_position_halves(state: dict[str, torch.Tensor], cfg: DiTConfig) -> dict[str, torch.Tensor]:
    """The same network with its residual channels' halves swapped: our position-embedding order ↔ MAE's."""
    d, out = cfg.hidden_size, dict(state)
    perm = _swap(d)
    for name, (dim, chunks) in _residual_keys(cfg.depth).items():
        index = torch.cat([perm + k * d for k in range(chunks)])
        out[name] = state[name].index_select(dim, index)
    return out


def _check_convertible(cfg: DiTConfig):
    why = [w for w, bad in (("a condition input", cfg.condition != "none"), ("qk_norm", cfg.qk_norm),
                            ("mlp_ratio ≠ 4", cfg.mlp_ratio != 4), ("no class labels", cfg.num_classes <= 0)) if bad]
    if why:
        raise InputError(f"diffusers' DiTTransformer2DModel has no equivalent of this DiT ({', '.join(why)})")


def to_diffusers(model: DiT) -> tuple[dict, dict[str, torch.Tensor], float]:
    """(diffusers config, diffusers state dict, max abs change of the time embedding's input features over t ∈ [0, 1]
    from the frequency table: 0 for a time_freq_shift=1 model)."""
    cfg = model.config
    _check_convertible(cfg)
    sd = swap_position_halves({k: v.detach().float().cpu() for k, v in model.state_dict().items() if k != "pos_embed"}, cfg)
    d = cfg.hidden_size
    out = {"pos_embed.proj.weight": sd["x_embedder.weight"], "pos_embed.proj.bias": sd["x_embedder.bias"],
           "proj_out_1.weight": sd["final_layer.adaLN_modulation.1.weight"],
           "proj_out_1.bias": sd["final_layer.adaLN_modulation.1.bias"],
           "proj_out_2.weight": sd["final_layer.linear.weight"], "proj_out_2.bias": sd["final_layer.linear.bias"]}
    for i in range(cfg.depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        emb = o + "norm1.emb."
        out.update({emb + "timestep_embedder.linear_1.weight": sd["t_embedder.mlp.0.weight"],
                    emb + "timestep_embedder.linear_1.bias": sd["t_embedder.mlp.0.bias"],
                    emb + "timestep_embedder.linear_2.weight": sd["t_embedder.mlp.2.weight"],
                    emb + "timestep_embedder.linear_2.bias": sd["t_embedder.mlp.2.bias"],
                    emb + "class_embedder.embedding_table.weight": sd["y_embedder.embedding_table.weight"],
                    o + "norm1.linear.weight": sd[b + "adaLN_modulation.1.weight"],
                    o + "norm1.linear.bias": sd[b + "adaLN_modulation.1.bias"],
                    o + "attn1.to_out.0.weight": sd[b + "attn.proj.weight"], o + "attn1.to_out.0.bias": sd[b + "attn.proj.bias"],
                    o + "ff.net.0.proj.weight": sd[b + "mlp.0.weight"], o + "ff.net.0.proj.bias": sd[b + "mlp.0.bias"],
                    o + "ff.net.2.weight": sd[b + "mlp.2.weight"], o + "ff.net.2.bias": sd[b + "mlp.2.bias"]})
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[o + f"attn1.{name}.weight"] = sd[b + "attn.qkv.weight"][j * d:(j + 1) * d]
            out[o + f"attn1.{name}.bias"] = sd[b + "attn.qkv.bias"][j * d:(j + 1) * d]
    config = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.num_heads,
              "attention_head_dim": d // cfg.num_heads, "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
              "num_layers": cfg.depth, "sample_size": cfg.input_size, "patch_size": cfg.patch_size,
              "num_embeds_ada_norm": cfg.num_classes, "norm_eps": 1e-6, "norm_elementwise_affine": False,
              "activation_fn": "gelu-approximate", "attention_bias": True, "norm_type": "ada_norm_zero",
              "_lfm_fast_time_scale": cfg.time_scale}
    t = torch.linspace(0, 1, 1001)
    ours, theirs = (timestep_features(t, scale=cfg.time_scale, freq_shift=shift) for shift in (cfg.time_freq_shift, 1.0))
    return config, out, float((ours - theirs).abs().max())


def from_diffusers(config: dict, state: dict[str, torch.Tensor]) -> DiT:
    """A DiT (time_freq_shift 1) computing what diffusers' DiTTransformer2DModel of `config` and `state` computes."""
    c = config
    if c.get("norm_type", "ada_norm_zero") != "ada_norm_zero" or not c.get("num_embeds_ada_norm"):
        raise InputError("only class-conditional DiT checkpoints (norm_type ada_norm_zero) convert")
    heads, head_dim, C, p = c["num_attention_heads"], c["attention_head_dim"], c.get("in_channels", 4), c["patch_size"]
    d = heads * head_dim
    cfg = DiTConfig(input_size=c["sample_size"], in_channels=C, patch_size=p, hidden_size=d, depth=c["num_layers"],
                    num_heads=heads, num_classes=c["num_embeds_ada_norm"], time_scale=c.get("_lfm_fast_time_scale", 1000.0),
                    time_freq_shift=1.0)
    out_channels = c.get("out_channels") or C
    w2, b2 = state["proj_out_2.weight"], state["proj_out_2.bias"]
    if out_channels == 2 * C:  # learned sigma: rows ordered (p, q, channel); keep the first C channels (ε, not Σ)
        keep = (torch.arange(p * p * out_channels) % out_channels) < C
        w2, b2 = w2[keep], b2[keep]
    elif out_channels != C:
        raise InputError(f"out_channels {out_channels}: expected {C} or {2 * C} (learned sigma)")
    e0 = "transformer_blocks.0.norm1.emb."
    sd = {"x_embedder.weight": state["pos_embed.proj.weight"], "x_embedder.bias": state["pos_embed.proj.bias"],
          "t_embedder.mlp.0.weight": state[e0 + "timestep_embedder.linear_1.weight"],
          "t_embedder.mlp.0.bias": state[e0 + "timestep_embedder.linear_1.bias"],
          "t_embedder.mlp.2.weight": state[e0 + "timestep_embedder.linear_2.weight"],
          "t_embedder.mlp.2.bias": state[e0 + "timestep_embedder.linear_2.bias"],
          "y_embedder.embedding_table.weight": state[e0 + "class_embedder.embedding_table.weight"],
          "final_layer.adaLN_modulation.1.weight": state["proj_out_1.weight"],
          "final_layer.adaLN_modulation.1.bias": state["proj_out_1.bias"],
          "final_layer.linear.weight": w2, "final_layer.linear.bias": b2}
    for i in range(cfg.depth):
        b, o = f"blocks.{i}.", f"transformer_blocks.{i}."
        for name in ("timestep_embedder.linear_1.weight", "class_embedder.embedding_table.weight"):
            if not torch.equal(state[o + "norm1.emb." + name], state[e0 + name]):  # one embedder here, one per block there
                raise InputError(f"block {i}'s {name} differs from block 0's: DiT shares one embedder across blocks")
        sd.update({b + "adaLN_modulation.1.weight": state[o + "norm1.linear.weight"],
                   b + "adaLN_modulation.1.bias": state[o + "norm1.linear.bias"],
                   b + "attn.qkv.weight": torch.cat([state[o + f"attn1.{n}.weight"] for n in ("to_q", "to_k", "to_v")]),
                   b + "attn.qkv.bias": torch.cat([state[o + f"attn1.{n}.bias"] for n in ("to_q", "to_k", "to_v")]),
                   b + "attn.proj.weight": state[o + "attn1.to_out.0.weight"], b + "attn.proj.bias": state[o + "attn1.to_out.0.bias"],
                   b + "mlp.0.weight": state[o + "ff.net.0.proj.weight"], b + "mlp.0.bias": state[o + "ff.net.0.proj.bias"],
                   b + "mlp.2.weight": state[o + "ff.net.2.weight"], b + "mlp.2.bias": state[o + "ff.net.2.bias"]})
    return DiT.from_state_dict(cfg, swap_position_halves({k: v.float() for k, v in sd.items()}, cfg))


def write_diffusers(model: DiT, out: str) -> float:
    """`out`: a folder diffusers' DiTTransformer2DModel.from_pretrained loads. Returns to_diffusers' time difference."""
    from safetensors.torch import save_file

    from lfm_fast.fileio import atomic_path, write_json

    config, state, diff = to_diffusers(model)
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "diffusion_pytorch_model.safetensors")) as tmp:
        save_file({k: v.clone().contiguous() for k, v in state.items()}, tmp)  # the repeated embedders: own copies
    write_json(os.path.join(out, DIFFUSERS_CONFIG), config)
    return diff


def read_diffusers(folder: str) -> DiT:
    from safetensors.torch import load_file

    path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
    if not os.path.isfile(path) or not os.path.isfile(os.path.join(folder, DIFFUSERS_CONFIG)):
        raise InputError(f"--from diffusers {folder}: expected config.json and diffusion_pytorch_model.safetensors")
    with open(os.path.join(folder, DIFFUSERS_CONFIG)) as f:
        config = json.load(f)
    if config.get("_class_name") != "DiTTransformer2DModel":
        raise InputError(f"--from diffusers {folder}: a {config.get('_class_name')}, not a DiTTransformer2DModel")
    return from_diffusers(config, load_file(path))
