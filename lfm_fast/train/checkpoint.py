"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run folder:
    checkpoints/step_00001000/   DCP shards + .metadata (model, EMA, optimizer), trainer.json, rng.pt
    checkpoints/latest           the name of the newest complete checkpoint

A save writes into `step_N.tmp/` and is committed by renaming it and then rewriting `latest` (each an
atomic rename), so a crash at any point of a save leaves the previous checkpoint intact and `latest`
naming it. DCP stores each tensor with its global shape, so a checkpoint saved by N ranks loads on M.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_path, write_json

CHECKPOINT_DIR = "checkpoints"
KEEP = 2


def latest_checkpoint(run: str) -> str | None:
    """Path of the newest committed checkpoint of a run folder, or None."""
    pointer = os.path.join(run, CHECKPOINT_DIR, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run, CHECKPOINT_DIR, f.read().strip())
    return path if os.path.isfile(os.path.join(path, "trainer.json")) else None


def fault_active(point: str, step: int) -> bool:
    """Fault injection for the tests: LFM_FAST_FAULT=<point>:<step> or <point>:<first>-<last>."""
    name, _, steps = os.environ.get("LFM_FAST_FAULT", "").partition(":")
    if name != point or not steps:
        return False
    first, _, last = steps.partition("-")
    return int(first) <= step <= int(last or first)


def fault_point(point: str, step: int) -> None:
    """LFM_FAST_FAULT=<point>:<step> SIGKILLs this process there (a crash, for the resume tests)."""
    if fault_active(point, step):
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run: str, step: int, model, optimizer, ema: dict, trainer: dict) -> str:
    """Collective: every rank calls it. `trainer` (step, data position, scheduler, config) is JSON."""
    root = os.path.join(run, CHECKPOINT_DIR)
    name, again = f"step_{step:08d}", 0
    while os.path.exists(os.path.join(root, name)):  # a step saved before (`latest` may name it) is never deleted
        again += 1  # first: the new one is committed beside it, and pruned later like any older checkpoint
        name = f"step_{step:08d}-{again}"
    final, tmp = os.path.join(root, name), os.path.join(root, name + ".tmp")
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    dist.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema}, checkpoint_id=tmp)
    rng = [None] * dist.get_world_size()
    dist.all_gather_object(rng, torch.get_rng_state())
    fault_point("save", step)
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "torch": rng}, os.path.join(tmp, "rng.pt"))
        write_json(os.path.join(tmp, "trainer.json"), trainer)
        os.replace(tmp, final)
        with atomic_path(os.path.join(root, "latest")) as p:
            with open(p, "w") as f:
                f.write(name)
        done = sorted(d for d in os.listdir(root) if d.startswith("step_") and not d.endswith(".tmp"))
        stale = [d for d in os.listdir(root) if d.endswith(".tmp")]  # saves a crash interrupted
        for old in done[:-KEEP] + stale:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    dist.barrier()
    return final


def load_checkpoint(path: str, model, optimizer, ema: dict) -> dict:
    """Collective: restore model, optimizer and EMA shards in place (any world size); returns trainer.json."""
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        raise InputError(f"--resume: {path} is not a complete checkpoint")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    if rng["world_size"] == dist.get_world_size():  # per-rank streams only map onto the same ranks
        torch.set_rng_state(rng["torch"][dist.get_rank()])
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def read_checkpoint_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, full-size, by flat name ('model.blocks.0…', 'ema.…', 'optim.state.…'),
    without a process group (for inspection, tests and conversion)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(path, os.path.join(tmp, "state.pt"))
        state = torch.load(os.path.join(tmp, "state.pt"), weights_only=False)
    flat = {}

    def walk(prefix, obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}{k}.", v)
        elif isinstance(obj, torch.Tensor):
            flat[prefix[:-1]] = obj

    walk("", state)
    return flat
