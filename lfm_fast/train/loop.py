"""Single-process training of the DiT velocity net on cached latents.

Everything random in step s (batch indices, noise, times, label dropout) comes from generators
seeded by (seed, s) or (seed, epoch), so the data position is implied by the step and a resumed run
is bit-identical to an uninterrupted one on the same backend.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings

import numpy as np
import torch
from tqdm.auto import tqdm

from lfm_fast import default_device
from lfm_fast.config import ExperimentConfig, to_dict
from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.errors import InputError
from lfm_fast.fileio import image_grid, portable_path, save_png
from lfm_fast.flow import flow_matching_loss
from lfm_fast.models.dit import DiT
from lfm_fast.sampling import FIXED_SOLVERS, SampleConfig
from lfm_fast.train.checkpoint import CHECKPOINT_NAME, load_training_state, save_training_state
from lfm_fast.train.ema import create_ema, ema_decay_at, update_ema


def lr_lambda(cfg) -> callable:
    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return 1.0
    if cfg.lr_schedule not in ("constant", "cosine"):
        raise InputError(f"train.lr_schedule {cfg.lr_schedule!r}: expected 'constant' or 'cosine'")
    return f


def step_generator(seed: int, *key: int) -> torch.Generator:
    """A CPU generator for one (seed, key…) pair: independent streams without shared state to save."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *key]).generate_state(1)[0]))


class EpochSampler:
    """Global sample offset → dataset index through a seeded permutation per epoch."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for off in range(start, start + count):
            epoch, pos = divmod(off, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, torch.randperm(self.n, generator=step_generator(self.seed, 1, epoch))
            out.append(int(self._perm[pos]))
        return out


def configure_model_for_data(cfg: ExperimentConfig, ds: LatentShardDataset) -> None:
    """The latent shape comes from the data; the class count must agree with it."""
    c, h, w = ds.latent_shape
    if h != w:
        raise InputError(f"latents: expected square latents, got {h}×{w}")
    cfg.model.in_channels, cfg.model.input_size = c, h
    if cfg.model.num_classes and cfg.model.num_classes != ds.num_classes:
        raise InputError(f"model.num_classes={cfg.model.num_classes} but the latents have {ds.num_classes} classes; "
                         f"set model.num_classes={ds.num_classes} (or 0 for unconditional)")


def preview_config(cfg: SampleConfig) -> SampleConfig:
    """Previews use the configured fixed-step solver, or 16 Heun steps where an adaptive one is configured."""
    if cfg.solver in FIXED_SOLVERS:
        return cfg
    return SampleConfig(solver="heun", steps=16, cfg=cfg.cfg)


def train(cfg: ExperimentConfig, latents: str, out: str, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, device: str | None = None) -> dict:
    """Train; returns a summary. `stop_at` ends the run early at that step (as a preempted job would)."""
    from lfm_fast.generate import generate_latents, latents_to_images

    tc = cfg.train
    ds = LatentShardDataset(latents)
    configure_model_for_data(cfg, ds)
    if tc.precision not in ("bf16", "fp32"):
        raise InputError(f"train.precision {tc.precision!r}: expected 'bf16' or 'fp32'")
    if resume and not os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        raise InputError(f"--resume: no {CHECKPOINT_NAME} in {out}")
    if not resume and os.path.exists(os.path.join(out, CHECKPOINT_NAME)):
        raise InputError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    os.makedirs(out, exist_ok=True)

    device = torch.device(device or default_device())
    torch.manual_seed(tc.seed)
    model = DiT(cfg.model).to(device)
    ema = create_ema(model)
    decay_params = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    other_params = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay_params, "weight_decay": tc.weight_decay},
                                   {"params": other_params, "weight_decay": 0.0}], lr=tc.lr, betas=(0.9, 0.999))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(tc))
    step = load_training_state(out, model, ema, optimizer, scheduler) if resume else 0

    meta = {"experiment": to_dict(cfg), "latents": portable_path(latents, out), "autoencoder": portable_path(ds.autoencoder, out),
            "scaling_factor": ds.meta.get("scaling_factor"), "class_names": ds.meta.get("class_names", [])}
    metrics_path = os.path.join(out, "metrics.jsonl")
    _truncate_metrics(metrics_path, step)

    ae = _load_preview_autoencoder(ds.autoencoder)
    num_preview = max(8, min(64, 8 * max(1, cfg.model.num_classes)))
    preview_labels = torch.arange(num_preview) % cfg.model.num_classes if cfg.model.num_classes else None

    def write_preview(name: str):
        if ae is None:
            return
        lat, _ = generate_latents(ema, preview_labels, list(range(num_preview)), preview_config(cfg.sample), progress=False)
        images = latents_to_images(ae, lat)
        save_png(os.path.join(out, name), image_grid(images, nrow=8), upscale=max(1, 64 // images.shape[1]))

    sampler = EpochSampler(len(ds), tc.seed)
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=tc.precision == "bf16")
    model.train()
    bar = tqdm(total=tc.steps, initial=step, desc="train", disable=not progress, mininterval=1)
    losses, t_log, last = [], time.time(), {}
    with open(metrics_path, "a") as metrics:
        while step < end:
            x0, y = ds.get_batch(sampler.indices(step * tc.batch_size, tc.batch_size))
            x0, y = x0.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast:
                loss = flow_matching_loss(model, x0, y if cfg.model.num_classes else None, cfg.flow,
                                          step_generator(tc.seed, 0, step), tc.label_dropout)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
            optimizer.step()
            scheduler.step()
            update_ema(ema, model, ema_decay_at(step, tc.ema_decay))
            step += 1
            losses.append(loss.item())
            bar.update(1)
            if step % tc.log_every == 0 or step == end:
                dt = time.time() - t_log
                last = {"step": step, "loss": sum(losses) / len(losses), "img_per_s": len(losses) * tc.batch_size / dt,
                        "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.0f}")
                losses, t_log = [], time.time()
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < end:
                save_training_state(out, step, model, ema, optimizer, scheduler, to_dict(cfg))
            if tc.sample_every and step % tc.sample_every == 0 and step < end:
                write_preview(f"samples_{step:06d}.png")
    bar.close()
    save_training_state(out, step, model, ema, optimizer, scheduler, to_dict(cfg))
    ema.save_pretrained(out, meta=meta)
    write_preview("samples.png")
    return {"step": step, "last": last}


def _truncate_metrics(path: str, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (the steps that are about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)


def _load_preview_autoencoder(spec: str):
    from lfm_fast.autoencoder import load_autoencoder

    if not spec:
        return None
    try:
        return load_autoencoder(spec)
    except InputError as e:
        warnings.warn(f"no sample grids: {e}")
        return None
