"""Exponential moving average of the weights, kept as tensors shaped (and sharded) like the parameters,
with the decay warmed up by the step count."""

from __future__ import annotations

import torch

from lfm_fast.models.dit import clean_fqn


def create_ema(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """{parameter name: copy}; under FSDP2 each copy is a DTensor holding this rank's shard."""
    return {clean_fqn(n): p.detach().clone() for n, p in model.named_parameters()}


def ema_decay_at(step: int, decay: float) -> float:
    """min(decay, (1 + step) / (10 + step)): early averages forget the untrained start quickly."""
    return min(decay, (1 + step) / (10 + step))


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@torch.no_grad()
def update_ema(ema: dict[str, torch.Tensor], model: torch.nn.Module, weight: float | torch.Tensor) -> None:
    """ema ← ema + weight·(θ − ema), with weight = 1 − decay: a float, or a 0-dim tensor on the weights' device (the
    training step's, 0 on a skipped step; one weight per tensor, since the single-tensor overload reads it on the host)."""
    ema_t, params = [], []
    for n, p in model.named_parameters():
        ema_t.append(_local(ema[clean_fqn(n)]))
        params.append(_local(p.detach()))
    torch._foreach_lerp_(ema_t, params, [weight] * len(params) if torch.is_tensor(weight) else weight)


def full_state(ema: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Collective: the whole EMA weights on the CPU of rank 0 ({} on the other ranks). Shards are gathered one
    tensor at a time, so no rank holds a second full copy on its device."""
    import torch.distributed as dist

    keep = not dist.is_initialized() or dist.get_rank() == 0
    out = {}
    for k, v in ema.items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        if keep:
            out[k] = full.cpu()
    return out
