"""Atomic outputs: write to a temporary path beside the target, rename when complete.

A crash or a bad input therefore never leaves a half-written file or folder behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile


@contextlib.contextmanager
def atomic_path(path: str):
    """Yield a temporary file path; on success it replaces `path`, on error it is removed."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str, obj) -> None:
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


@contextlib.contextmanager
def atomic_dir(path: str):
    """Yield a temporary folder; on success it takes the place of `path` (replacing an older one)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=os.path.dirname(path))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
        os.replace(path, os.path.join(old, "x"))
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def image_grid(images, nrow: int | None = None):
    """uint8 (N, H, W, 3) → one uint8 grid image with a 2-pixel border, `nrow` images per row."""
    import math

    import numpy as np

    n, h, w, c = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    pad = 2
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = images[i]
    return grid


def save_png(path: str, array, upscale: int = 1, row_labels: list[str] | None = None) -> None:
    """Save a uint8 (H, W, 3) array as PNG (atomically), optionally enlarged with nearest-neighbour.
    `row_labels`: one name per row of an `image_grid`, written in a white margin at the row starts."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.fromarray(array)
    if upscale > 1:
        img = img.resize((img.width * upscale, img.height * upscale), Image.NEAREST)
    if row_labels:
        font = ImageFont.load_default(size=14)
        margin = 12 + max(int(ImageDraw.Draw(img).textlength(t, font=font)) for t in row_labels)
        labelled = Image.new("RGB", (img.width + margin, img.height), "white")
        labelled.paste(img, (margin, 0))
        draw, row_h = ImageDraw.Draw(labelled), img.height / len(row_labels)
        for r, text in enumerate(row_labels):
            draw.text((6, (r + 0.5) * row_h), text, fill="black", font=font, anchor="lm")
        img = labelled
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")


def portable_path(spec: str, base: str) -> str:
    """A local path is stored relative to `base` (so a run folder can move); anything else (a hub id) as is."""
    return os.path.relpath(os.path.abspath(spec), os.path.abspath(base)) if os.path.isdir(spec) else spec


def resolve_path(spec: str, base: str) -> str:
    """Inverse of `portable_path`: a path relative to `base` if that exists, else `spec` unchanged."""
    candidate = os.path.normpath(os.path.join(base, spec))
    return candidate if spec and os.path.isdir(candidate) else spec
