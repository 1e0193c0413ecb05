"""Condition encoders: class labels (with the null class that classifier-free guidance needs)."""

from __future__ import annotations

import torch
from torch import nn


class LabelEmbedder(nn.Module):
    """Class label → vector. Row `num_classes` is the null class: the unconditional half of CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


def drop_labels(y: torch.Tensor, p: float, null_class: int, u: torch.Tensor) -> torch.Tensor:
    """Replace label i by the null class where u[i] < p, u uniform on [0, 1) (CFG training, Ho & Salimans 2022)."""
    if p <= 0:
        return y
    return torch.where(u.to(y.device) < p, torch.full_like(y, null_class), y)
