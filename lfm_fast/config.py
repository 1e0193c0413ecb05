"""Typed experiment configs and the one registry of named presets (EDM2's `config_presets` habit).

`lfm-fast train --preset celebahq256-dit-l2 train.lr=1e-4 model.qk_norm=true` starts from a preset
and applies `section.field=value` overrides (a bare `field=value` works when the name is unique).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from dataclasses import dataclass, field

from lfm_fast.errors import InputError
from lfm_fast.flow import FlowConfig
from lfm_fast.models.dit import DiTConfig, arch_config, saved_model_config
from lfm_fast.sampling import SampleConfig
from lfm_fast.validation import LOGS, parse_ac, validate_section

ModelConfig = DiTConfig

SD_VAE = "stabilityai/sd-vae-ft-mse"  # LFM's autoencoder; latents scaled by 0.18215


@dataclass
class DataConfig:
    dataset: str = "shapes"  # a data SPEC (`lfm-fast prepare --help`): shapes, an image folder, lmdb:PATH, celebamask:PATH
    image_size: int = 32
    num_images: int = 6000  # shapes only
    autoencoder: str = ""  # a local diffusers AutoencoderKL folder or a hub id (used by `prepare`)
    # the paper's augmentation, drawn per sample from the step's generator: a horizontal flip (the mirror image's
    # latent, which `prepare` stores) with probability 1/2, and z = mean + std·ε from the AE's posterior ("sample",
    # LFM's `latent_dist.sample()`) or its mean ("mean")
    flip: bool = True
    posterior: str = "sample"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch = per-rank micro-batch × world size × grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "cosine": per step over train.steps; "cosine_epoch": LFM's, once per epoch
    lr_min: float = 0.0  # where the cosine ends (LFM: eta_min 1e-5)
    lr_period_epochs: int = 0  # cosine_epoch's period T_max in epochs (LFM: --num_epoch); 0: the epochs train.steps spans
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_nonfinite_steps: int = 10  # a non-finite loss or gradient norm skips the update; this many in a row stop the run
    ema_decay: float = 0.9999
    label_dropout: float = 0.1  # CFG training; ignored for unconditional models
    cond_dropout: float = 0.1  # CFG on a condition (inpaint, semantic): rows trained with the null condition
    precision: str = "bf16"  # "bf16": FSDP2 mixed precision (bf16 compute, fp32 weights and gradient reduction) or "fp32"
    activation_checkpointing: str = "none"  # "none", "full" or "selective:N" (every N-th block)
    compile: bool = False  # torch.compile each DiT block
    seed: int = 0
    log_every: int = 10
    log: str = "jsonl"  # comma-separated: jsonl (metrics.jsonl, always), tensorboard (OUT/tensorboard), wandb (OUT/wandb, offline)
    sample_every: int = 0  # 0 = only at the end
    ckpt_every: int = 500  # steps between checkpoints (0: only at the end)
    ckpt_every_minutes: float = 0.0  # also checkpoint when this many minutes have passed since the last one (0: off)
    keep_checkpoints: int = 2  # the newest N are kept, older ones pruned
    async_checkpoint: str = "auto"  # "true": dcp.async_save (training goes on while shards are written); "auto": on CUDA
    save_checkpoints: bool = True  # false: no checkpoint and no final weights (benchmark runs)


@dataclass
class ExperimentConfig:
    name: str = "custom"
    model: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _paper_preset(name, arch, dataset, train, model_kw=None, sample=None, data_kw=None):
    """256×256 images through SD-VAE (f=8) → 4×32×32 latents, as in LFM; the LFM code's training rules unless the
    call says otherwise: AdamW (betas 0.9, 0.999; no weight decay), no gradient clipping, no warm-up, no EMA (its
    runs never pass --use_ema: the evaluated checkpoints are the raw weights, which ema_decay 0 keeps), flips and a
    posterior sample per batch, and dopri5 at atol = rtol = 1e-5 (`run_test.sh`). Deliberately ours: bf16 compute
    (FSDP2 mixed precision; LFM ran fp32 with TF32), and a run is counted in steps: LFM's epochs × its steps per
    epoch (⌊images / batch⌋: its loader drops the last partial batch, ours carries it into the next epoch)."""
    train = dataclasses.replace(TrainConfig(weight_decay=0.0, grad_clip=0.0, warmup_steps=0, ema_decay=0.0,
                                            label_dropout=0.0, cond_dropout=0.0, ckpt_every=5000), **train)
    return ExperimentConfig(
        name=name,
        model=DiTConfig(**arch_config(arch), input_size=32, in_channels=4, **(model_kw or {})),
        data=DataConfig(dataset=dataset, image_size=256, autoencoder=SD_VAE, **(data_kw or {})),
        train=train,
        sample=sample or SampleConfig(solver="dopri5", atol=1e-5, rtol=1e-5),
    )


# LFM's cosine: CosineAnnealingLR(T_max=--num_epoch, eta_min=1e-5) stepped once per epoch
_LFM_COSINE = dict(lr_schedule="cosine_epoch", lr_min=1e-5)

PRESETS: dict[str, ExperimentConfig] = {
    # The small-data recipe (the demo's): any small labelled image set (`shapes`, or a folder of class sub-folders)
    # through a small AE; the latent shape and the class count come from the latents (num_classes=-1).
    "small-data": ExperimentConfig(
        name="small-data",
        model=DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=-1,
                        time_scale=1.0),
        # logit-normal times (SD3) gave 0.97 vs 0.91 class accuracy over uniform at this budget
        flow=FlowConfig(time_sampling="logit_normal"),
        # flips and posterior samples measured on the demo (`lfm-fast demo`, seed 0): shape accuracy 0.796 against 0.794,
        # classifier FD 1.72 [1.29, 2.26] against 1.80 [1.47, 2.41]: no harm, no gain beyond the noise at this budget;
        # off, so that the demo's checkpoint (the one the NFE sweep and the calibrated grids were measured on) stays
        # the same bit for bit, and `prepare` for it encodes each image once
        data=DataConfig(dataset="shapes", image_size=32, num_images=6000, autoencoder="builtin:shapes", flip=False,
                        posterior="mean"),
        # demo ablation (shape accuracy of the colour-blind judge, CFG 3, ≈ 7 min of training): batch 32 × 6,400 steps
        # at lr 8e-3 0.79, 4e-3 0.79, 2e-3 0.76, 1e-3 0.66 (5,600 steps); batch 64 × 3,500 at 1e-3 0.57.
        train=TrainConfig(steps=6000, batch_size=32, lr=4e-3, warmup_steps=100, lr_schedule="cosine",
                          ema_decay=0.99, label_dropout=0.1, log_every=25, ckpt_every=500,
                          precision="fp32"),  # at this width bf16 autocast is slower on CPU (cast overhead > GEMM gain)
        sample=SampleConfig(solver="heun", steps=16, cfg=3.0),  # CFG 3 over 2: +0.025 shape accuracy, class accuracy ~1.0
    ),
    # The paper's experiments with the LFM code's recipes (VinAIResearch/LFM bash_scripts/run.sh, its args files and
    # train_flow_latent.py). Steps = the evaluated checkpoint's epoch (test_args EPOCH_ID) × steps per epoch.
    # CelebA-HQ 256 (LFM's LMDBDataset, 27,000 training images): batch 32 on 1 GPU, lr 2e-4; epoch 475 × 843 steps.
    # run.sh now says --no_lr_decay, but its older lines train 500 epochs with the cosine and resume at lr 1.00003e-5
    # (the cosine's end): model_475 was trained with the cosine.
    "celebahq256-dit-l2": _paper_preset("celebahq256-dit-l2", "DiT-L/2", "lmdb:data/celeba/celeba-lmdb",
                                        dict(steps=475 * 843, batch_size=32, lr=2e-4, lr_period_epochs=500, **_LFM_COSINE)),
    # FFHQ 256 (NVAE's LMDB, 63,000 training images): batch 32, lr 2e-4, cosine over 500 epochs; epoch 475 × 1,968.
    "ffhq256-dit-l2": _paper_preset("ffhq256-dit-l2", "DiT-L/2", "lmdb:data/ffhq/ffhq-lmdb",
                                    dict(steps=475 * 1968, batch_size=32, lr=2e-4, lr_period_epochs=500, **_LFM_COSINE)),
    # LSUN Church (the first 120,000 images of church_outdoor_train, LFM's Subset): batch 48 × 2 GPUs, lr 1e-4
    # constant; epoch 575 × 1,250 steps.
    "church256-dit-l2": _paper_preset("church256-dit-l2", "DiT-L/2", "lmdb:data/lsun/church_outdoor_train_lmdb?limit=120000",
                                      dict(steps=575 * 1250, batch_size=96, lr=1e-4)),
    # LSUN Bedroom (the first 120,000 of bedroom_train): batch 32, lr 1e-4 constant; epoch 550 × 3,750 steps.
    "bedroom256-dit-l2": _paper_preset("bedroom256-dit-l2", "DiT-L/2", "lmdb:data/lsun/bedroom_train_lmdb?limit=120000",
                                       dict(steps=550 * 3750, batch_size=32, lr=1e-4)),
    # ImageNet 256, class-conditional DiT-B/2: batch 160 × 8 GPUs, lr 1e-4 constant, label dropout 0.1, gradient
    # checkpointing; epoch 875 × 1,000 steps (1,281,167 images); sampled with CFG 1.5 (test_args/imnet_dit.txt).
    "imagenet256-dit-b2": _paper_preset("imagenet256-dit-b2", "DiT-B/2", "data/imagenet/train",
                                        dict(steps=875 * 1000, batch_size=1280, lr=1e-4, label_dropout=0.1,
                                             activation_checkpointing="full"),
                                        model_kw=dict(num_classes=1000),
                                        sample=SampleConfig(solver="dopri5", atol=1e-5, rtol=1e-5, cfg=1.5)),
    # DiT-XL/2 on ImageNet 256, DiT's own recipe (facebookresearch/DiT train.py; LFM has no XL run): global batch
    # 256, AdamW lr 1e-4 without weight decay, EMA 0.9999 every step, label dropout 0.1, 7M steps (DiT's FID 2.27
    # checkpoint), no clipping; sampled as LFM samples.
    "imagenet256-dit-xl2": _paper_preset("imagenet256-dit-xl2", "DiT-XL/2", "data/imagenet/train",
                                         dict(steps=7_000_000, batch_size=256, lr=1e-4, label_dropout=0.1, ema_decay=0.9999),
                                         model_kw=dict(num_classes=1000),
                                         sample=SampleConfig(solver="dopri5", atol=1e-5, rtol=1e-5, cfg=1.5)),
}


def _conditional(base: str, name: str, cfg_scale: float, train: dict | None = None, **model_kw) -> ExperimentConfig:
    """A preset of `base`'s recipe (with `train` changes) whose model takes a condition and no class label; CFG
    `cfg_scale` on the condition."""
    cfg = copy.deepcopy(PRESETS[base])
    cfg.name, cfg.model = name, dataclasses.replace(cfg.model, num_classes=0, **model_kw)
    cfg.train = dataclasses.replace(cfg.train, **(train or {}))
    cfg.sample = dataclasses.replace(cfg.sample, cfg=cfg_scale)
    return cfg


# Inpainting and semantic-map-to-image on any small image set (latents from `prepare --inpaint-masks K`, or with
# semantic maps): the small-data recipe; the condition's channel counts come from the latents. CFG measured on the
# task demos (`lfm-fast demo --task inpaint|semantic`, 6,000 steps, heun × 16): semantic mIoU 0.934 / 0.947 / 0.944
# at CFG 1 / 2 / 3.
PRESETS["shapes-inpaint"] = _conditional("small-data", "shapes-inpaint", 3.0, condition="inpaint")
PRESETS["shapes-semantic"] = _conditional("small-data", "shapes-semantic", 2.0, condition="semantic", cond_channels=4)
# LFM's downstream tasks on CelebA-HQ 256 (downstream_tasks/train_flow_latent_{inpainting,semantic_syn}.py: batch 64
# on each of 2 GPUs, AdamW lr 5e-5 without weight decay, the per-epoch cosine to 1e-5, no EMA, no flips, no condition
# dropout, a posterior sample of the image per batch). Deliberately ours: the net is the DiT-L/2 of LFM's CelebA-HQ
# experiment (LFM ran these tasks with its ADM U-Net), and inpainting reads K masks per image stored by
# `prepare --inpaint-masks K` (LFM drew a new MAT-protocol mask per batch). Inpainting: 500 epochs of LaMa's
# CelebA-HQ training split (24,183 images, 188 steps an epoch; LFM evaluates on its 2,993 validation images).
# Semantic synthesis: 175 epochs of CelebAMask-HQ images 0–26,999 (210 steps an epoch). CFG on a condition needs
# train.cond_dropout > 0 (LFM samples without guidance).
_CELEBA_TASK = dict(batch_size=128, lr=5e-5, **_LFM_COSINE)
PRESETS["celebahq256-inpaint"] = _conditional("celebahq256-dit-l2", "celebahq256-inpaint", 1.0,
                                              dict(_CELEBA_TASK, steps=500 * 188, lr_period_epochs=500), condition="inpaint")
PRESETS["celebahq256-inpaint"].data.dataset, PRESETS["celebahq256-inpaint"].data.flip = "data/celeba_hq_256/train", False
# CelebAMask-HQ: 19 classes (background + 18 parts) at 256 → 3 bilinear halvings to the 32×32 latent grid → 4 channels
# (LFM: --num_in_channels 8 = 4 latent + 4 rescaled map)
PRESETS["celebahq256-semantic"] = _conditional("celebahq256-dit-l2", "celebahq256-semantic", 1.0,
                                               dict(_CELEBA_TASK, steps=175 * 210, lr_period_epochs=175), condition="semantic",
                                               cond_channels=4, semantic_classes=19, cond_stages=3)
PRESETS["celebahq256-semantic"].data.flip = False
PRESETS["celebahq256-semantic"].data.dataset = "celebamask:data/CelebAMask-HQ"


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    """A whole config, checked when it is parsed (presets, overrides and config.json alike), not when first used."""
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            validate_section(f.name, getattr(cfg, f.name))
    if cfg.model.num_classes < -1:
        raise InputError(f"model.num_classes={cfg.model.num_classes}: expected a class count, 0 (unconditional) "
                         f"or -1 (from the data)")
    unknown = set(cfg.train.log.split(",")) - set(LOGS)
    if unknown:
        raise InputError(f"train.log={cfg.train.log!r}: expected a comma-separated list of {', '.join(LOGS)}")
    parse_ac(cfg.train.activation_checkpointing)
    return cfg


# What `--resume` may change: how the run proceeds, not what it is (its model, data, flow, global batch, seed).
RESUMABLE = {"train": {"steps", "lr", "lr_schedule", "lr_min", "lr_period_epochs", "warmup_steps", "weight_decay", "grad_clip", "max_nonfinite_steps",
                       "ema_decay", "grad_accum", "precision", "activation_checkpointing", "compile", "log_every",
                       "log", "sample_every", "ckpt_every", "ckpt_every_minutes", "keep_checkpoints", "async_checkpoint", "save_checkpoints"},
             "model": {"attn_backend", "norm_backend"},
             "sample": {f.name for f in dataclasses.fields(SampleConfig)}}


def resume_changes(saved: ExperimentConfig, cfg: ExperimentConfig) -> list[str]:
    """The fields `cfg` changes from a run's saved config, as 'train.lr 0.004 → 0.001'; InputError naming the field
    and both values where a change would make it another run."""
    if saved.name != cfg.name:
        raise InputError(f"--resume: the run was trained with preset {saved.name!r}, not {cfg.name!r}; drop --preset "
                         f"(the run's own config is used) or start a new run")
    changes = []
    for section in (f.name for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))):
        for f in dataclasses.fields(getattr(cfg, section)):
            old, new = getattr(getattr(saved, section), f.name), getattr(getattr(cfg, section), f.name)
            if old == new:
                continue
            if f.name not in RESUMABLE.get(section, ()):
                raise InputError(f"--resume: {section}.{f.name}={new!r} but the run was trained with {old!r}; a resumed "
                                 f"run keeps its model, data and batch: drop the override, or start a new run")
            changes.append(f"{section}.{f.name} {old!r} → {new!r}")
    return changes


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InputError(f"unknown preset {name!r}{hint}; expected one of {', '.join(PRESETS)}")
    return copy.deepcopy(PRESETS[name])


def _parse_value(text: str, current):
    if isinstance(current, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError
    return type(current)(text)


def _has_field(obj, name: str) -> bool:
    return name in {f.name for f in dataclasses.fields(obj)}


def apply_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    """Apply `section.field=value` (or unique `field=value`) strings, converting to the field's type."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if dataclasses.is_dataclass(getattr(cfg, f.name))}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise InputError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
        if "." in key:
            section, name = key.split(".", 1)
            owners = [sections[section]] if section in sections and _has_field(sections[section], name) else []
        else:
            name = key
            owners = [s for s in sections.values() if _has_field(s, name)]
        if len(owners) != 1:
            fields = [f"{s}.{f.name}" for s, obj in sections.items() for f in dataclasses.fields(obj)]
            close = difflib.get_close_matches(key, fields if "." in key else [f.split(".")[1] for f in fields], n=1)
            why = ("is ambiguous; prefix its section" if owners else "names no config field"
                   + (f" (did you mean {close[0]}?)" if close else ""))
            raise InputError(f"override {item!r}: {key!r} {why} (sections: {', '.join(sections)})")
        current = getattr(owners[0], name)
        try:
            setattr(owners[0], name, _parse_value(text, current))
        except ValueError:
            kind = type(current).__name__
            raise InputError(f"override {item!r}: expected {'an' if kind == 'int' else 'a'} {kind} for {key}") from None
    return validate(cfg)


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ExperimentConfig:
    try:
        cfg = ExperimentConfig(name=d.get("name", "custom"), model=DiTConfig(**saved_model_config(d["model"])), flow=FlowConfig(**d["flow"]),
                               data=DataConfig(**d["data"]), train=TrainConfig(**d["train"]), sample=SampleConfig(**d["sample"]))
    except (KeyError, TypeError) as e:
        raise InputError(f"config: {e}") from None
    return validate(cfg)
