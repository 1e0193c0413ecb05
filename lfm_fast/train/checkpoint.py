"""Training state on disk: one file, written to a temporary path and renamed, so a crash during a save
leaves the previous checkpoint intact. (Sharded DCP checkpoints come with the FSDP launcher.)"""

from __future__ import annotations

import os

import torch

from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_path

CHECKPOINT_NAME = "checkpoint.pt"


def save_training_state(folder: str, step: int, model, ema, optimizer, scheduler, config: dict) -> str:
    path = os.path.join(folder, CHECKPOINT_NAME)
    state = {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict(), "config": config}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    return path


def load_training_state(folder: str, model, ema, optimizer, scheduler) -> int:
    """Restore everything in place; returns the step to continue from."""
    path = os.path.join(folder, CHECKPOINT_NAME)
    if not os.path.isfile(path):
        raise InputError(f"--resume: no {CHECKPOINT_NAME} in {folder}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["step"])
