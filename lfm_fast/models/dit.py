"""DiT velocity network (Peebles & Xie 2023, adaLN-Zero), predicting the flow-matching velocity.

Pure PyTorch and meant to be read: every fused op goes through `lfm_fast.ops`, so with the
`reference` backends this file is the numerical reference for the kernels. Differences from the
original DiT: the output is a velocity with as many channels as the latent (no learned sigma), the
time embedding takes t ∈ [0, 1] (times `time_scale` before the sinusoid: DiT's 1000 or LFM's 1), optional
condition channels are concatenated to the input (inpainting / semantic maps), and QK-norm is optional.
"""

from __future__ import annotations

import json
import math
import os
import zlib
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from torch import nn

from lfm_fast import ops
from lfm_fast.choices import CONDITIONS
from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_path, write_json
from lfm_fast.models.cond import LabelEmbedder, SpatialRescaler, null_condition
from lfm_fast.validation import validate_section

DIT_SIZES = {  # DiT paper, Table 1
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)


@dataclass
class DiTConfig:
    input_size: int = 32  # latent height = width
    in_channels: int = 4  # latent channels (also the output channels)
    condition: str = "none"  # "inpaint": cond = [latent of the masked image, hole mask on the latent grid];
    # "semantic": cond = a one-hot map at image resolution, through a trained SpatialRescaler to the latent grid
    cond_channels: int = 0  # channels the condition adds to x (inpaint: in_channels + 1; semantic: the rescaler's output)
    semantic_classes: int = 0  # semantic: classes of the map (its one-hot channels)
    cond_stages: int = 0  # semantic: bilinear halvings from the map's resolution to the latent grid
    patch_size: int = 2
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0 = unconditional; otherwise label `num_classes` is the null class (-1 in a preset: from the data)
    qk_norm: bool = False
    # t ∈ [0, 1] enters the sinusoidal embedding as time_scale·t: DiT's 1000 (discrete steps), or LFM's 1. At 1000 the
    # embedding's frequencies reach 1000 rad per unit of t and the learnt field wiggles in t on a scale of ~0.01,
    # which no ODE solver with fewer steps can follow (measured: bench/REPORT.md, NFE sweep)
    time_scale: float = 1000.0
    # the sinusoids' frequencies exp(−ln(10⁴)·i / (half − time_freq_shift)): 0 in facebookresearch/DiT (and ours),
    # 1 in diffusers' `Timesteps(downscale_freq_shift=1)`, which a model converted from diffusers keeps
    time_freq_shift: float = 0.0
    # the fixed 2-D sin-cos position embedding's channel order: "mae" (MAE's, DiT's and diffusers': the first half
    # encodes the column, the second the row) or "rows" (the row first: what lfm-fast wrote before 0.2; a saved config
    # without this field is read as "rows", see `saved_model_config`). The table is a frozen tensor saved with the weights
    pos_embed: str = "mae"
    # the fused ops' kernels (lfm_fast.ops): a choice of the machine that runs the model, not of its weights, so never
    # written into config.json (see `saved_model_config`)
    attn_backend: str = "auto"
    norm_backend: str = "auto"

    @property
    def cond_shape(self) -> tuple[int, ...]:
        """The shape of one sample's condition input (() for none)."""
        if self.condition == "inpaint":
            return (self.in_channels + 1, self.input_size, self.input_size)
        if self.condition == "semantic":
            return (self.semantic_classes, self.input_size << self.cond_stages, self.input_size << self.cond_stages)
        return ()

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


def arch_config(name: str) -> dict:
    """'DiT-XL/2' → {hidden_size, depth, num_heads, patch_size}."""
    try:
        size, patch = name.removeprefix("DiT-").split("/")
        if size not in DIT_SIZES or int(patch) not in PATCH_SIZES:
            raise ValueError
    except ValueError:
        known = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)
        raise InputError(f"unknown DiT architecture {name!r}; expected one of {known}") from None
    return dict(DIT_SIZES[size], patch_size=int(patch))


