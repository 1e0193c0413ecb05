"""The training loop (torchtitan's shape): a `Trainer` builds a run from its config and run folder (a resumed run
from its newest checkpoint), and `fit` reads as a loop: stop signals, one optimizer step (`train_step`), logging,
checkpoints and sample grids, each a method. The step's arithmetic is in train/step.py, what the run shows in
train/monitor.py. One code path for one process or many (torchrun + FSDP2): a single process is a world of one.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from tqdm.auto import tqdm

from lfm_fast.config import ExperimentConfig, from_dict, resume_changes, to_dict, validate
from lfm_fast.data.latents import LatentShardDataset
from lfm_fast.dist import init_distributed
from lfm_fast.errors import InputError, RunError
from lfm_fast.faults import TrainingFaults
from lfm_fast.fileio import image_grid, portable_path, read_marker, save_png, umask_mode, write_marker
from lfm_fast.models.dit import DiT
from lfm_fast.train.checkpoint import Checkpointer, latest_checkpoint, load_checkpoint, read_trainer_state
from lfm_fast.train.ema import create_ema, full_state
from lfm_fast.train.monitor import (EventLogs, StopSignals, draw_preview, load_preview_autoencoder, memory_gib,
                                    truncate_metrics)
from lfm_fast.train.parallelize import build_parallel_dit
from lfm_fast.train.step import (EpochSampler, NonfiniteSteps, all_finite, configure_model_for_data, interval_means,
                                 lr_lambda, make_optimizer, micro_batch_size, micro_batches, optimizer_step)
from lfm_fast.train.throughput import peak_flops, train_flops_per_image
from lfm_fast.validation import parse_ac


def train(cfg: ExperimentConfig, latents: str, out: str, resume: bool = False, stop_at: int | None = None,
          progress: bool = True, device: str | None = None) -> dict:
    """Train; returns a summary. `stop_at` ends the run early at that step (as a preempted job would).
    Under torchrun every rank calls this; only rank 0 writes logs, grids and the inference checkpoint."""
    return Trainer(cfg, latents, out, resume, stop_at, progress, device).fit()


class Trainer:
    """One training run: the model (FSDP2 over the ranks), its EMA, AdamW and the schedule, the data order, and the
    run folder (checkpoints, metrics.jsonl, event logs, sample grids, and at the end the inference checkpoint)."""

    def __init__(self, cfg: ExperimentConfig, latents: str, out: str, resume: bool = False, stop_at: int | None = None,
                 progress: bool = True, device: str | None = None):
        validate(cfg)
        self.cfg, self.tc, self.out, self.progress = cfg, cfg.train, out, progress
        self.ds = LatentShardDataset(latents)
        configure_model_for_data(cfg, self.ds)
        if self.tc.precision not in ("bf16", "fp32"):
            raise InputError(f"train.precision {self.tc.precision!r}: expected 'bf16' or 'fp32'")
        parse_ac(self.tc.activation_checkpointing)
        self.schedule = lr_lambda(self.tc, len(self.ds))
        ckpt = latest_checkpoint(out)
        if resume and ckpt is None:
            raise InputError(f"--resume: no complete checkpoint in {out}/checkpoints")
        if not resume and ckpt is not None:
            raise InputError(f"{out} already holds a training run; pass --resume to continue it or choose another --out")
        changes = _check_resume(cfg, out, ckpt) if resume else _check_run_folder(out)
        self.d = init_distributed(device)
        self._build()
        if resume:
            self._resume(ckpt, changes)
        self.health = NonfiniteSteps(self.d.device, self.nonfinite, self.tc.max_nonfinite_steps, out)
        self.saved_step = self.step  # the step of the newest checkpoint (none to write at step 0)
        self.end = min(self.tc.steps, stop_at) if stop_at is not None else self.tc.steps
        self._open_run_folder(latents)
        self.faults = TrainingFaults()

    def _build(self) -> None:
        """The model, its EMA, the optimizer and schedule, the data order, and the throughput's yardsticks."""
        cfg, tc, d = self.cfg, self.tc, self.d
        self.micro = micro_batch_size(tc, d.world_size)
        self.lo_rank = d.rank * self.micro * tc.grad_accum  # this rank's first row of each global batch
        self.model = build_parallel_dit(cfg.model, d.mesh, d.device, tc.precision, tc.activation_checkpointing,
                                        tc.compile, tc.seed)
        self.ema = create_ema(self.model)
        self.optimizer = make_optimizer(self.model, tc)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.step, self.position, self.nonfinite = 0, 0, 0
        self.sampler = EpochSampler(len(self.ds), tc.seed)
        self.checkpointer = Checkpointer(self.out, tc.keep_checkpoints, tc.async_checkpoint == "true" or
                                         (tc.async_checkpoint == "auto" and d.device.type == "cuda"))
        self.flops_per_image = train_flops_per_image(cfg.model)
        peak, self.peak_source = peak_flops(d.device, cfg.model, self.micro,
                                            torch.bfloat16 if tc.precision == "bf16" else torch.float32)
        self.peak = d.all_mean(peak) * d.world_size  # every rank measured its own share of the machine, concurrently

    def _resume(self, ckpt: str, changes: list[str]) -> None:
        state = load_checkpoint(ckpt, self.model, self.optimizer, self.ema)
        self.step, self.position, self.nonfinite = state["step"], state["data_position"], state.get("nonfinite_steps", 0)
        self.scheduler.load_state_dict(state["scheduler"])
        _apply_resumed_hyperparameters(self.optimizer, self.scheduler, self.tc, self.schedule)
        if self.d.is_main:
            print(f"lfm-fast: resuming {self.out} at step {self.step}{' with ' + '; '.join(changes) if changes else ''}",
                  file=sys.stderr)

    def _open_run_folder(self, latents: str) -> None:
        """Everything is validated: rank 0 makes the run folder only now, with its logs; the preview inputs."""
        cfg, ds, d, out = self.cfg, self.ds, self.d, self.out
        self.meta = {"experiment": to_dict(cfg), "latents": portable_path(latents, out),
                     "autoencoder": portable_path(ds.autoencoder, out), "scaling_factor": ds.meta.get("scaling_factor"),
                     "class_names": ds.meta.get("class_names", [])}
        self.metrics_path = os.path.join(out, "metrics.jsonl")
        if d.is_main:
            os.makedirs(out, mode=umask_mode(), exist_ok=True)
            write_marker(out, "train")
            truncate_metrics(self.metrics_path, self.step)
        self.board = EventLogs(self.tc.log.split(","), out, self.step, to_dict(cfg)) if d.is_main else None
        self.ae = load_preview_autoencoder(ds.autoencoder) if d.is_main else None
        num_preview = max(8, min(64, 8 * max(1, cfg.model.num_classes)))
        self.preview_labels = torch.arange(num_preview) % cfg.model.num_classes if cfg.model.num_classes else None
        condition = cfg.model.condition  # the conditional tasks draw one preview for each of the first samples'
        self.preview_cond = (None if condition == "none"  # conditions
                             else ds.get_condition(list(range(min(num_preview, len(ds)))), condition))
        self.paused = 0.0  # seconds of the current log interval spent in checkpoints and previews (not training)

    def fit(self) -> dict:
        """The loop, until train.steps (or `stop_at`, or a stop signal: then a checkpoint is the run's end)."""
        tc, d = self.tc, self.d
        self.model.train()
        self.losses, self.t_log, self.t_ckpt, self.last = [], time.time(), time.time(), {}
        self.metrics = open(self.metrics_path, "a") if d.is_main else None
        with StopSignals() as stop, tqdm(total=tc.steps, initial=self.step, desc="train",
                                         disable=not (self.progress and d.is_main), mininterval=1) as self.bar:
            while self.step < self.end:  # (the bar is closed, its line ended, before any error is printed)
                due = bool(tc.ckpt_every_minutes) and time.time() - self.t_ckpt >= 60 * tc.ckpt_every_minutes
                stopping, due = d.any(stop.received is not None, due)  # one host-side reduction: all ranks agree
                if stopping:
                    break
                if due and self.step != self.saved_step:
                    self.checkpoint()
                self.losses.append(self.train_step())
                self.bar.update(1)
                self.faults.after_step(self.step)
                if self.step % tc.log_every == 0 or self.step == self.end:
                    self.log()
                if tc.ckpt_every and self.step % tc.ckpt_every == 0 and self.step < self.end:
                    self.checkpoint()
                if tc.sample_every and self.step % tc.sample_every == 0 and self.step < self.end:
                    self.preview(f"samples_{self.step:06d}.png", self.ema_model())
        return self.finish(stop.received)

    def train_step(self) -> torch.Tensor:
        """One optimizer step on this rank's share of the next global batch; the loss, still on the device."""
        tc = self.tc
        indices = self.sampler.indices(self.position, tc.batch_size)
        batches = micro_batches(self.ds, self.cfg, self.step, indices, self.lo_rank, self.micro, self.d.device)
        loss, self.grad_norm = optimizer_step(self.model, self.optimizer, self.ema, batches, self.cfg, self.step,
                                              self.health, poison=self.faults.poisons(self.step + 1))
        self.scheduler.step()
        self.step += 1
        self.position += tc.batch_size
        return loss

    def log(self) -> None:
        """The interval's metrics to metrics.jsonl, the event logs and the bar: the host reads the device here only."""
        d, cfg = self.d, self.cfg
        loss, grad, nonfinite = interval_means(self.losses, self.grad_norm, self.health)
        self.health.check()
        loss = d.all_mean(loss)  # of the finite steps
        d.synchronize()  # the interval ends when the device has done the work queued in it
        img_s = len(self.losses) * self.tc.batch_size / (time.time() - self.t_log - self.paused)
        self.last = {"step": self.step, "loss": loss, "img_per_s": img_s, "tokens_per_s": img_s * cfg.model.num_tokens,
                     "tflops": img_s * self.flops_per_image / 1e12, "mfu": img_s * self.flops_per_image / self.peak,
                     "lr": self.scheduler.get_last_lr()[0], "grad_norm": grad, "nonfinite_steps": nonfinite,
                     "mem_gib": memory_gib(d.device), "world_size": d.world_size}
        if self.metrics:
            self.metrics.write(json.dumps(self.last) + "\n")
            self.metrics.flush()
        if self.board is not None:  # the same scalars, as train/NAME
            self.board.scalars({k: v for k, v in self.last.items() if k != "step"}, self.step)
        self.bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{img_s:.0f}", mfu=f"{100 * self.last['mfu']:.0f}%")
        self.losses, self.t_log, self.paused = [], time.time(), 0.0

    def checkpoint(self) -> None:
        """A DCP checkpoint of this step (model, EMA, optimizer, data position), unless there is nothing new."""
        tc, d, step = self.tc, self.d, self.step
        if step == self.saved_step or not tc.save_checkpoints:  # nothing new since the last save (a resumed run that
            return  # had already reached its end), or a benchmark run
        d.synchronize()  # the training queued so far belongs to the log interval, the save does not
        t0 = time.time()
        self.health.check()  # a run that has diverged since its last save writes nothing
        if d.all_mean(float(all_finite(self.model.parameters()))) < 1:  # any rank's shard
            raise RunError(f"step {step}: the weights are not finite; no checkpoint written (the last one is kept)")
        state = {"step": step, "data_position": self.position, "nonfinite_steps": self.health.total_steps(),
                 "world_size": d.world_size, "micro_batch": self.micro, "scheduler": self.scheduler.state_dict(),
                 "config": to_dict(self.cfg)}
        self.checkpointer.save(step, self.model, self.optimizer, self.ema, state)
        self.saved_step, self.t_ckpt = step, time.time()
        self.paused += self.t_ckpt - t0

    def ema_model(self) -> DiT | None:
        """Collective: the EMA weights gathered to rank 0 as a DiT (None on the others)."""
        state = full_state(self.ema)
        return DiT.from_state_dict(self.cfg.model, state) if self.d.is_main else None

    def preview(self, name: str, net: DiT | None) -> None:
        """Rank 0 draws a sample grid of `net` (the EMA model) into the run folder; every rank waits for it."""
        t0 = time.time()
        if self.ae is not None and self.d.is_main:
            images = draw_preview(net, self.ae, self.preview_labels, self.preview_cond, self.cfg.sample, self.d.device)
            grid = image_grid(images, nrow=8)
            save_png(os.path.join(self.out, name), grid, upscale=max(1, 64 // images.shape[1]))
            if self.board is not None:
                self.board.image("samples", grid, self.step)
        self.d.barrier()
        self.paused += time.time() - t0

    def finish(self, stopped_by: str | None) -> dict:
        """The last checkpoint; at the end of the run the inference checkpoint (EMA weights) and its sample grid."""
        if self.metrics:
            self.metrics.close()
        self.health.check()
        self.checkpoint()
        self.checkpointer.wait()
        summary = {"step": self.step, "data_position": self.position, "last": self.last}
        if self.step < self.end:  # stopped by a signal: the checkpoint is all that a resumed run needs
            if self.board is not None:
                self.board.close()
            return {**summary, "stopped_by": stopped_by or "a signal to another rank"}
        net = self.ema_model()
        if self.d.is_main and self.tc.save_checkpoints:
            net.save_pretrained(self.out, meta=self.meta)
        self.preview("samples.png", net)
        if self.board is not None:
            self.board.close()
        return {**summary, "peak_flops": self.peak, "peak_source": self.peak_source}


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
