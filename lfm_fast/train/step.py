"""One training step's arithmetic, apart from the loop that runs it (`loop.Trainer`): the learning-rate schedule,
the data order, the step's micro-batches with their flow draws and augmentation, and the optimizer step (forward
and backward, clipping, AdamW, the EMA) with its count of non-finite steps.

The global batch of step s is samples [position, position + batch) of a seeded permutation per epoch;
rank r takes the r-th contiguous part and splits it into micro-batches. Noise, times and label drops
are drawn for the whole global batch from a generator seeded by (seed, s) and sliced, so what a sample
sees does not depend on the world size or the accumulation steps, and a resumed run (the data position
is in the checkpoint) repeats nothing and skips nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from lfm_fast.config import ExperimentConfig
from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.dist import to_device
from lfm_fast.errors import InputError, RunError
from lfm_fast.flow import FlowDraws, draw_flow, flow_matching_loss
from lfm_fast.train.checkpoint import latest_checkpoint
from lfm_fast.train.ema import ema_decay_at, update_ema


def lr_lambda(cfg, num_samples: int) -> callable:
    """The lr multiplier of each step: linear warm-up, then constant, or a cosine from 1 to lr_min / lr — over
    the steps ("cosine"), or LFM's CosineAnnealingLR stepped once per epoch of `num_samples` ("cosine_epoch": the
    multiplier of step s is that of epoch ⌊s·batch / num_samples⌋, period lr_period_epochs).

    Closed forms for torch's LambdaLR, checked against the libraries in tests/test_prepare.py: "cosine_epoch" is
    CosineAnnealingLR stepped per epoch (LFM's code), "cosine" diffusers' get_cosine_schedule_with_warmup with
    a floor. Kept by hand because torch's CosineAnnealingLR is recursive (a resume with another lr or length would
    drift from the closed form) and diffusers' has no floor and spends its first step at lr 0."""
    if cfg.lr_schedule not in ("constant", "cosine", "cosine_epoch"):
        raise InputError(f"train.lr_schedule {cfg.lr_schedule!r}: expected 'constant', 'cosine' or 'cosine_epoch'")
    floor = cfg.lr_min / cfg.lr
    period = cfg.lr_period_epochs or max(1, math.ceil(cfg.steps * cfg.batch_size / num_samples))

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "cosine":
            progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        elif cfg.lr_schedule == "cosine_epoch":
            progress = (step * cfg.batch_size // num_samples) / period
        else:
            return 1.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
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
    """The latent shape comes from the data; so does the class count where the preset says -1 (small-data),
    and otherwise it must agree with the data's."""
    c, h, w = ds.latent_shape
    if h != w:
        raise InputError(f"latents: expected square latents, got {h}×{w}")
    cfg.model.in_channels, cfg.model.input_size = c, h
    kind = cfg.model.condition
    if kind != "none" and kind not in ds.conditions:
        how = "prepare them with --inpaint-masks K" if kind == "inpaint" else "prepare data that has semantic maps (shapes, celebamask:PATH)"
        raise InputError(f"model.condition={kind}: the latents in {ds.folder} carry no {kind} conditions; {how}")
    if kind == "inpaint":
        cfg.model.cond_channels = c + 1
    if kind == "semantic":
        stages = math.log2(ds.meta["image_size"] / h)
        if stages != int(stages):
            raise InputError(f"model.condition=semantic: image size {ds.meta['image_size']} is not latent size {h} × 2^k")
        cfg.model.semantic_classes, cfg.model.cond_stages = int(ds.meta["semantic_classes"]), int(stages)
    needs = {"flip"} if cfg.data.flip else set()
    needs |= {"posterior"} if cfg.data.posterior == "sample" else set()
    if needs - ds.augmentations:
        what = {"flip": "mirror-image latents (data.flip=true)", "posterior": "posterior std (data.posterior=sample)"}
        raise InputError(f"latents {ds.folder}: no {' and no '.join(what[n] for n in sorted(needs - ds.augmentations))}; "
                         f"prepare them again (`lfm-fast prepare` stores both; --no-flip leaves out the mirror images), "
                         f"or set {' '.join('data.flip=false' if n == 'flip' else 'data.posterior=mean' for n in sorted(needs - ds.augmentations))}")
    if cfg.model.num_classes < 0:
        cfg.model.num_classes = ds.num_classes
    if cfg.model.num_classes and cfg.model.num_classes != ds.num_classes:
        raise InputError(f"model.num_classes={cfg.model.num_classes} but the latents have {ds.num_classes} classes; "
                         f"set model.num_classes={ds.num_classes} (or 0 for unconditional)")


def draw_augmentation(batch: int, latent_shape, data, generator: torch.Generator):
    """A step's augmentation for the whole global batch (sliced per rank, as the flow draws are): flips (B,) bool
    with probability 1/2 where data.flip, and the posterior's ε (B, C, H, W) where data.posterior is "sample"."""
    flips = torch.rand(batch, generator=generator).numpy() < 0.5 if data.flip else None
    eps = torch.randn((batch, *latent_shape), generator=generator) if data.posterior == "sample" else None
    return flips, eps


def micro_batch_size(tc, world_size: int) -> int:
    per = world_size * tc.grad_accum
    if tc.grad_accum < 1 or tc.batch_size % per:
        raise InputError(f"train.batch_size={tc.batch_size} must be divisible by world size {world_size} × "
                         f"train.grad_accum={tc.grad_accum}")
    return tc.batch_size // per


def make_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not biases, norms or embeddings)."""
    decay, other = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "embedding" not in n else other).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay}, {"params": other, "weight_decay": 0.0}],
                             lr=tc.lr, betas=(0.9, 0.999), fused=True)


@dataclass
class MicroBatch:
    """One micro-batch of a step on the training device: latents, labels (None for an unconditional model), the
    condition (None without one) and the flow's draws for these rows."""
    x0: torch.Tensor
    y: torch.Tensor | None
    cond: torch.Tensor | None
    draws: FlowDraws


