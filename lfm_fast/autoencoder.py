"""The latent space: diffusers' AutoencoderKL, pretrained (SD-VAE) or the small built-in one.

Latents are always handled scaled: z = scaling_factor · E(x) (0.18215 for SD-VAE, LFM's setting);
the built-in AE measures its factor as 1 / std of its latents and keeps it in its own config.json
(`scaling_factor`, the field diffusers already has), so `load_autoencoder` restores it.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lfm_fast import default_device
from lfm_fast.dist import to_device
from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_dir, check_out_dir, write_json

SD_VAE_SCALE = 0.18215
BUILTIN_DIR = os.path.join(os.path.dirname(__file__), "assets", "autoencoders")  # shipped as package data
BUILTIN_SHAPES_AE = "builtin:shapes"
# how builtin:shapes was trained (`lfm-fast train-ae --data shapes --steps 2500 --latent-noise 0.1 --scale-equivariance 0.5`)
SHAPES_AE_RECIPE = {"steps": 2500, "latent_noise": 0.1, "scale_equivariance": 0.5}


def builtin_autoencoder_path(spec: str) -> str:
    """`builtin:NAME` → the folder of a pretrained AE shipped with the package (see its train_ae.json)."""
    name = spec.removeprefix("builtin:")
    folder = os.path.join(BUILTIN_DIR, name)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        known = sorted(d for d in os.listdir(BUILTIN_DIR)) if os.path.isdir(BUILTIN_DIR) else []
        raise InputError(f"autoencoder {spec}: no such built-in autoencoder (available: {', '.join(f'builtin:{k}' for k in known) or 'none'})")
    return folder


def build_small_autoencoder(latent_channels: int = 4, channels: tuple[int, ...] = (32, 64, 64)):
    """A CPU-trainable AutoencoderKL of the SD-VAE design, downsampling by 2^(len(channels) − 1)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, block_out_channels=tuple(channels),
                         down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                         layers_per_block=1, norm_num_groups=min(32, min(channels)), scaling_factor=1.0)


def load_autoencoder(spec: str, device=None, dtype=torch.float32):
    """A diffusers AutoencoderKL from `builtin:NAME` (shipped with the package), a local folder (config.json +
    weights) or a hub id (online only)."""
    from diffusers import AutoencoderKL

    if spec.startswith("builtin:"):
        spec = builtin_autoencoder_path(spec)
    if os.path.isdir(spec):
        if not os.path.isfile(os.path.join(spec, "config.json")):
            raise InputError(f"autoencoder {spec}: no config.json (expected a diffusers AutoencoderKL folder)")
        try:
            ae = AutoencoderKL.from_pretrained(spec, torch_dtype=dtype, low_cpu_mem_usage=False)
        except (OSError, ValueError) as e:  # a config.json of something else, or no weights beside it
            raise InputError(f"autoencoder {spec}: not a diffusers AutoencoderKL folder ({str(e).splitlines()[0][:160]})") from None
    elif spec.count("/") == 1 and not os.path.exists(spec) and not spec.startswith((".", "/")):
        try:
            ae = AutoencoderKL.from_pretrained(spec, torch_dtype=dtype, low_cpu_mem_usage=False)
        except OSError as e:
            raise InputError(f"autoencoder {spec}: not found locally and could not be fetched from the hub ({e.__class__.__name__})") from None
    else:
        raise InputError(f"autoencoder {spec}: no such folder (expected builtin:shapes, a diffusers AutoencoderKL folder or a hub id like {'stabilityai/sd-vae-ft-mse'})")
    return ae.to(device or default_device()).eval().requires_grad_(False)


def downsample_factor(ae) -> int:
    return 2 ** (len(ae.config.block_out_channels) - 1)


@torch.no_grad()
def encode(ae, images: torch.Tensor, batch_size: int = 64, std: bool = False):
    """Images in [-1, 1] → scaled latents: the posterior mean (deterministic, as cached latents should be), and with
    `std` also the posterior's standard deviation (scaled alike), so that training can draw z = mean + std·ε."""
    p = next(ae.parameters())
    dists = [ae.encode(to_device(images[i:i + batch_size], p.device, p.dtype)).latent_dist for i in range(0, len(images), batch_size)]
    mean = torch.cat([d.mode() for d in dists]).float().cpu() * ae.config.scaling_factor
    if not std:
        return mean
    return mean, torch.cat([d.std for d in dists]).float().cpu() * ae.config.scaling_factor


