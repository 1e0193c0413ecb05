"""One process group for every command: under torchrun it joins the job (gloo on CPU, nccl on CUDA);
without torchrun it is a group of one, so training and sampling take the same code path at any size."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


def to_device(t: torch.Tensor | None, device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """A host tensor on `device` without draining the device's queue: on CUDA through pinned memory with a
    non-blocking copy (a copy from pageable memory waits for the stream first); elsewhere a plain copy."""
    if t is None:
        return None
    device = torch.device(device)
    if t.device == device or device.type == "cpu":
        return t.to(device, dtype)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()
    return t.to(device, dtype, non_blocking=True)


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh
    host_group: object = None  # a gloo group for host-side flags (the default group where it is gloo already)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        dist.barrier()

    def all_mean(self, value: float) -> float:
        """Mean of a Python float over ranks (the loss of the global batch, from per-rank means). The tensor lives
        on the group's device: an NCCL group has no CPU backend."""
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t) / self.world_size

    def any(self, *flags: bool) -> list[bool]:
        """Each flag True on every rank if it is True on any (a signal that reached only some ranks stops them all),
        in one reduction."""
        if self.world_size == 1:
            return [bool(f) for f in flags]
        t = torch.tensor([int(f) for f in flags], dtype=torch.int32)  # on the host: no wait for the device's queue
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return [bool(v) for v in t.tolist()]

    def synchronize(self) -> None:
        """Wait for the work queued on this rank's device (a no-op on the CPU, where every op is done on return)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a process on its own (readable before the group exists)."""
    return os.environ.get("RANK", "0") == "0"


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


def init_distributed(device: str | None = None) -> Dist:
    """Join (or create) the default process group and a 1-D device mesh over all ranks."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if launched_by_torchrun():
            dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
        else:  # a group of one, no network: the same collectives, trivially
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    mesh = init_device_mesh(dev.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" and dist.get_world_size() > 1 else None
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, dev, mesh, host_group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def torchrun_command(nproc: int, argv: list[str]) -> list[str]:
    """`lfm-fast … --nproc N` → the torchrun line (through `lfm_fast.launch`) that runs `python -m lfm_fast …` on N local processes.
    The `--` keeps torchrun's own parser off our options (it would take `--num` for its `--numa-binding`)."""
    return [sys.executable, "-m", "lfm_fast.launch", "--standalone", f"--nproc_per_node={nproc}", "-m", "lfm_fast", "--", *argv]
