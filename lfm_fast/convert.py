"""DiT weights to and from diffusers' `DiTTransformer2DModel` (the layout of facebookresearch/DiT's converted
checkpoints on the hub).

The two networks compute the same function once three conventions are mapped:

- Position embedding: MAE/DiT/diffusers put the column index in the first half of the channels, and so do our
  models (`model.pos_embed="mae"`); checkpoints written before lfm-fast 0.2 put the row index there ("rows"). The
  two orders differ by a swap of the two halves of the residual stream's channels, and a network is unchanged
  when every weight that reads or writes the residual stream is permuted alike (LayerNorm without affine is
  permutation-invariant), so converting a "rows" model permutes those weights: exact, no retraining.
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
from lfm_fast.models.dit import DiT, DiTConfig, sincos_pos_embed_2d, timestep_features

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
    sd = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    pos = sd.pop("pos_embed")
    grid = cfg.input_size // cfg.patch_size
    if torch.allclose(pos, sincos_pos_embed_2d(cfg.hidden_size, grid, "mae")[None], atol=1e-6):
        pass
    elif torch.allclose(pos, sincos_pos_embed_2d(cfg.hidden_size, grid, "rows")[None], atol=1e-6):
        sd = swap_position_halves(sd, cfg)  # a model written before 0.2: the same network in MAE's order
    else:
        raise InputError("this DiT's position embedding is not the fixed sin-cos table diffusers computes")
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
    return DiT.from_state_dict(cfg, {k: v.float() for k, v in sd.items()})


def write_diffusers(model: DiT, out: str, meta: dict | None = None) -> float:
    """`out`: a folder diffusers' DiTTransformer2DModel.from_pretrained loads; our checkpoint's `meta` (autoencoder,
    class names, recipe) rides along in its config for the way back. Returns to_diffusers' time difference."""
    from safetensors.torch import save_file

    from lfm_fast.fileio import atomic_path, write_json

    config, state, diff = to_diffusers(model)
    config["_lfm_fast_meta"] = meta or {}
    os.makedirs(out, exist_ok=True)
    with atomic_path(os.path.join(out, "diffusion_pytorch_model.safetensors")) as tmp:
        save_file({k: v.clone().contiguous() for k, v in state.items()}, tmp)  # the repeated embedders: own copies
    write_json(os.path.join(out, DIFFUSERS_CONFIG), config)
    return diff


def time_table_effect(model: DiT, n: int = 8) -> tuple[float, float]:
    """How much the velocity moves when the time embedding takes diffusers' frequency table instead of the model's:
    (max abs change, that over the velocity's RMS) on n seeded inputs at t = (i + ½)/n, CFG rows included."""
    import dataclasses

    cfg = model.config
    other = DiT.from_state_dict(dataclasses.replace(cfg, time_freq_shift=1.0), dict(model.state_dict())).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, cfg.in_channels, cfg.input_size, cfg.input_size, generator=g)
    t, y = (torch.arange(n) + 0.5) / n, torch.arange(n) % (cfg.num_classes + 1)
    with torch.no_grad():
        v, w = model.float()(x, t, y), other.float()(x, t, y)
    return float((v - w).abs().max()), float((v - w).abs().max() / v.pow(2).mean().sqrt())


def diffusers_meta(folder: str) -> dict:
    """The lfm-fast meta a folder written by `convert --to diffusers` carries ({} for any other), its autoencoder
    path resolved against the folder."""
    from lfm_fast.fileio import resolve_path

    with open(os.path.join(folder, DIFFUSERS_CONFIG)) as f:
        meta = dict(json.load(f).get("_lfm_fast_meta") or {})
    if meta.get("autoencoder"):
        meta["autoencoder"] = resolve_path(meta["autoencoder"], folder)
    return meta


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


