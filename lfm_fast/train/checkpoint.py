"""Sharded training checkpoints with torch.distributed.checkpoint (DCP).

Layout of a run folder:
    checkpoints/step_00001000/   DCP shards + .metadata (model, EMA, optimizer), trainer.json, rng.pt
    checkpoints/latest           the name of the newest complete checkpoint

A save writes into `step_N.tmp/` and is committed by renaming it and then rewriting `latest` (each an
atomic rename, fsynced), so a crash at any point of a save leaves the previous checkpoint intact and
`latest` naming it. DCP stores each tensor with its global shape, so a checkpoint saved by N ranks loads on M.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from lfm_fast.errors import InputError
from lfm_fast.faults import fault_point
from lfm_fast.fileio import atomic_path, fsync_path, umask_mode, write_json

CHECKPOINT_DIR = "checkpoints"


def latest_checkpoint(run: str) -> str | None:
    """Path of the newest committed checkpoint of a run folder, or None."""
    pointer = os.path.join(run, CHECKPOINT_DIR, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        path = os.path.join(run, CHECKPOINT_DIR, f.read().strip())
    return path if os.path.isfile(os.path.join(path, "trainer.json")) else None


class Checkpointer:
    """The saves of one run; every rank makes one and calls `save` together (a collective).

    A save writes the shards into `step_N.tmp/` (`dcp.save`, or `dcp.async_save` with `async_save=True`: the state
    is copied to host memory and training goes on while a thread writes it, over a gloo group of its own). When
    DCP returns, every rank's shards are on disk (its coordinator writes the metadata last); rank 0 then commits in
    a background thread: rng.pt and trainer.json, fsync, rename to `step_N/`, rewrite `latest`, fsync the folder,
    and prune all but the newest `keep`. No rank waits at a barrier for the commit or the pruning; the next save
    (and `wait`, at the end of a run) first waits for the previous one.
    """

    def __init__(self, run: str, keep: int = 2, async_save: bool = False):
        self.root, self.keep, self.async_save = os.path.join(run, CHECKPOINT_DIR), keep, async_save
        self.group = dist.new_group(backend="gloo") if async_save else None  # collectives off the training thread
        self._thread, self._error = None, None

    def save(self, step: int, model, optimizer, ema: dict, trainer: dict) -> str:
        """`trainer` (step, data position, scheduler, config) is JSON. Returns the folder the save commits to."""
        self.wait()
        name = None
        if dist.get_rank() == 0:
            name = _free_name(self.root, step)
            shutil.rmtree(os.path.join(self.root, name + ".tmp"), ignore_errors=True)
            os.makedirs(os.path.join(self.root, name + ".tmp"), mode=umask_mode())
        box = [name]
        dist.broadcast_object_list(box, src=0)  # rank 0 chose the name and made the folder
        name = box[0]
        final, tmp = os.path.join(self.root, name), os.path.join(self.root, name + ".tmp")
        model_sd, optim_sd, _ = _dcp_state(model, optimizer)
        rng = [None] * dist.get_world_size()
        dist.all_gather_object(rng, torch.get_rng_state())
        state = {"model": model_sd, "optim": optim_sd, "ema": ema}
        if self.async_save:
            future = dcp.async_save(state, checkpoint_id=tmp, process_group=self.group)
        else:
            dcp.save(state, checkpoint_id=tmp)
            future = None

        def finish():
            try:
                if future is not None:
                    future.result()
                if dist.get_rank() == 0:
                    fault_point("save", step)
                    self._commit(name, {"world_size": len(rng), "torch": rng}, trainer)
            except BaseException as e:  # raised by the next save or `wait`
                self._error = e

        self._thread = threading.Thread(target=finish, name=f"checkpoint-{name}")
        self._thread.start()
        return final

    def _commit(self, name: str, rng: dict, trainer: dict) -> None:
        tmp = os.path.join(self.root, name + ".tmp")
        torch.save(rng, os.path.join(tmp, "rng.pt"))
        fsync_path(os.path.join(tmp, "rng.pt"))
        write_json(os.path.join(tmp, "trainer.json"), trainer)
        fsync_path(tmp)
        os.replace(tmp, os.path.join(self.root, name))
        with atomic_path(os.path.join(self.root, "latest")) as p:  # fsyncs the file and the folder
            with open(p, "w") as f:
                f.write(name)
        done = sorted(d for d in os.listdir(self.root) if d.startswith("step_") and not d.endswith(".tmp"))
        stale = [d for d in os.listdir(self.root) if d.endswith(".tmp")]  # saves a crash interrupted
        for old in [d for d in done[:-self.keep] if d != name] + stale:
            shutil.rmtree(os.path.join(self.root, old), ignore_errors=True)

    def wait(self) -> None:
        """Until the last save is committed; re-raises what went wrong in it."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error


def _free_name(root: str, step: int) -> str:
    """step_N, or step_N-k where step N was saved before: a checkpoint `latest` may name is never deleted first
    (the new one is committed beside it and pruned later like any older checkpoint)."""
    name, again = f"step_{step:08d}", 0
    while os.path.exists(os.path.join(root, name)):
        again += 1
        name = f"step_{step:08d}-{again}"
    return name


def _dcp_state(model, optimizer) -> tuple[dict, dict, dict]:
    """(model state, optimizer state, fixed buffers). The fixed buffers (the position table, which the config
    determines) stay out of checkpoints, so runs written before it was saved with the weights resume unchanged."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    fixed = {k: model_sd.pop(k) for k in [k for k in model_sd if k.rsplit(".", 1)[-1] == "pos_embed"]}
    return model_sd, optim_sd, fixed


def read_trainer_state(path: str) -> dict:
    """trainer.json of a committed checkpoint folder."""
    if not os.path.isfile(os.path.join(path, "trainer.json")):
        raise InputError(f"--resume: {path} is not a complete checkpoint")
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)


def load_checkpoint(path: str, model, optimizer, ema: dict) -> dict:
    """Collective: restore model, optimizer and EMA shards in place (any world size); returns trainer.json."""
    trainer = read_trainer_state(path)
    model_sd, optim_sd, fixed = _dcp_state(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict={**state["model"], **fixed}, optim_state_dict=state["optim"])
    rng = torch.load(os.path.join(path, "rng.pt"), weights_only=True)
    if rng["world_size"] == dist.get_world_size():  # per-rank streams only map onto the same ranks
        torch.set_rng_state(rng["torch"][dist.get_rank()])
    return trainer


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
