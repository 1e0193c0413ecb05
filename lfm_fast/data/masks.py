"""Inpainting masks in the style LFM trained with (LaMa's generator): irregular brush strokes and boxes, mixed,
with the hole ratio drawn from a range. True = hole (unknown pixels). Mask i depends on (seed, i) alone."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

MASK_KINDS = ("mixed", "strokes", "boxes")
MASK_LEVELS = 255  # a latent cell's hole share is stored in uint8, in steps of 1/255


def _stroke(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, scale: float) -> None:
    """A brush stroke: a polyline of 1–5 segments at random angles, 3–12 % of the side wide, round joints."""
    width = max(1, int(rng.uniform(0.03, 0.12) * size * scale))
    x, y = rng.uniform(0, size, 2)
    for _ in range(int(rng.integers(1, 6))):
        angle, length = rng.uniform(0, 2 * math.pi), rng.uniform(0.1, 0.45) * size * scale
        nx, ny = np.clip(x + length * math.cos(angle), 0, size - 1), np.clip(y + length * math.sin(angle), 0, size - 1)
        draw.line([(x, y), (nx, ny)], fill=255, width=width)
        draw.ellipse([nx - width / 2, ny - width / 2, nx + width / 2, ny + width / 2], fill=255)
        x, y = nx, ny


def _box(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, scale: float) -> None:
    w, h = rng.uniform(0.1, 0.5, 2) * size * scale
    x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
    draw.rectangle([x0, y0, x0 + w, y0 + h], fill=255)


def random_mask(size: int, rng: np.random.Generator, hole_range: tuple[float, float] = (0.1, 0.6),
                kind: str = "mixed") -> np.ndarray:
    """A (size, size) bool hole mask whose hole ratio lies in `hole_range`: a target ratio is drawn uniformly from
    the range, and strokes and/or boxes are added one at a time until the hole reaches it; a piece that would
    pass the high end is dropped and the next pieces are drawn smaller."""
    lo, hi = hole_range
    if not 0 <= lo <= hi <= 1 or hi <= 0:
        raise ValueError(f"hole_range {hole_range}: expected 0 ≤ low ≤ high ≤ 1 and high > 0")
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r}: expected one of {', '.join(MASK_KINDS)}")
    mask, scale, target = np.zeros((size, size), bool), 1.0, rng.uniform(lo, hi)
    for _ in range(10_000):
        img = Image.new("L", (size, size))
        use_stroke = kind == "strokes" or (kind == "mixed" and rng.random() < 0.5)
        (_stroke if use_stroke else _box)(ImageDraw.Draw(img), rng, size, scale)
        candidate = mask | (np.asarray(img) > 127)
        if candidate.mean() <= hi:
            mask = candidate
            # the target, or the range once pieces are down to a few pixels (the target may sit between pixel counts)
            if mask.any() and (mask.mean() >= target or (scale < 0.05 and mask.mean() >= lo)):
                return mask
        else:
            scale *= 0.8
    raise ValueError(f"no {size}×{size} mask has a hole ratio in {hole_range}: widen the range")


def masked_image_condition(ae, images, holes, factor: int, batch_size: int = 64):
    """Inpainting's condition, the one way `prepare` stores it and `sample` builds it: images in [-1, 1] (B, 3, H, W)
    with their holes (B, H, W bool) grey → (latent of the masked image (B, C, h, w), the holes average-pooled to the
    latent grid (B, 1, h, w) float: the share of each cell's pixels that are hole, so a cell crossed by a thin stroke
    still says how much of it is known; in steps of 1/MASK_LEVELS, as `prepare` stores it in uint8)."""
    import torch
    import torch.nn.functional as F

    from lfm_fast.autoencoder import encode

    with torch.no_grad():
        latents = encode(ae, images * (~holes[:, None]).float(), batch_size)
    return latents, (F.avg_pool2d(holes[:, None].float(), factor) * MASK_LEVELS).round() / MASK_LEVELS


def make_masks(num: int, size: int, seed: int = 0, hole_range: tuple[float, float] = (0.1, 0.6),
               kind: str = "mixed", start: int = 0) -> np.ndarray:
    """Masks start … start + num − 1 of a seed's sequence, (num, size, size) bool; mask i is drawn from a generator
    seeded by (seed, i)."""
    return np.stack([random_mask(size, np.random.default_rng([seed, i]), hole_range, kind) for i in range(start, start + num)])