def build_dit(name: str, **overrides) -> "DiT":
    """build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000)."""
    return DiT(DiTConfig(**{**arch_config(name), **overrides}))


RUNTIME_FIELDS = ("attn_backend", "norm_backend")  # chosen where the model runs; not saved, and ignored when read


def saved_model_config(model: dict) -> dict:
    """A `model` config section read from disk: one written before `pos_embed` existed was row-first; kernel backends
    (which 0.2 wrote) are the reading machine's choice, not the file's."""
    return {"pos_embed": "rows", **{k: v for k, v in model.items() if k not in RUNTIME_FIELDS}}


def sincos_pos_embed_2d(dim: int, grid: int, order: str = "mae") -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, shape (grid², dim), tokens row-major: [sin, cos] of the column
    index in the first half of the channels and of the row index in the second (MAE / DiT), or the halves the other
    way round (`order="rows"`)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coords = torch.arange(grid, dtype=torch.float64)
    row, col = torch.meshgrid(coords, coords, indexing="ij")

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    halves = (col, row) if order == "mae" else (row, col)
    return torch.cat([embed_1d(h) for h in halves], dim=1).float()


class TimestepEmbedder(nn.Module):
    """t ∈ [0, 1] → sinusoid of scale·t (1000: DiT's frequency range; 1: LFM's) → 2-layer MLP."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, scale: float = 1000.0, freq_shift: float = 0.0):
        super().__init__()
        self.freq_dim, self.scale, self.freq_shift = freq_dim, scale, freq_shift
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(t, self.freq_dim, self.scale, self.freq_shift).to(self.mlp[0].weight.dtype))


def timestep_features(t: torch.Tensor, freq_dim: int = 256, scale: float = 1000.0, freq_shift: float = 0.0) -> torch.Tensor:
    """[cos, sin] of scale·t at the frequencies exp(−ln(10⁴)·i / (freq_dim/2 − freq_shift)), fp32 (B, freq_dim)."""
    half = freq_dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / (half - freq_shift))
    args = scale * t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.backend = cfg.attn_backend
        head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.q_norm = nn.LayerNorm(head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(head_dim, eps=1e-6) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)
        if isinstance(self.q_norm, nn.Identity):  # packed: the kernels read the projection in place
            return self.proj(ops.attention_qkv(qkv, backend=self.backend).reshape(B, T, D))
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        out = ops.attention(self.q_norm(q), self.k_norm(k), v, backend=self.backend)
        return self.proj(out.transpose(1, 2).reshape(B, T, D))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.backend = cfg.norm_backend
        self.attn = Attention(cfg)
        hidden = int(cfg.hidden_size * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden_size, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 6 * cfg.hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        mod = self.adaLN_modulation(c).to(x.dtype)  # fp32 when the per-sample path is (`cast_token_path`)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        b = self.backend
        attn_out = self.attn(ops.adaln_modulate(x, shift_msa, scale_msa, b))
        # x + gate·attn and the MLP's modulate of that sum, fused into one pass over memory
        x, h = ops.gated_residual_modulate(x, gate_msa, attn_out, shift_mlp, scale_mlp, b)
        return ops.gated_residual(x, gate_mlp, self.mlp(h), b)


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.backend = cfg.norm_backend
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden_size, 2 * cfg.hidden_size))
        self.linear = nn.Linear(cfg.hidden_size, cfg.patch_size**2 * cfg.in_channels)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).to(x.dtype).chunk(2, dim=1)
        return self.linear(ops.adaln_modulate(x, shift, scale, self.backend))


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        ops.check_backend(cfg.attn_backend, ops.ATTENTION_BACKENDS, "attention")
        ops.check_backend(cfg.norm_backend, ops.NORM_BACKENDS, "norm")
        if cfg.num_classes < 0:
            raise InputError("DiT config: num_classes=-1 (from the data) must be resolved before the model is built")
        if cfg.input_size % cfg.patch_size or cfg.hidden_size % cfg.num_heads:
            raise InputError(f"DiT config: input_size {cfg.input_size} must be divisible by patch_size {cfg.patch_size} and "
                             f"hidden_size {cfg.hidden_size} by num_heads {cfg.num_heads} (here "
                             f"{'input_size' if cfg.input_size % cfg.patch_size else 'hidden_size'} is not)")
        _check_condition(cfg)
        self.config = cfg
        p, D = cfg.patch_size, cfg.hidden_size
        self.cond_encoder = (SpatialRescaler(cfg.semantic_classes, cfg.cond_channels, cfg.cond_stages)
                             if cfg.condition == "semantic" else None)
        self.x_embedder = nn.Conv2d(cfg.in_channels + cfg.cond_channels, D, kernel_size=p, stride=p)
        self.t_embedder = TimestepEmbedder(D, scale=cfg.time_scale, freq_shift=cfg.time_freq_shift)
        self.y_embedder = LabelEmbedder(cfg.num_classes, D) if cfg.num_classes > 0 else None
        self.register_buffer("pos_embed", self.fixed_pos_embed())  # frozen, saved with the weights (DiT's parameter)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        if not self.pos_embed.is_meta:
            self.initialize_weights()

    def initialize_weights(self, seed: int | None = None):
        """DiT's init: Xavier-uniform linears and patch embedding, N(0, 0.02) label and time embeddings,
        zero biases, and zero adaLN-Zero modulations and output layer (each block starts as the identity).

        Each parameter draws from its own generator, seeded by (seed, its name), and is computed full-size
        and then written into whatever shard this process holds: the weights are the same built eagerly or
        on the meta device and sharded afterwards, on any number of ranks. `seed=None` takes one from
        torch's global generator."""
        if seed is None:
            seed = int(torch.randint(2**62, (1,)).item())
        with torch.no_grad():
            for name, p in self.named_parameters():
                assign_full(p, _init_value(clean_fqn(name), tuple(p.shape), seed))
            self.pos_embed.copy_(self.fixed_pos_embed())

    def fixed_pos_embed(self) -> torch.Tensor:
        """The sin-cos table of `config.pos_embed`'s order, (1, T, D) fp32 on the CPU."""
        c = self.config
        return sincos_pos_embed_2d(c.hidden_size, c.input_size // c.patch_size, c.pos_embed)[None]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p²·C) → (B, C, H, W)."""
        p, C = self.config.patch_size, self.config.in_channels
        g = self.config.input_size // p
        x = x.view(x.shape[0], g, g, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], C, g * p, g * p)  # (b, c, h, p, w, q)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        """Velocity v(x, t | y, cond): x (B, C, H, W), t (B,) in [0, 1], y (B,) int64, cond as `config.condition`
        says: inpaint (B, C + 1, H, W), semantic one-hot (B, K, H·2^s, W·2^s)."""
        cfg = self.config
        if cfg.condition != "none":
            want = cfg.in_channels + 1 if cfg.condition == "inpaint" else cfg.semantic_classes
            if cond is None or cond.shape[1] != want:
                raise ValueError(f"this DiT ({cfg.condition}) expects a condition with {want} channels")
            if self.cond_encoder is not None:
                cond = self.cond_encoder(cond)
            x = torch.cat([x, cond.to(x.dtype)], dim=1)
        x = x.to(self.x_embedder.weight.dtype)  # the net runs in its weights' dtype (e.g. bf16 under FSDP2)
        patches = self.x_embedder(x).flatten(2).transpose(1, 2)  # (B, T, D), strided as (B, D, T)
        h = self.pos_embed.to(patches.dtype) + patches  # the table first: the sum takes its contiguous layout, so block 0
        # gets a contiguous input like every other block (one compiled graph, no copies in the fused ops)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:  # unlabelled call on a conditional model: the null class
                y = torch.full((x.shape[0],), cfg.num_classes, dtype=torch.long, device=x.device)
            c = c + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(self, x, t, y, cfg_scale: float, cond=None, guided: torch.Tensor | None = None) -> torch.Tensor:
        """Classifier-free guidance in one batch: v = v_u + s·(v_c − v_u), one network evaluation. The unconditional
        half has the null label and the null condition (each trained by dropout). `guided` (B,) bool: only those
        rows are guided, the others are v_c (a guidance interval when each row has its own time)."""
        by_label = self.y_embedder is not None and y is not None
        by_cond = self.config.condition != "none" and cond is not None
        if cfg_scale == 1.0 or not (by_label or by_cond):
            return self(x, t, y, cond)
        rows = slice(None) if guided is None else guided.nonzero()[:, 0]
        n = x.shape[0]
        y2 = None if y is None else torch.cat([y, torch.full_like(y[rows], self.config.num_classes) if by_label else y[rows]])
        c2 = None if cond is None else torch.cat([cond, null_condition(self.config.condition, cond[rows]) if by_cond else cond[rows]])
        both = self(torch.cat([x, x[rows]]), torch.cat([t, t[rows]]), y2, c2)
        v_c, v_u = both[:n], both[n:]  # slices, not chunk(2): keeps the batch symbolic for export
        if guided is None:
            return v_u + cfg_scale * (v_c - v_u)
        return v_c.index_copy(0, rows, v_u + cfg_scale * (v_c[rows] - v_u))

    def save_pretrained(self, folder: str, meta: dict | None = None, state_dict: dict | None = None):
        """Write `config.json` + `model.safetensors` (diffusers' habit); `meta` carries e.g. the AE path."""
        from safetensors.torch import save_file

        from lfm_fast import __version__

        sd = {k: v.detach().cpu().contiguous() for k, v in (state_dict or self.state_dict()).items()}
        model = {k: v for k, v in asdict(self.config).items() if k not in RUNTIME_FIELDS}
        config = {"_class_name": "DiT", "_lfm_fast_version": __version__, "model": model, "meta": meta or {}}
        with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
            save_file(sd, tmp)
        write_json(os.path.join(folder, "config.json"), config)

    @classmethod
    def from_pretrained(cls, folder: str, **overrides) -> "DiT":
        from safetensors.torch import load_file

        config = read_checkpoint_config(folder)
        known = {f.name for f in fields(DiTConfig)}
        cfg = DiTConfig(**{**{k: v for k, v in saved_model_config(config["model"]).items() if k in known}, **overrides})
        try:
            validate_section("model", cfg)
        except InputError as e:
            raise InputError(f"checkpoint {folder}: config.json: {e}") from None
        try:
            state = load_file(os.path.join(folder, "model.safetensors"))
        except Exception as e:  # safetensors raises its own error type for truncated or foreign files
            raise InputError(f"checkpoint {folder}: cannot read model.safetensors ({str(e).splitlines()[0]})") from None
        try:
            return cls.from_state_dict(cfg, state)
        except (ValueError, RuntimeError) as e:  # RuntimeError: load_state_dict's size mismatches
            first = next((line.strip() for line in str(e).splitlines() if "size mismatch" in line), str(e).splitlines()[0])
            raise InputError(f"checkpoint {folder}: model.safetensors does not match its config.json ({first})") from None

    @classmethod
    def from_state_dict(cls, cfg: DiTConfig, state: dict[str, torch.Tensor]) -> "DiT":
        """A DiT holding `state` (built on the meta device: no time spent on an init that is overwritten). A state
        without `pos_embed` (EMA weights, checkpoints written before 0.2) gets the config's fixed table."""
        with torch.device("meta"):
            model = cls(cfg)
        if "pos_embed" not in state:
            state = {**state, "pos_embed": model.fixed_pos_embed().to(next(iter(state.values())).device)}
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            names = ", ".join([f"no {n}" for n in missing[:2]] + [f"unexpected {n}" for n in unexpected[:2]])
            raise ValueError(f"missing {len(missing)}, unexpected {len(unexpected)} tensors: {names}")
        return model


def _check_condition(cfg: DiTConfig) -> None:
    if cfg.condition not in CONDITIONS:
        raise InputError(f"DiT config: condition {cfg.condition!r}: expected one of {', '.join(CONDITIONS)}")
    want = {"none": 0, "inpaint": cfg.in_channels + 1}.get(cfg.condition, cfg.cond_channels)
    if cfg.cond_channels != want or (cfg.condition == "semantic" and (cfg.cond_channels < 1 or cfg.semantic_classes < 1)):
        raise InputError(f"DiT config: condition {cfg.condition!r} with cond_channels={cfg.cond_channels}, semantic_classes="
                         f"{cfg.semantic_classes}: expected cond_channels={want if cfg.condition != 'semantic' else '≥ 1'}"
                         f"{' and semantic_classes ≥ 1' if cfg.condition == 'semantic' else ''}")


def clean_fqn(name: str) -> str:
    """A parameter's name in the plain model, without the prefixes that activation checkpointing and
    torch.compile wrappers insert."""
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _init_value(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The initial value of parameter `name` (DiT's rules), drawn from a generator seeded by (seed, name)."""
    if name.endswith("bias") or "adaLN_modulation" in name or name.startswith("final_layer.linear"):
        return torch.zeros(shape)
    if name.endswith(("q_norm.weight", "k_norm.weight")):
        return torch.ones(shape)
    g = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0]))
    if "embedding_table" in name or name.startswith("t_embedder.mlp"):
        return torch.randn(shape, generator=g) * 0.02
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    return torch.rand(shape, generator=g) * (2 * bound) - bound