@torch.no_grad()
def decode(ae, latents: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Scaled latents → images in [-1, 1] (clamped)."""
    p = next(ae.parameters())
    out = [ae.decode(to_device(latents[i:i + batch_size], p.device, p.dtype) / ae.config.scaling_factor).sample
           for i in range(0, len(latents), batch_size)]
    return torch.cat(out).float().cpu().clamp(-1, 1)


def train_autoencoder(images: torch.Tensor, out: str, steps: int = 1000, batch_size: int = 16, lr: float = 2e-3,
                      kl_weight: float = 1e-6, seed: int = 0, channels: tuple[int, ...] = (32, 64, 64),
                      precision: str = "auto", latent_noise: float = 0.0, scale_equivariance: float = 0.0,
                      progress: bool = True, device: str | None = None, overwrite: bool = False) -> dict:
    """Train the built-in AE on images in [-1, 1] (N, 3, H, W) with L1 + MSE reconstruction and a small KL
    (no GAN or LPIPS: the demo data are flat shapes). Saves a diffusers folder at `out` with the measured
    scaling factor; returns the training summary written to `out/train_ae.json`.

    Two regularisers for a latent space a generator can learn ("diffusability"):
    `latent_noise` decodes z + σ·std(z)·ε, so the decoder forgives small latent errors; `scale_equivariance`
    (Skorokhodov et al. 2025) also decodes the 2×-downsampled latent and asks for the 2×-downsampled image,
    which keeps high frequencies out of the latents."""
    check_out_dir(out, overwrite, "train-ae")
    device = torch.device(device or default_device())
    if precision == "auto":  # bf16 autocast makes these convolutions ~10× slower on CPU (oneDNN), faster on GPUs
        precision = "bf16" if device.type == "cuda" else "fp32"
    torch.manual_seed(seed)
    ae = build_small_autoencoder(channels=channels).to(device)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    bar = tqdm(range(steps), desc="train-ae", disable=not progress, mininterval=1)
    for step in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=g)].to(device)
        with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
            post = ae.encode(x).latent_dist
            z = post.mean + post.std * torch.randn(post.mean.shape, generator=g).to(device)
            if latent_noise:
                z = z + latent_noise * post.mean.detach().std() * torch.randn(z.shape, generator=g).to(device)
            rec = ae.decode(z).sample.float()
            loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + kl_weight * post.kl().mean()
            if scale_equivariance:
                small, x_small = ae.decode(F.avg_pool2d(z, 2)).sample.float(), F.avg_pool2d(x, 2)
                loss = loss + scale_equivariance * (F.l1_loss(small, x_small) + F.mse_loss(small, x_small))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0:
            bar.set_postfix(loss=f"{sum(losses[-25:]) / len(losses[-25:]):.4f}")
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        z = encode(ae, images[:2048])
        scale = float(1.0 / z.std())
        ae.register_to_config(scaling_factor=scale)
        rec = decode(ae, z * scale, batch_size=256)
        rec_mse = float(F.mse_loss(rec.cpu(), images[:2048]))
    ae.cpu()
    summary = {"steps": steps, "batch_size": batch_size, "lr": lr, "kl_weight": kl_weight, "latent_noise": latent_noise,
               "scale_equivariance": scale_equivariance, "seed": seed, "channels": list(channels), "precision": precision,
               "num_images": len(images), "torch": torch.__version__, "final_loss": sum(losses[-50:]) / len(losses[-50:]),
               "recon_mse": rec_mse, "scaling_factor": scale, "seconds": time.time() - start}
    with atomic_dir(out, "train-ae", overwrite) as tmp:
        ae.save_pretrained(tmp)
        write_json(os.path.join(tmp, "train_ae.json"), summary)
    return summary
