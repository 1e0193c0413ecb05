"""The conditional tasks at sampling time: inpainting (image + mask → the hole filled, every known pixel kept
exactly) and semantic-map-to-image. Reads the user's inputs (one file, or folders of equally named files),
builds the model's condition as training saw it (`lfm_fast.data.latents.prepare_latents`), composites, and lays
out the side-by-side grid (input | mask or map | outputs)."""

from __future__ import annotations

import colorsys
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from lfm_fast.data.folder import list_images
from lfm_fast.errors import InputError
from lfm_fast.fileio import image_grid

TASKS = ("inpaint", "semantic")


def _files(flag: str, path: str) -> dict[str, str]:
    """{name: path}: one file, or every image of a folder (sorted by name; other files skipped with a warning)."""
    if os.path.isfile(path):
        return {os.path.basename(path): path}
    if not os.path.isdir(path):
        raise InputError(f"{flag} {path}: no such file or folder")
    paths, others = list_images(path)
    files = {os.path.basename(p): p for p in paths}
    if not files:
        raise InputError(f"{flag} {path}: no images in this folder")
    skipped = [os.path.basename(p) for p in others]
    if skipped:
        warnings.warn(f"{flag} {path}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} that "
                      f"{'are' if len(skipped) > 1 else 'is'} not an image ({', '.join(skipped[:3])}"
                      f"{', …' if len(skipped) > 3 else ''})")
    return files


def _read(flag: str, path: str, mode: str | None, size: int) -> np.ndarray:
    try:
        with Image.open(path) as img:
            if mode == "ids":  # class ids: palette indices or grey values, not colours
                if img.mode not in ("P", "L", "I", "I;16"):
                    raise InputError(f"{flag} {path}: an image of mode {img.mode}; expected a palette or grey PNG whose "
                                     f"pixel values are class ids")
                arr = np.array(img).astype(np.int64)
            else:
                arr = np.array(img.convert(mode))
    except InputError:
        raise
    except (OSError, ValueError) as e:
        raise InputError(f"{flag} {path}: cannot read it as an image ({e.__class__.__name__})") from None
    if arr.shape[:2] != (size, size):
        raise InputError(f"{flag} {path} is {arr.shape[1]}×{arr.shape[0]}; this checkpoint works at {size}×{size}")
    return arr


def read_inpaint_inputs(image: str, mask: str, size: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(names, images uint8 (N, H, W, 3), holes bool (N, H, W)): MASK white = hole; folders pair files by name."""
    images, masks = _files("--image", image), _files("--mask", mask)
    if os.path.isfile(mask):  # one mask for every image
        masks = dict.fromkeys(images, mask)
    missing = [n for n in images if n not in masks]
    if missing:
        raise InputError(f"--mask {mask}: no mask named {missing[0]} for --image {images[missing[0]]} (folders pair files "
                         f"by name)")
    unused = [n for n in masks if n not in images]
    if unused:
        warnings.warn(f"--mask {mask}: {len(unused)} mask{'s' if len(unused) > 1 else ''} without an image of the same "
                      f"name, not used ({', '.join(unused[:3])}{', …' if len(unused) > 3 else ''})")
    names = list(images)
    pixels = np.stack([_read("--image", images[n], "RGB", size) for n in names])
    holes = np.stack([_read("--mask", masks[n], "L", size) > 127 for n in names])
    check_holes(holes, [f"--mask {masks[n]}" for n in names])
    return names, pixels, holes


def check_holes(holes: np.ndarray, names: list[str]) -> None:
    """Every mask has a hole and keeps part of the image; `names` say which mask in the error."""
    for name, h in zip(names, holes):
        if not h.any():
            raise InputError(f"{name} has no hole (all black): there is nothing to inpaint")
        if h.all():
            raise InputError(f"{name} is all hole (all white): nothing is known, so this is unconditional "
                             f"generation; give a mask that keeps part of the image")


def read_semantic_inputs(semantic: str, size: int, num_classes: int) -> tuple[list[str], np.ndarray]:
    """(names, class-id maps int64 (N, H, W)) from palette or grey PNGs."""
    files = _files("--semantic", semantic)
    maps = np.stack([_read("--semantic", p, "ids", size) for p in files.values()])
    for (n, p), m in zip(files.items(), maps):
        if m.max() >= num_classes or m.min() < 0:
            bad = m.max() if m.max() >= num_classes else m.min()
            raise InputError(f"--semantic {p}: class id {bad} out of range; this checkpoint knows ids 0..{num_classes - 1}")
    return list(files), maps


@torch.no_grad()
def inpaint_condition(ae, images: np.ndarray, holes: np.ndarray, factor: int, batch_size: int = 64) -> torch.Tensor:
    """[latent of the image with its holes grey, each latent cell's share of hole pixels (the mask average-pooled to
    the latent grid, in steps of 1/255)], as `prepare` stores it."""
    from lfm_fast.data.masks import masked_image_condition
    from lfm_fast.data.images import to_tensor

    return torch.cat(masked_image_condition(ae, to_tensor(images), torch.from_numpy(holes), factor, batch_size), dim=1)


def semantic_condition(maps: np.ndarray, num_classes: int) -> torch.Tensor:
    return F.one_hot(torch.from_numpy(maps).long(), num_classes).permute(0, 3, 1, 2).float()


def composite(generated: np.ndarray, images: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Generated pixels in the holes, the input's everywhere else (exactly)."""
    return np.where(holes[..., None], generated, images)


def palette(num_classes: int) -> np.ndarray:
    """A colour per class id (0 black, the others evenly spaced hues), uint8 (K, 3)."""
    hues = [colorsys.hsv_to_rgb(k / max(1, num_classes - 1), 0.75, 0.95) for k in range(num_classes - 1)]
    return (np.array([(0, 0, 0), *hues]) * 255).round().astype(np.uint8)


def task_grid(outputs: np.ndarray, source: np.ndarray, inputs: list[np.ndarray], max_per_row: int = 8) -> np.ndarray:
    """One row per input: its input panels (image, mask or map), then up to `max_per_row` of its outputs."""
    per = [outputs[source == j][:max_per_row] for j in range(len(inputs[0]))]
    width = len(inputs) + max(len(p) for p in per)
    blank = np.full_like(outputs[0], 255)
    cells = []
    for j, outs in enumerate(per):
        row = [panel[j] for panel in inputs] + list(outs)
        cells += row + [blank] * (width - len(row))
    return image_grid(np.stack(cells), nrow=width)
