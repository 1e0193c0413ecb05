"""Exponential moving average of the weights, with the decay warmed up by the step count."""

from __future__ import annotations

import copy

import torch


def create_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


def ema_decay_at(step: int, decay: float) -> float:
    """min(decay, (1 + step) / (10 + step)): early averages forget the untrained start quickly."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    ema_params = list(ema.parameters())
    params = list(model.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(params, ema_params)], 1.0 - decay)
