"""The checks every config section passes wherever it comes from (a preset, an override, a checkpoint's
config.json, a pipeline call): field types, names from a fixed set, numbers in range. Torch-free, and below the
modules that own the sections (models.dit, sampling, config), which all call it.
"""

from __future__ import annotations

import dataclasses
import math

from lfm_fast.choices import ATTENTION_BACKENDS, CONDITIONS, GRIDS, NORM_BACKENDS, SOLVERS
from lfm_fast.errors import InputError

# (section, field) → the names it may take
CHOICES = {("flow", "time_sampling"): ("uniform", "logit_normal"), ("train", "precision"): ("bf16", "fp32"),
           ("train", "lr_schedule"): ("constant", "cosine", "cosine_epoch"), ("data", "posterior"): ("sample", "mean"),
           ("train", "async_checkpoint"): ("auto", "true", "false"), ("sample", "solver"): SOLVERS, ("sample", "grid"): GRIDS,
           ("model", "attn_backend"): ATTENTION_BACKENDS, ("model", "norm_backend"): NORM_BACKENDS,
           ("model", "condition"): CONDITIONS, ("model", "pos_embed"): ("mae", "rows")}

POSITIVE = {"model": ("input_size", "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio"),
            "flow": ("logit_std",), "data": ("image_size", "num_images"),
            "train": ("steps", "batch_size", "grad_accum", "lr", "log_every", "max_nonfinite_steps", "keep_checkpoints"),
            "sample": ("steps", "shift", "atol", "rtol")}
NON_NEGATIVE = {"model": ("cond_channels", "semantic_classes", "cond_stages"), "flow": ("sigma_min",),
                "train": ("warmup_steps", "lr_min", "lr_period_epochs", "weight_decay", "grad_clip", "label_dropout", "cond_dropout", "ema_decay", "ckpt_every",
                          "ckpt_every_minutes", "sample_every"),
                "sample": ("cfg",)}
LOGS = ("jsonl", "tensorboard", "wandb")
BELOW_ONE = {("flow", "sigma_min"), ("train", "label_dropout"), ("train", "cond_dropout"), ("train", "ema_decay")}


def validate_section(section: str, obj) -> None:
    """One config section (`model`, `flow`, `data`, `train`, `sample`): field types, names from a fixed set,
    numbers in range. Raises InputError naming the field."""
    kinds = {int: (int,), float: (int, float), bool: (bool,), str: (str,)}
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), {"int": int, "float": float, "bool": bool, "str": str}.get(str(f.type), f.type)
        if kind in kinds and (not isinstance(value, kinds[kind]) or (kind is not bool and isinstance(value, bool))):
            raise InputError(f"{section}.{f.name}={value!r}: expected {'an' if kind is int else 'a'} {kind.__name__}")
        if kind is float and not math.isfinite(value):
            raise InputError(f"{section}.{f.name}={value!r}: expected a finite number")
    for (sec, name), allowed in CHOICES.items():
        if sec == section and getattr(obj, name) not in allowed:
            raise InputError(f"{section}.{name}={getattr(obj, name)!r}: expected one of {', '.join(allowed)}")
    for table, positive in ((POSITIVE, True), (NON_NEGATIVE, False)):
        for name in table.get(section, ()):
            value = getattr(obj, name)
            if value < 0 or (positive and value == 0) or ((section, name) in BELOW_ONE and value >= 1):
                want = "number in [0, 1)" if (section, name) in BELOW_ONE else "positive number" if positive else "non-negative number"
                raise InputError(f"{section}.{name}={value!r}: expected a {want}")


def parse_ac(mode: str) -> int:
    """train.activation_checkpointing: 'none' → 0, 'full' → 1 (every block), 'selective:N' → N (every N-th block)."""
    if mode == "none":
        return 0
    if mode == "full":
        return 1
    if mode.startswith("selective:") and mode.split(":", 1)[1].isdigit() and int(mode.split(":", 1)[1]) >= 1:
        return int(mode.split(":", 1)[1])
    raise InputError(f"train.activation_checkpointing {mode!r}: expected 'none', 'full' or 'selective:N' (every N-th block)")
