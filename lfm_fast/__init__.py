"""lfm-fast: latent flow matching (LFM, Dao et al. 2023) as a performance engine."""

__version__ = "0.1.0"