# ---------------------------------------------------------------------------------------------------------------
# The LFM paper's released checkpoints (VinAIResearch/LFM, models/DiT.py): facebookresearch/DiT's network with
# these numerical differences from it, each mapped here or by the config:
#   1. time: t ∈ [0, 1] enters the sinusoid unscaled (DiT: integer steps 0…999)      → model.time_scale = 1
#   2. output: learn_sigma=False, C channels, the velocity (1 − σ_min)·noise − data  (DiT: 2C channels, ε and Σ);
#      a learned-sigma file keeps its first C channels, as from diffusers
#   3. labels: `y=None` is the last table row; unconditional models have num_classes=1 and no label dropout, so
#      that one row is added to every time embedding                                  → folded into its last bias
#   4. CFG (`forward_with_cfg`) guides all C channels (DiT: the first 3); ours guides all of them too
#   5. timm's PatchEmbed/Attention/Mlp (the same convolution, SDPA and fc1-GELU(tanh)-fc2): key names only
#   6. t = 1 is noise and t = 0 data, x_t = (1 − t)·x0 + (σ_min + (1 − σ_min)·t)·noise, σ_min 1e-5: our path
# The position table is MAE's (`pos_embed`, a frozen parameter saved in the file) and the frequency table DiT's
# (time_freq_shift 0), as ours. Files: `model_{epoch}.pth` (a state dict; EMA weights when LFM trained with
# --use_ema) or `content.pth` (model_dict, the optimizer whose state holds each parameter's "ema", and args).
LFM_KEYS = {"x_embedder.proj.": "x_embedder.", ".mlp.fc1.": ".mlp.0.", ".mlp.fc2.": ".mlp.2."}


def _load_pth(path: str):
    import argparse

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # content.pth pickles LFM's argparse args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and torch's own errors
        why = "it holds objects other than tensors and LFM's args" if "Weights only load failed" in str(e) else e.__class__.__name__
        raise InputError(f"--from lfm {path}: not a PyTorch checkpoint that loads safely ({why})") from None


def lfm_weights(obj: dict, weights: str = "auto") -> tuple[dict[str, torch.Tensor], str, dict]:
    """(state dict without DDP's `module.` prefix, which weights they are, LFM's args as a dict or {})."""
    args = vars(obj["args"]) if hasattr(obj.get("args"), "__dict__") else dict(obj.get("args") or {})
    if "model_dict" not in obj:  # model_{epoch}.pth: the weights LFM evaluated
        if weights == "model":
            raise InputError("--weights model: this file is a plain state dict (model_{epoch}.pth), which holds one set "
                             "of weights (EMA ones when LFM trained with --use_ema); give content.pth for the raw ones")
        return {k.removeprefix("module."): v for k, v in obj.items()}, "the file's weights", args
    model = {k.removeprefix("module."): v for k, v in obj["model_dict"].items()}
    if weights == "model":
        return model, "the raw weights (model_dict)", args
    opt = obj.get("optimizer") or {}
    ids = [i for g in opt.get("param_groups", []) for i in g["params"]]
    if not ids and weights == "auto":
        return model, "the raw weights (model_dict; the file holds no optimizer state, so no EMA)", args
    if len(ids) != len(model):  # parameters() and state_dict() list the same tensors in the same order (no buffers)
        raise InputError(f"content.pth: its optimizer lists {len(ids)} parameters, its model_dict {len(model)}")
    ema = {name: opt["state"][i]["ema"] for name, i in zip(model, ids) if "ema" in opt["state"].get(i, {})}
    if not ema:
        if weights == "ema":
            raise InputError("content.pth holds no EMA weights (LFM trained without --use_ema): pass --weights model")
        return model, "the raw weights (model_dict; the run kept no EMA)", args
    return {**model, **ema}, f"the EMA weights ({len(ema)} of {len(model)} tensors; the rest are frozen)", args