def assign_full(p: torch.Tensor, full: torch.Tensor) -> None:
    """p ← full, where p may be a shard (a DTensor, e.g. under FSDP2): each rank writes its own slice."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(p.device, p.dtype)
    if isinstance(p, DTensor):  # src_data_rank=None: every rank slices its own shard, no communication
        p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
    else:
        p.copy_(full)


def set_backends(model: DiT, attn: str | None = None, norm: str | None = None) -> DiT:
    """Switch the fused-op backends of a built model in place (config and modules alike)."""
    if attn is not None:
        model.config.attn_backend = ops.check_backend(attn, ops.ATTENTION_BACKENDS, "attention")
    if norm is not None:
        model.config.norm_backend = ops.check_backend(norm, ops.NORM_BACKENDS, "norm")
    for m in model.modules():
        if isinstance(m, Attention):
            m.backend = model.config.attn_backend
        elif isinstance(m, (DiTBlock, FinalLayer)):
            m.backend = model.config.norm_backend
    return model


def read_checkpoint_config(folder: str) -> dict:
    """config.json of an inference checkpoint, with a one-line error when the folder is not one."""
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise InputError(f"checkpoint {folder}: no such folder")
    if not (os.path.isfile(path) and os.path.isfile(os.path.join(folder, "model.safetensors"))):
        inner = next((os.path.join(folder, n) for n in ("dit", "model") if os.path.isfile(os.path.join(folder, n, "config.json"))), None)
        hint = f"; the checkpoint of this run is {inner}" if inner else ""
        raise InputError(f"checkpoint {folder}: expected config.json and model.safetensors (a folder written by `lfm-fast "
                         f"train`){hint}")
    try:
        with open(path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"checkpoint {folder}: config.json is not valid JSON ({e})") from None
    if config.get("_class_name") != "DiT" or "model" not in config:
        raise InputError(f"checkpoint {folder}: config.json is not an lfm-fast DiT config")
    return config