def micro_batches(ds: LatentShardDataset, cfg: ExperimentConfig, step: int, indices: list[int], lo_rank: int, micro: int,
                  device) -> list[MicroBatch]:
    """This rank's micro-batches of step `step`, whose global batch is the samples `indices`: the noise, times and
    drops, the mask picks and the augmentation are drawn for the whole global batch from (seed, step) generators and
    sliced, then everything goes to `device` without blocking (`to_device`)."""
    tc, condition = cfg.train, cfg.model.condition
    draws = draw_flow(tc.batch_size, ds.latent_shape, cfg.flow, step_generator(tc.seed, 0, step), tc.label_dropout,
                      tc.cond_dropout if condition != "none" else 0.0)
    picks = (torch.randint(ds.meta["inpaint_masks"], (tc.batch_size,), generator=step_generator(tc.seed, 2, step))
             if condition == "inpaint" else None)  # which of each sample's stored masks this step uses
    flips, eps = draw_augmentation(tc.batch_size, ds.latent_shape, cfg.data, step_generator(tc.seed, 3, step))
    out = []
    for k in range(tc.grad_accum):
        lo = lo_rank + k * micro
        rows = slice(lo, lo + micro)
        x0, y = ds.get_batch(indices[rows], None if flips is None else flips[rows], None if eps is None else eps[rows])
        cond = None if condition == "none" else ds.get_condition(
            indices[rows], condition, None if picks is None else picks[rows], None if flips is None else flips[rows])
        out.append(MicroBatch(to_device(x0, device), to_device(y, device) if cfg.model.num_classes else None,
                              to_device(cond, device), draws.rows(lo, micro).to(device)))
    return out


def optimizer_step(model, optimizer, ema: dict, batches: list[MicroBatch], cfg: ExperimentConfig, step: int,
                   health: "NonfiniteSteps", poison: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, queued on the device with no host sync: forward and backward of each micro-batch,
    gradient clipping, AdamW and the EMA. Where the loss or the gradient is not finite, the update is skipped on the
    device: fused AdamW's `found_inf` leaves weights and moments as they were, and the EMA's weight is 0 (what
    `GradScaler` does for fp16). `poison` makes the loss NaN (the tests' fault injection). Returns (the step's loss,
    the gradient norm), both still on the device."""
    tc = cfg.train
    step_loss = torch.zeros((), dtype=torch.float64, device=batches[0].x0.device)  # summed on the device
    for k, b in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2-wrapped: reduce the gradients on the last one
            model.set_requires_gradient_sync(k == len(batches) - 1)
        loss = flow_matching_loss(model, b.x0, b.y, cfg.flow, label_dropout=tc.label_dropout, cond=b.cond, draws=b.draws,
                                  cond_dropout=tc.cond_dropout)
        if poison:
            loss = loss * float("nan")
        (loss / len(batches)).backward()
        step_loss += loss.detach().double() / len(batches)
    grad_norm = _full(torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
    finite = torch.isfinite(grad_norm)  # a NaN or inf loss shows here too, the same on every rank
    optimizer.found_inf = (~finite).float()  # read by the fused AdamW kernel: 1 skips the update
    optimizer.step()
    update_ema(ema, model, finite.float() * (1.0 - ema_decay_at(step, tc.ema_decay)))
    optimizer.zero_grad(set_to_none=True)
    health.count(finite, step + 1)
    return step_loss, grad_norm


class NonfiniteSteps:
    """Steps with a non-finite loss or gradient, counted on the device (reading a flag each step would stall it), and
    the step at which `limit` of them had come in a row; `check` reads it (at logging, saving and the end)."""

    def __init__(self, device, total: int, limit: int, out: str = ""):
        self.limit, self.out = limit, out
        self.total, self.run, self.stop_at = (torch.full((), v, dtype=torch.int64, device=device) for v in (total, 0, 0))

    def count(self, finite: torch.Tensor, step: int) -> None:
        bad = (~finite).long()
        self.total += bad
        self.run = (self.run + bad) * bad
        self.stop_at = torch.where((self.run >= self.limit) & (self.stop_at == 0), step, self.stop_at)

    def total_steps(self) -> int:
        return int(self.total)

    def check(self) -> None:
        at = int(self.stop_at)
        if at:
            then = (f"--resume from the last checkpoint in {self.out}" if latest_checkpoint(self.out)
                    else "start again (no checkpoint was written yet)")
            raise RunError(f"step {at}: {self.limit} steps in a row had a non-finite loss or gradient "
                           f"(train.max_nonfinite_steps={self.limit}); stopped. Lower train.lr, or {then}")


def all_finite(tensors) -> bool:
    """Whether every value of `tensors` (parameters or their local shards) is finite: one read of the device."""
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t).all() for t in local]).all()) if local else True


def interval_means(losses: list[torch.Tensor], grad_norm: torch.Tensor, health: NonfiniteSteps) -> tuple[float, float, int]:
    """(mean loss of the interval's finite steps, the last gradient norm, non-finite steps so far): one read."""
    loss = torch.stack(losses)
    finite = torch.isfinite(loss)
    mean = torch.where(finite, loss, 0).sum() / finite.sum()  # NaN where no step was finite
    values = torch.stack([mean, grad_norm.double(), health.total.double()]).tolist()
    return values[0], values[1], int(values[2])


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t
