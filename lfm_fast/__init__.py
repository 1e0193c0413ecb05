"""lfm-fast: latent flow matching (LFM, Dao et al. 2023) as a performance engine."""

__version__ = "0.2.0"


def default_device():
    """CUDA when present, else CPU: where models, AEs and sampling run unless told otherwise."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
