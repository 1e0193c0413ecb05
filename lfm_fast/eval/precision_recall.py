"""Improved precision and recall (Kynkäänniemi et al. 2019): each set's k-NN radii define its manifold;
precision = the fraction of generated samples inside the real manifold, recall the reverse."""

from __future__ import annotations

import numpy as np
import torch

from lfm_fast.errors import InputError


def knn_radii(features: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """Distance from each row to its k-th nearest other row."""
    out = []
    for i in range(0, len(features), batch):
        d = torch.cdist(features[i:i + batch], features)
        out.append(d.kthvalue(k + 1, dim=1).values)  # +1: the row itself sits at distance 0
    return torch.cat(out)


def manifold_coverage(reference: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, batch: int = 1024) -> float:
    """Fraction of queries within the radius of at least one reference row."""
    inside = []
    for i in range(0, len(queries), batch):
        d = torch.cdist(queries[i:i + batch], reference)
        inside.append((d <= radii[None, :]).any(dim=1))
    return float(torch.cat(inside).float().mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    r = torch.as_tensor(np.asarray(real, np.float64).reshape(len(real), -1))
    f = torch.as_tensor(np.asarray(fake, np.float64).reshape(len(fake), -1))
    if len(r) <= k or len(f) <= k:
        raise InputError(f"precision/recall with k={k} needs more than {k} samples in each set, got {len(f)} generated "
                         f"and {len(r)} reference")
    return {"precision": manifold_coverage(r, knn_radii(r, k), f), "recall": manifold_coverage(f, knn_radii(f, k), r)}
