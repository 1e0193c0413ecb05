"""`lfm-fast eval`: metrics of generated images against a reference, as one JSON object.

fid        Inception pool3 FID (reference: pytorch-fid stats .npz with mu/sigma, or images: an ADM
           reference batch .npz with arr_0, a samples.npz, or a folder)
pr         improved precision / recall (k = 3) on the same Inception features (reference images needed)
latent_fd  Fréchet distance between Gaussian fits of the AE latents of both sets (--ae needed)
"""

from __future__ import annotations

import numpy as np
import torch

from lfm_fast.errors import InputError
from lfm_fast.eval.fid import inception_features, load_images, load_inception, reference_stats
from lfm_fast.eval.frechet import frechet_distance, gaussian_stats, latent_fd
from lfm_fast.eval.precision_recall import precision_recall

METRICS = ("fid", "pr", "latent_fd")


def _encode_images(ae, images: np.ndarray) -> np.ndarray:
    from lfm_fast.autoencoder import encode
    from lfm_fast.data.images import to_tensor

    return encode(ae, to_tensor(images)).numpy()


def _holds_images(path: str) -> bool:
    with np.load(path) as f:
        return "arr_0" in f


def evaluate(samples: str, ref: str, metrics: list[str], inception: str | None = None, ae: str | None = None,
             batch_size: int = 50, save_stats: str | None = None, progress: bool = True) -> dict:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise InputError(f"--metrics: unknown {', '.join(unknown)}; expected some of {', '.join(METRICS)}")
    # the flags, the reference's kind and the weights are checked before any image is read
    if "latent_fd" in metrics and not ae:
        raise InputError("--metrics latent_fd needs --ae (the autoencoder whose latents are compared)")
    stats = reference_stats(ref)  # an ADM reference batch holds both: its mu/sigma for FID, its arr_0 images for the rest
    need_images = [name for m, name in (("pr", "pr"), ("latent_fd", "latent_fd")) if m in metrics]
    read_ref = stats is None or (need_images and _holds_images(ref))
    if need_images and not read_ref:
        raise InputError(f"--metrics {need_images[0]} needs reference images, but {ref} holds statistics only")
    net = None
    if "fid" in metrics or "pr" in metrics or save_stats:
        needed_by = " and ".join(name for m, name in (("fid", "FID"), ("pr", "precision/recall")) if m in metrics) or "--save-stats"
        net = load_inception(inception, device="cuda" if torch.cuda.is_available() else "cpu", needed_by=needed_by)
    fake = load_images(samples)
    real = load_images(ref, size=fake.shape[1]) if read_ref else None
    result: dict = {"num_samples": int(len(fake)), "num_reference": None if real is None else int(len(real))}
    if net is not None:
        fake_feats = inception_features(net, fake, batch_size, progress)
        fake_stats = gaussian_stats(fake_feats)
        if save_stats:
            from lfm_fast.fileio import atomic_path

            with atomic_path(save_stats) as tmp, open(tmp, "wb") as f:
                np.savez(f, mu=fake_stats[0], sigma=fake_stats[1])
        real_feats = None if real is None else inception_features(net, real, batch_size, progress)
        if "fid" in metrics:
            result["fid"] = frechet_distance(*fake_stats, *(stats if stats is not None else gaussian_stats(real_feats)))
        if "pr" in metrics:
            result.update(precision_recall(real_feats, fake_feats, k=3))
    if "latent_fd" in metrics:
        from lfm_fast.autoencoder import load_autoencoder

        model = load_autoencoder(ae)
        result["latent_fd"] = latent_fd(_encode_images(model, real), _encode_images(model, fake))
    return result
