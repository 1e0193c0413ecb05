"""Fréchet distance between Gaussians: d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2(Σ₁Σ₂)^½) (Heusel et al. 2017).

The same formula serves FID (Inception features) and the latent FD of the demo: the W2 distance between
Gaussian fits of real and generated latents, the quantity LFM's bound is about.
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg

from lfm_fast.errors import InputError


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    features = np.asarray(features, np.float64).reshape(len(features), -1)
    n, dim = features.shape
    if n < 2:
        raise InputError(f"a Fréchet distance needs at least 2 samples, got {n}")
    if n <= dim:
        warnings.warn(f"Fréchet distance from {n} samples of {dim}-dimensional features: the covariance needs more "
                      f"samples than dimensions to be full rank, so the value is biased (it can even be negative); "
                      f"compare only values from equal, larger counts", stacklevel=2)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise InputError(f"statistics of different feature sizes: {mu1.shape[0]} vs {mu2.shape[0]} (another feature "
                         f"extractor or layer made the reference)")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():  # singular product: regularise the diagonals (pytorch-fid's guard)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.max(np.abs(covmean.imag))} in the matrix square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def latent_fd(real: np.ndarray, fake: np.ndarray) -> float:
    """Fréchet distance between Gaussian fits of two sets of latents (N, ...)."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def fd_with_interval(real: np.ndarray, fake: np.ndarray, boots: int = 200, seed: int = 0,
                     level: float = 0.95) -> tuple[float, float, float]:
    """Fréchet distance of two feature sets and a bootstrap interval: (fd, lo, hi). Each replicate resamples both
    sets with replacement. Replicates carry the estimator's finite-sample bias once more, so they sit above the
    plain value by about the bootstrap's mean shift; the interval is the replicates' percentile interval moved by
    that shift, i.e. the bootstrap's spread around the plain value."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    rng = np.random.default_rng(seed)
    reps = np.array([frechet_distance(*gaussian_stats(real[rng.integers(0, len(real), len(real))]),
                                      *gaussian_stats(fake[rng.integers(0, len(fake), len(fake))])) for _ in range(boots)])
    q_lo, q_hi = np.quantile(reps, [(1 - level) / 2, (1 + level) / 2])
    fd = latent_fd(real, fake)
    shift = reps.mean() - fd
    return fd, float(q_lo - shift), float(q_hi - shift)
