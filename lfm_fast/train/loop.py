"""Training of the DiT velocity net on cached latents, on one process or many (torchrun + FSDP2), by one
code path: a single process is a world of one.

The global batch of step s is samples [position, position + batch) of a seeded permutation per epoch;
rank r takes the r-th contiguous part and splits it into micro-batches. Noise, times and label drops
are drawn for the whole global batch from a generator seeded by (seed, s) and sliced, so what a sample
sees does not depend on the world size or the accumulation steps, and a resumed run (the data position
is in the checkpoint) repeats nothing and skips nothing.
"""

from __future__ import annotations

import json
import math
import os
import resource
import secrets
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lfm_fast.choices import FIXED_SOLVERS
from lfm_fast.config import ExperimentConfig, from_dict, resume_changes, to_dict, validate
from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.dist import init_distributed, to_device
from lfm_fast.errors import InputError, RunError
from lfm_fast.faults import fault_active, fault_point
from lfm_fast.fileio import atomic_path, image_grid, portable_path, read_marker, save_png, umask_mode, write_marker
from lfm_fast.flow import FlowDraws, draw_flow, flow_matching_loss
from lfm_fast.models.dit import DiT
from lfm_fast.sampling import SampleConfig
from lfm_fast.train.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint, read_trainer_state
from lfm_fast.train.ema import create_ema, ema_decay_at, full_state, update_ema
from lfm_fast.train.parallelize import build_parallel_dit
from lfm_fast.train.throughput import peak_flops, train_flops_per_image
from lfm_fast.validation import parse_ac


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


