"""What a training run shows and listens to besides its arithmetic: memory, sample grids of the EMA model, the
event logs beside metrics.jsonl (TensorBoard, wandb), and the stop signals the loop reads between steps."""

from __future__ import annotations

import json
import os
import resource
import secrets
import signal
import threading
import warnings

import numpy as np
import torch

from lfm_fast.choices import FIXED_SOLVERS
from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_path, umask_mode
from lfm_fast.models.dit import DiT
from lfm_fast.sampling import SampleConfig


def memory_gib(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or the resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def preview_config(cfg: SampleConfig) -> SampleConfig:
    """Previews use the configured fixed-step solver, or 16 Heun steps where an adaptive one is configured."""
    if cfg.solver in FIXED_SOLVERS:
        return cfg
    return SampleConfig(solver="heun", steps=16, cfg=cfg.cfg)


def draw_preview(net: DiT, ae, labels, conds, scfg: SampleConfig, device) -> np.ndarray:
    """The images (N, H, W, 3) uint8 a run draws of its EMA model: image i from seed i, with labels[i] / conds[i],
    by the recipe's fixed-step solver (`preview_config`), the network in the sampling dtype (bf16 on CUDA)."""
    from lfm_fast.generate import generate_latents, inference_model, latents_to_images

    n = len(conds) if conds is not None else len(labels) if labels is not None else 8
    lat, _ = generate_latents(inference_model(net, device), labels, list(range(n)), preview_config(scfg), progress=False, conds=conds)
    return latents_to_images(ae, lat)


def load_preview_autoencoder(spec: str):
    """The run's autoencoder for the sample grids, or None (with a warning) where it cannot be loaded."""
    from lfm_fast.autoencoder import load_autoencoder

    if not spec:
        return None
    try:
        return load_autoencoder(spec)
    except InputError as e:
        warnings.warn(f"no sample grids: {e}")
        return None


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


def truncate_metrics(path: str, step: int) -> None:
    """On resume, drop log lines written after the checkpoint (the steps that are about to be redone)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(keep)
