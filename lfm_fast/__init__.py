"""lfm-fast: latent flow matching (LFM, Dao et al. 2023) as a performance engine.

    from lfm_fast import LFMPipeline
    pipe = LFMPipeline.from_pretrained("runs/dit")
    images = pipe(class_labels=[0, 3], num_inference_steps=16, guidance_scale=2.0).images

The names below import lazily, so `import lfm_fast` (and `lfm-fast --help`) does not import torch.
"""

__version__ = "0.2.0"

_EXPORTS = {"LFMPipeline": "lfm_fast.pipeline", "LFMPipelineOutput": "lfm_fast.pipeline", "DiT": "lfm_fast.models.dit",
            "DiTConfig": "lfm_fast.models.dit", "build_dit": "lfm_fast.models.dit", "sample": "lfm_fast.sampling",
            "SampleConfig": "lfm_fast.sampling", "per_image_noise": "lfm_fast.sampling",
            "load_autoencoder": "lfm_fast.autoencoder", "get_preset": "lfm_fast.config"}
__all__ = ["__version__", "default_device", *_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lfm_fast' has no attribute {name!r}")


def default_device():
    """CUDA when present, else CPU: where models, AEs and sampling run unless told otherwise."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