def from_lfm(state: dict[str, torch.Tensor], arch: str, num_classes: int | None = None) -> tuple[DiT, list[str]]:
    """A DiT (time_scale 1) computing what LFM's DiT with `state` computes at the same t, and the notes to print."""
    from lfm_fast.models.dit import arch_config

    sd = {}
    for k, v in state.items():
        if not isinstance(v, torch.Tensor):
            raise InputError(f"--from lfm: not an LFM DiT state dict ({k!r} holds a {type(v).__name__}, not a tensor)")
        for a, b in LFM_KEYS.items():
            k = k.replace(a, b)
        sd[k] = v.float()
    a, notes = arch_config(arch), []
    need = ("x_embedder.weight", "pos_embed", "y_embedder.embedding_table.weight", "final_layer.linear.weight")
    if any(n not in sd for n in need) or not any(k.startswith("blocks.") for k in sd):
        missing = next((n for n in need if n not in sd), "blocks.*")
        raise InputError(f"--from lfm: not an LFM DiT state dict (no {missing.replace('x_embedder.', 'x_embedder.proj.')}; "
                         "LFM's ADM U-Net checkpoints do not convert)")
    w = sd["x_embedder.weight"]
    try:
        depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    except ValueError:
        raise InputError("--from lfm: not an LFM DiT state dict (its blocks.* keys are not numbered)") from None
    found = (w.shape[0], depth, w.shape[-1])
    if found != (a["hidden_size"], a["depth"], a["patch_size"]):
        raise InputError(f"--arch {arch}: the file holds hidden size {found[0]}, depth {found[1]}, patch {found[2]} "
                         f"(--arch {arch} has {a['hidden_size']}, {a['depth']}, {a['patch_size']})")
    C, p, T = w.shape[1], a["patch_size"], sd["pos_embed"].shape[1]
    grid = int(round(T ** 0.5))
    rows = sd["y_embedder.embedding_table.weight"].shape[0]
    if num_classes is None:
        num_classes = 0 if rows == 1 else rows - 1
    if rows == 1 and num_classes <= 1:  # unconditional: its one row is a constant in every time embedding
        sd["t_embedder.mlp.2.bias"] = sd["t_embedder.mlp.2.bias"] + sd.pop("y_embedder.embedding_table.weight")[0]
        num_classes = 0
        notes.append("unconditional (its one label row is folded into the time embedding)")
    elif rows == num_classes:
        table = sd["y_embedder.embedding_table.weight"]
        sd["y_embedder.embedding_table.weight"] = torch.cat([table, torch.zeros_like(table[:1])])
        notes.append(f"{num_classes} classes and no trained null class (LFM trained it without label dropout): "
                     "sample with --cfg 1")
    elif rows == num_classes + 1:
        notes.append(f"{num_classes} classes + the null class")
    else:
        raise InputError(f"--num-classes {num_classes}: the label table has {rows} rows (expected N or N + 1)")
    out = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out == 2 * C:  # learn_sigma: rows ordered (p, q, channel); the first C channels
        keep = (torch.arange(p * p * out) % out) < C
        sd["final_layer.linear.weight"], sd["final_layer.linear.bias"] = (sd[n][keep] for n in ("final_layer.linear.weight",
                                                                                                "final_layer.linear.bias"))
        notes.append("learn_sigma: the first C output channels are kept")
    elif out != C:
        raise InputError(f"--from lfm: {out} output channels for {C} input channels (expected {C} or {2 * C})")
    cfg = DiTConfig(**a, input_size=grid * p, in_channels=C, num_classes=num_classes, time_scale=1.0, time_freq_shift=0.0)
    if grid * grid != T:
        raise InputError(f"--from lfm: pos_embed has {T} tokens, not a square grid")
    try:
        return DiT.from_state_dict(cfg, sd), notes
    except (ValueError, RuntimeError) as e:
        raise InputError(f"--from lfm: the file does not match a {arch} ({mismatch(e)})") from None


def mismatch(e: Exception) -> str:
    """The first line of load_state_dict's complaint that names a tensor."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return next((line for line in lines if "size mismatch" in line or "tensors" in line), lines[0] if lines else "")[:200]


def read_lfm(path: str, arch: str | None, num_classes: int | None = None, weights: str = "auto") -> tuple[DiT, list[str], dict]:
    """An LFM `.pth` (model_{epoch}.pth or content.pth) → (DiT, notes, LFM's args or {})."""
    if not os.path.isfile(path):
        raise InputError(f"--from lfm {path}: no such file (expected LFM's model_{{epoch}}.pth or content.pth)")
    obj = _load_pth(path)
    if not isinstance(obj, dict):
        raise InputError(f"--from lfm {path}: holds a {type(obj).__name__}, not a state dict")
    state, which, args = lfm_weights(obj, weights)
    arch = arch or args.get("model_type")
    if not arch:
        raise InputError(f"--from lfm {path}: the file does not say its architecture: pass --arch (e.g. DiT-L/2)")
    model, notes = from_lfm(state, arch, num_classes if num_classes is not None else args.get("num_classes"))
    return model, [which] + notes, args