def preview_config(cfg: SampleConfig) -> SampleConfig:
    """Previews use the configured fixed-step solver, or 16 Heun steps where an adaptive one is configured."""
    if cfg.solver in FIXED_SOLVERS:
        return cfg
    return SampleConfig(solver="heun", steps=16, cfg=cfg.cfg)


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


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def train(cfg: ExperimentConfig, latents: str, out: str, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, device: str | None = None) -> dict:
    """Train; returns a summary. `stop_at` ends the run early at that step (as a preempted job would).
    Under torchrun every rank calls this; only rank 0 writes logs, grids and the inference checkpoint."""
    validate(cfg)
    tc = cfg.train
    ds = LatentShardDataset(latents)
    configure_model_for_data(cfg, ds)
    if tc.precision not in ("bf16", "fp32"):
        raise InputError(f"train.precision {tc.precision!r}: expected 'bf16' or 'fp32'")
    parse_ac(tc.activation_checkpointing)
    schedule = lr_lambda(tc, len(ds))
    ckpt = latest_checkpoint(out)
    if resume and ckpt is None:
        raise InputError(f"--resume: no complete checkpoint in {out}/checkpoints")
    if not resume and ckpt is not None:
        raise InputError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
    changes = _check_resume(cfg, out, ckpt) if resume else _check_run_folder(out)
    d = init_distributed(device)
    micro = micro_batch_size(tc, d.world_size)

    model = build_parallel_dit(cfg.model, d.mesh, d.device, tc.precision, tc.activation_checkpointing, tc.compile, tc.seed)
    ema = create_ema(model)
    optimizer = make_optimizer(model, tc)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    step, position, nonfinite = 0, 0, 0
    if resume:
        trainer = load_checkpoint(ckpt, model, optimizer, ema)
        step, position, nonfinite = trainer["step"], trainer["data_position"], trainer.get("nonfinite_steps", 0)
        scheduler.load_state_dict(trainer["scheduler"])
        _apply_resumed_hyperparameters(optimizer, scheduler, tc, schedule)
        if d.is_main:
            print(f"lfm-fast: resuming {out} at step {step}{' with ' + '; '.join(changes) if changes else ''}", file=sys.stderr)
    health = NonfiniteSteps(d.device, nonfinite, tc.max_nonfinite_steps, out)
    saved_step = step  # the step of the newest checkpoint (none to write at step 0)
    checkpointer = Checkpointer(out, tc.keep_checkpoints, tc.async_checkpoint == "true" or
                                (tc.async_checkpoint == "auto" and d.device.type == "cuda"))

    meta = {"experiment": to_dict(cfg), "latents": portable_path(latents, out), "autoencoder": portable_path(ds.autoencoder, out),
            "scaling_factor": ds.meta.get("scaling_factor"), "class_names": ds.meta.get("class_names", [])}
    metrics_path = os.path.join(out, "metrics.jsonl")
    if d.is_main:  # everything is validated: the run folder appears only now
        os.makedirs(out, mode=umask_mode(), exist_ok=True)
        write_marker(out, "train")
        _truncate_metrics(metrics_path, step)

    board = EventLogs(tc.log.split(","), out, step, to_dict(cfg)) if d.is_main else None
    ae = _load_preview_autoencoder(ds.autoencoder) if d.is_main else None
    num_preview = max(8, min(64, 8 * max(1, cfg.model.num_classes)))
    preview_labels = torch.arange(num_preview) % cfg.model.num_classes if cfg.model.num_classes else None
    condition = cfg.model.condition
    # the conditional tasks draw one preview for each of the first samples' conditions
    preview_cond = None if condition == "none" else ds.get_condition(list(range(min(num_preview, len(ds)))), condition)
    paused = 0.0  # seconds of the current log interval spent in checkpoints and previews (not training)

    def ema_model() -> DiT | None:  # collective: gathers the EMA shards to rank 0 (None on the others)
        state = full_state(ema)
        return DiT.from_state_dict(cfg.model, state) if d.is_main else None

    def write_preview(name: str, net: DiT | None):  # net: the EMA model on rank 0
        nonlocal paused
        t0 = time.time()
        if ae is not None and d.is_main:
            images = draw_preview(net, ae, preview_labels, preview_cond, cfg.sample, d.device)
            grid = image_grid(images, nrow=8)
            save_png(os.path.join(out, name), grid, upscale=max(1, 64 // images.shape[1]))
            if board is not None:
                board.image("samples", grid, step)
        d.barrier()
        paused += time.time() - t0

    def checkpoint():
        nonlocal saved_step, t_ckpt, paused
        if step == saved_step or not tc.save_checkpoints:  # nothing new since the last save (a resumed run that had
            return  # already reached its end), or a benchmark run
        d.synchronize()  # the training queued so far belongs to the log interval, the save does not
        t0 = time.time()
        health.check()  # a run that has diverged since its last save writes nothing
        if d.all_mean(float(all_finite(model.parameters()))) < 1:  # any rank's shard
            raise RunError(f"step {step}: the weights are not finite; no checkpoint written (the last one is kept)")
        trainer = {"step": step, "data_position": position, "nonfinite_steps": health.total_steps(), "world_size": d.world_size,
                   "micro_batch": micro, "scheduler": scheduler.state_dict(), "config": to_dict(cfg)}
        checkpointer.save(step, model, optimizer, ema, trainer)
        saved_step, t_ckpt = step, time.time()
        paused += t_ckpt - t0

    flops_per_image = train_flops_per_image(cfg.model)
    peak, peak_source = peak_flops(d.device, cfg.model, micro, torch.bfloat16 if tc.precision == "bf16" else torch.float32)
    peak = d.all_mean(peak) * d.world_size  # every rank measured its own share of the machine, concurrently
    sampler = EpochSampler(len(ds), tc.seed)
    end = min(tc.steps, stop_at) if stop_at is not None else tc.steps
    lo_rank = d.rank * micro * tc.grad_accum
    model.train()
    losses, t_log, t_ckpt, last = [], time.time(), time.time(), {}
    metrics = open(metrics_path, "a") if d.is_main else None
    with StopSignals() as stop, tqdm(total=tc.steps, initial=step, desc="train", disable=not (progress and d.is_main),
                                     mininterval=1) as bar:  # closed (its line ended) before any error is printed
        while step < end:
            due = bool(tc.ckpt_every_minutes) and time.time() - t_ckpt >= 60 * tc.ckpt_every_minutes
            stopping, due = d.any(stop.received is not None, due)  # one host-side reduction: all ranks agree on both
            if stopping:
                break
            if due and step != saved_step:
                checkpoint()
            batches = micro_batches(ds, cfg, step, sampler.indices(position, tc.batch_size), lo_rank, micro, d.device)
            step_loss, grad_norm = train_step(model, optimizer, ema, batches, cfg, step, health)
            scheduler.step()
            step += 1
            position += tc.batch_size
            losses.append(step_loss)
            bar.update(1)
            fault_point("step", step)
            if fault_active("slow", step):  # the signal tests: a step long enough to be interrupted mid-run
                time.sleep(0.5)
            if step % tc.log_every == 0 or step == end:  # the host reads the device here, and only here
                loss, grad, nonfinite = _interval_means(losses, grad_norm, health)
                health.check()
                loss = d.all_mean(loss)  # of the finite steps
                d.synchronize()  # the interval ends when the device has done the work queued in it
                dt = time.time() - t_log - paused
                img_s = len(losses) * tc.batch_size / dt
                last = {"step": step, "loss": loss, "img_per_s": img_s,
                        "tokens_per_s": img_s * cfg.model.num_tokens, "tflops": img_s * flops_per_image / 1e12,
                        "mfu": img_s * flops_per_image / peak, "lr": scheduler.get_last_lr()[0],
                        "grad_norm": grad, "nonfinite_steps": nonfinite,
                        "mem_gib": memory_gib(d.device), "world_size": d.world_size}
                if metrics:
                    metrics.write(json.dumps(last) + "\n")
                    metrics.flush()
                if board is not None:  # the same scalars, as train/NAME
                    board.scalars({k: v for k, v in last.items() if k != "step"}, step)
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{img_s:.0f}", mfu=f"{100 * last['mfu']:.0f}%")
                losses, t_log, paused = [], time.time(), 0.0
            if tc.ckpt_every and step % tc.ckpt_every == 0 and step < end:
                checkpoint()
            if tc.sample_every and step % tc.sample_every == 0 and step < end:
                write_preview(f"samples_{step:06d}.png", ema_model())
    if metrics:
        metrics.close()
    health.check()
    checkpoint()
    checkpointer.wait()
    if step < end:  # stopped by a signal: the checkpoint is all that a resumed run needs
        if board is not None:
            board.close()
        return {"step": step, "data_position": position, "last": last, "stopped_by": stop.received or "a signal to another rank"}
    net = ema_model()
    if d.is_main and tc.save_checkpoints:
        net.save_pretrained(out, meta=meta)
    write_preview("samples.png", net)
    if board is not None:
        board.close()
    return {"step": step, "data_position": position, "last": last, "peak_flops": peak, "peak_source": peak_source}


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


def train_step(model, optimizer, ema: dict, batches: list[MicroBatch], cfg: ExperimentConfig, step: int,
               health: "NonfiniteSteps") -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step, queued on the device with no host sync: forward and backward of each micro-batch,
    gradient clipping, AdamW and the EMA. Where the loss or the gradient is not finite, the update is skipped on the
    device: fused AdamW's `found_inf` leaves weights and moments as they were, and the EMA's weight is 0 (what
    `GradScaler` does for fp16). Returns (the step's loss, the gradient norm), both still on the device."""
    tc = cfg.train
    step_loss = torch.zeros((), dtype=torch.float64, device=batches[0].x0.device)  # summed on the device
    for k, b in enumerate(batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2-wrapped: reduce the gradients on the last one
            model.set_requires_gradient_sync(k == len(batches) - 1)
        loss = flow_matching_loss(model, b.x0, b.y, cfg.flow, label_dropout=tc.label_dropout, cond=b.cond, draws=b.draws,
                                  cond_dropout=tc.cond_dropout)
        if fault_active("nan", step + 1):
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


def _interval_means(losses: list[torch.Tensor], grad_norm: torch.Tensor, health: NonfiniteSteps) -> tuple[float, float, int]:
    """(mean loss of the interval's finite steps, the last gradient norm, non-finite steps so far): one read."""
    loss = torch.stack(losses)
    finite = torch.isfinite(loss)
    mean = torch.where(finite, loss, 0).sum() / finite.sum()  # NaN where no step was finite
    values = torch.stack([mean, grad_norm.double(), health.total.double()]).tolist()
    return values[0], values[1], int(values[2])


def draw_preview(net: DiT, ae, labels, conds, scfg: SampleConfig, device) -> np.ndarray:
    """The images (N, H, W, 3) uint8 a run draws of its EMA model: image i from seed i, with labels[i] / conds[i],
    by the recipe's fixed-step solver (`preview_config`), the network in the sampling dtype (bf16 on CUDA)."""
    from lfm_fast.generate import generate_latents, inference_model, latents_to_images

    n = len(conds) if conds is not None else len(labels) if labels is not None else 8
    lat, _ = generate_latents(inference_model(net, device), labels, list(range(n)), preview_config(scfg), progress=False, conds=conds)
    return latents_to_images(ae, lat)


class EventLogs:
    """The event logs `train.log` asks for beside metrics.jsonl: the same scalars (as train/NAME) and the sample
    grids. TensorBoard writes OUT/tensorboard, and a resumed run purges its events past the checkpoint's step, as
    `metrics.jsonl` is truncated there. wandb runs offline in OUT/wandb (`wandb sync OUT/wandb/offline-run-*` uploads
    it), one wandb run per training run: its id is kept in OUT/wandb/run_id, so a resumed run continues it."""

    def __init__(self, kinds: list[str], out: str, step: int, config: dict):
        self.tb = self.run = None
        if "tensorboard" in kinds:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("train.log=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step + 1 if step else None)
        if "wandb" in kinds:
            try:
                import wandb
            except ImportError:
                raise InputError("train.log=wandb needs the wandb package: pip install wandb") from None
            folder = os.path.join(out, "wandb")
            os.makedirs(folder, mode=umask_mode(), exist_ok=True)
            id_file = os.path.join(folder, "run_id")
            if not os.path.isfile(id_file):
                with atomic_path(id_file) as tmp, open(tmp, "w") as f:
                    f.write(secrets.token_hex(4))
            with open(id_file) as f:
                run_id = f.read().strip()
            self.run = wandb.init(project="lfm-fast", name=os.path.basename(os.path.abspath(out)), id=run_id,
                                  resume="allow", dir=out, mode="offline", config=config,
                                  settings=wandb.Settings(console="off", silent=True))  # our output stays ours

    def scalars(self, values: dict, step: int) -> None:
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(f"train/{key}", value, step)
        if self.run is not None:
            self.run.log({f"train/{k}": v for k, v in values.items()}, step=step)

    def image(self, name: str, grid, step: int) -> None:
        if self.tb is not None:
            self.tb.add_image(name, grid, step, dataformats="HWC")
            self.tb.flush()
        if self.run is not None:
            import wandb

            self.run.log({name: wandb.Image(grid)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.run is not None:
            self.run.finish()


class StopSignals:
    """SIGTERM, SIGUSR1 (what SLURM sends before a time limit) and SIGINT (Ctrl-C) set a flag the loop reads between
    steps: the run then finishes its step, writes a checkpoint and returns, so a preempted job resumes where it
    stopped. A second SIGINT interrupts at once (KeyboardInterrupt, no checkpoint)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received, self._previous = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live on the main thread only
            for s in self.SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:  # e.g. SIGINT in a background job (`cmd &`)
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        if signum == signal.SIGINT:  # the next Ctrl-C is the usual one
            signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole value (a collective), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _check_resume(cfg: ExperimentConfig, out: str, ckpt: str) -> list[str]:
    """A resumed run is the saved one: `cfg` may change how it proceeds (lr, steps, logging), not what it is.
    Returns the changes, as 'train.lr 0.004 → 0.001'."""
    saved = read_trainer_state(ckpt)
    changes = resume_changes(from_dict(saved["config"]), cfg)
    at, steps = saved["step"], cfg.train.steps
    if at > steps or (at == steps and os.path.isfile(os.path.join(out, "model.safetensors"))):
        raise InputError(f"--resume: the run in {out} has {'reached' if at == steps else 'passed'} train.steps={steps} "
                         f"(it is at step {at}); pass --steps above {at} to train on")
    return changes


def _apply_resumed_hyperparameters(optimizer, scheduler, tc, schedule) -> None:
    """The optimizer and scheduler states hold the saved run's lr and weight decay: set this config's (the same
    values, bit for bit, where nothing changed)."""
    scheduler.base_lrs = [tc.lr] * len(optimizer.param_groups)
    for group, weight_decay in zip(optimizer.param_groups, (tc.weight_decay, 0.0)):
        group["initial_lr"], group["lr"] = tc.lr, tc.lr * schedule(scheduler.last_epoch)
        group["weight_decay"] = weight_decay


def _check_run_folder(out: str) -> list[str]:
    """A new run goes into a new or empty folder, or one an earlier `train` made (that crashed before its
    first checkpoint); it writes beside nobody else's files."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise InputError(f"--out {out} is a file; expected a run folder (new or empty)")
    if os.path.isdir(out) and os.listdir(out) and (read_marker(out) or {}).get("command") != "train":
        raise InputError(f"--out {out} holds other files; choose a new or empty run folder")
    return []


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
