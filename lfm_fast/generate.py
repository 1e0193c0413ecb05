"""Checkpoint → images: per-image seeded noise, ODE sampling with CFG, AE decoding, and the output files
of `lfm-fast sample` (one PNG per image, grid.png, samples.npz in the ADM evaluator's layout)."""

from __future__ import annotations

import os

import numpy as np
import torch
from tqdm.auto import tqdm

from lfm_fast.autoencoder import decode
from lfm_fast.data.shapes import to_uint8
from lfm_fast.fileio import atomic_path, image_grid, save_png
from lfm_fast.sampling import SampleConfig, per_image_noise, sample


@torch.no_grad()
def generate(run_batch, labels: torch.Tensor | None, seeds: list[int], shape: tuple[int, ...], batch_size: int = 64,
             device="cpu", dtype=torch.float32, progress: bool = True) -> torch.Tensor:
    """Outputs of `run_batch(noise, labels)` for each (label, seed), batch by batch; image i depends on
    seeds[i] and labels[i] only, whatever the batch size or the backend that runs the batch."""
    out = []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress, mininterval=1):
        noise = per_image_noise(seeds[i:i + batch_size], shape, device=device, dtype=dtype)
        y = None if labels is None else labels[i:i + batch_size].to(device)
        out.append(torch.as_tensor(run_batch(noise, y)).cpu())
    return torch.cat(out)


def generate_latents(model, labels: torch.Tensor | None, seeds: list[int], cfg: SampleConfig, batch_size: int = 64,
                     progress: bool = True) -> tuple[torch.Tensor, int]:
    """Eager sampling with any solver. Returns (latents, NFE per batch)."""
    mc = model.config
    p = next(model.parameters())
    nfe = 0

    def run(noise, y):
        nonlocal nfe
        res = sample(model, noise, y, solver=cfg.solver, steps=cfg.steps, cfg=cfg.cfg, grid=cfg.grid, shift=cfg.shift,
                     atol=cfg.atol, rtol=cfg.rtol)
        nfe = max(nfe, res.nfe)
        return res.latents.float()

    latents = generate(run, labels, seeds, (mc.in_channels, mc.input_size, mc.input_size), batch_size, p.device, p.dtype, progress)
    return latents, nfe


def latents_to_images(ae, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Scaled latents → uint8 (N, H, W, 3)."""
    return to_uint8(decode(ae, latents, batch_size))


def write_sample_folder(folder: str, images: np.ndarray, labels: np.ndarray | None) -> None:
    """`{index:06d}_class{label}.png` per image, `grid.png`, and `samples.npz` (arr_0, labels)."""
    labs = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels, np.int64)
    for i, (img, lab) in enumerate(zip(images, labs)):
        name = f"{i:06d}_class{lab}.png" if lab >= 0 else f"{i:06d}.png"
        save_png(os.path.join(folder, name), img)
    save_png(os.path.join(folder, "grid.png"), image_grid(images[:256]), upscale=max(1, 128 // images.shape[1]))
    with atomic_path(os.path.join(folder, "samples.npz")) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, arr_0=images, labels=labs)
