"""Condition encoders: class labels (with the null class that classifier-free guidance needs) and semantic maps
(LDM's SpatialRescaler, which LFM uses: one-hot map → bilinear halvings to the latent grid → 1×1 conv)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelEmbedder(nn.Module):
    """Class label → vector. Row `num_classes` is the null class: the unconditional half of CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def drop_labels(y: torch.Tensor, p: float, null_class: int, u: torch.Tensor) -> torch.Tensor:
    """Replace label i by the null class where u[i] < p, u uniform on [0, 1) (CFG training, Ho & Salimans 2022)."""
    if p <= 0:
        return y
    return torch.where(u < p, torch.full_like(y, null_class), y)  # u on y's device (`FlowDraws.to`)



def null_condition(kind: str, cond: torch.Tensor) -> torch.Tensor:
    """The condition that says nothing, shaped like `cond`: for inpainting every pixel a hole (mask 1, masked-image
    latent 0), for a semantic map no class anywhere (all-zero one-hot). Condition dropout trains it; CFG's
    unconditional half uses it."""
    null = torch.zeros_like(cond)
    if kind == "inpaint":
        null[:, -1] = 1
    return null


class SpatialRescaler(nn.Module):
    """One-hot semantic map (B, K, H, W) → (B, out_channels, H / 2^stages, W / 2^stages): `stages` bilinear halvings,
    then a 1×1 convolution. It is a submodule of the velocity net and trained with it (LFM's code built it but
    never gave it gradients)."""

    def __init__(self, num_classes: int, out_channels: int, stages: int):
        super().__init__()
        self.stages = stages
        self.proj = nn.Conv2d(num_classes, out_channels, kernel_size=1)

    def forward(self, onehot: torch.Tensor) -> torch.Tensor:
        x = onehot.to(self.proj.weight.dtype)
        for _ in range(self.stages):
            x = F.interpolate(x, scale_factor=0.5, mode="bilinear", align_corners=False)
        return self.proj(x)
