"""Typed experiment configs and the one registry of named presets (EDM2's `config_presets` habit).

`lfm-fast train --preset celebahq256-dit-l2 train.lr=1e-4 model.qk_norm=true` starts from a preset
and applies `section.field=value` overrides (a bare `field=value` works when the name is unique).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field

from lfm_fast.errors import InputError
from lfm_fast.flow import FlowConfig
from lfm_fast.models.dit import DiTConfig, arch_config
from lfm_fast.sampling import SampleConfig

ModelConfig = DiTConfig

SD_VAE = "stabilityai/sd-vae-ft-mse"  # LFM's autoencoder; latents scaled by 0.18215


@dataclass
class DataConfig:
    dataset: str = "shapes"  # "shapes" (procedural, embedded) or a path to an image folder
    image_size: int = 32
    num_images: int = 6000  # shapes only
    autoencoder: str = ""  # a local diffusers AutoencoderKL folder or a hub id (used by `prepare`)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64  # global batch = per-rank micro-batch × world size × grad_accum
    grad_accum: int = 1
    lr: float = 1e-4
    lr_schedule: str = "constant"  # or "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    label_dropout: float = 0.1  # CFG training; ignored for unconditional models
    precision: str = "bf16"  # "bf16": FSDP2 mixed precision (bf16 compute, fp32 weights and gradient reduction) or "fp32"
    activation_checkpointing: str = "none"  # "none", "full" or "selective:N" (every N-th block)
    compile: bool = False  # torch.compile each DiT block
    seed: int = 0
    log_every: int = 10
    sample_every: int = 0  # 0 = only at the end
    ckpt_every: int = 500


@dataclass
class ExperimentConfig:
    name: str = "custom"
    model: DiTConfig = field(default_factory=DiTConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def _paper_preset(name, arch, dataset_hint, train, model_kw=None, sample=None):
    # 256×256 images through SD-VAE (f=8) → 4×32×32 latents, as in LFM.
    return ExperimentConfig(
        name=name,
        model=DiTConfig(**arch_config(arch), input_size=32, in_channels=4, **(model_kw or {})),
        data=DataConfig(dataset=dataset_hint, image_size=256, autoencoder=SD_VAE),
        train=train,
        sample=sample or SampleConfig(solver="dopri5"),
    )


PRESETS: dict[str, ExperimentConfig] = {
    # The small-data recipe (the demo's): any small labelled image set (`shapes`, or a folder of class sub-folders)
    # through a small AE; the latent shape and the class count come from the latents (num_classes=-1).
    "small-data": ExperimentConfig(
        name="small-data",
        model=DiTConfig(input_size=8, in_channels=4, patch_size=2, hidden_size=128, depth=4, num_heads=4, num_classes=-1),
        # logit-normal times (SD3) gave 0.97 vs 0.91 class accuracy over uniform at this budget
        flow=FlowConfig(time_sampling="logit_normal"),
        data=DataConfig(dataset="shapes", image_size=32, num_images=6000, autoencoder="builtin:shapes"),
        # batch 64 for 3,500 steps beat batch 128 for 2,000 in about the same time (shape accuracy, demo ablation)
        train=TrainConfig(steps=2800, batch_size=64, lr=1e-3, warmup_steps=100, lr_schedule="cosine",
                          ema_decay=0.99, label_dropout=0.1, log_every=25, ckpt_every=500,
                          precision="fp32"),  # at this width bf16 autocast is slower on CPU (cast overhead > GEMM gain)
        sample=SampleConfig(solver="heun", steps=16, cfg=2.0),
    ),
    # The seed experiments with the LFM code's hyperparameters (image folders supplied by the user).
    "celebahq256-dit-l2": _paper_preset("celebahq256-dit-l2", "DiT-L/2", "data/celeba_hq_256",
                                        TrainConfig(steps=500_000, batch_size=32, lr=2e-4, ema_decay=0.9999, label_dropout=0.0)),
    "ffhq256-dit-l2": _paper_preset("ffhq256-dit-l2", "DiT-L/2", "data/ffhq_256",
                                    TrainConfig(steps=500_000, batch_size=32, lr=2e-4, lr_schedule="cosine", ema_decay=0.9999, label_dropout=0.0)),
    "church256-dit-l2": _paper_preset("church256-dit-l2", "DiT-L/2", "data/lsun_church",
                                      TrainConfig(steps=500_000, batch_size=96, lr=1e-4, ema_decay=0.9999, label_dropout=0.0)),
    "bedroom256-dit-l2": _paper_preset("bedroom256-dit-l2", "DiT-L/2", "data/lsun_bedroom",
                                       TrainConfig(steps=500_000, batch_size=32, lr=1e-4, ema_decay=0.9999, label_dropout=0.0)),
    "imagenet256-dit-b2": _paper_preset("imagenet256-dit-b2", "DiT-B/2", "data/imagenet/train",
                                        TrainConfig(steps=400_000, batch_size=1280, lr=1e-4, ema_decay=0.9999, label_dropout=0.1),
                                        model_kw=dict(num_classes=1000), sample=SampleConfig(solver="dopri5", cfg=1.5)),
}


def get_preset(name: str) -> ExperimentConfig:
    if name not in PRESETS:
        raise InputError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
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
            why = "is ambiguous; prefix its section" if owners else "names no config field"
            raise InputError(f"override {item!r}: {key!r} {why} (sections: {', '.join(sections)})")
        current = getattr(owners[0], name)
        try:
            setattr(owners[0], name, _parse_value(text, current))
        except ValueError:
            raise InputError(f"override {item!r}: expected a {type(current).__name__} for {key}") from None
    return cfg


def to_dict(cfg: ExperimentConfig) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(d: dict) -> ExperimentConfig:
    return ExperimentConfig(name=d.get("name", "custom"), model=DiTConfig(**d["model"]), flow=FlowConfig(**d["flow"]),
                            data=DataConfig(**d["data"]), train=TrainConfig(**d["train"]), sample=SampleConfig(**d["sample"]))
