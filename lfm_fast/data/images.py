"""What every image source shares: decoding any image file to RGB, ADM's resolution handling, and the item
interface that `prepare` reads (`key`, `read`) and `train-ae` indexes (`ds[i]` → image in [-1, 1], label)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC → float NCHW in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] → uint8 NHWC."""
    return images.float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class UnreadableImage(Exception):
    """An item that cannot be decoded; `key` names it (a path relative to the source, or an LMDB key)."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason = key, reason


def open_rgb(src) -> Image.Image:
    """A file path, file object or encoded bytes → an 8-bit RGB image as a viewer shows it: the EXIF orientation
    applied, grey-scale and palette images expanded, 16-bit grey-scale scaled to 8 bits (PIL's convert would clip
    it), alpha dropped as ADM's `convert("RGB")` drops it. Raises UnidentifiedImageError/OSError/ValueError."""
    with Image.open(io.BytesIO(src) if isinstance(src, (bytes, memoryview)) else src) as img:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode in _SIXTEEN_BIT:
            a = np.asarray(img, dtype=np.float64)
            a = a / 257.0 if a.max() > 255 else a
            img = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        return img.convert("RGB")


def center_crop_arr(img: Image.Image, size: int) -> np.ndarray:
    """ADM's resolution handling (guided_diffusion's `center_crop_arr`, which DiT and LFM use): halve with BOX
    filtering while the short side is at least 2·size, resize so the short side is `size` (BICUBIC, the long side
    rounded), then crop the centre. Returns uint8 (size, size, 3)."""
    while min(img.size) >= 2 * size:
        img = img.resize(tuple(x // 2 for x in img.size), resample=Image.BOX)
    scale = size / min(img.size)
    img = img.resize(tuple(round(x * scale) for x in img.size), resample=Image.BICUBIC)
    arr = np.array(img)  # a writable copy (torch.from_numpy warns on PIL's read-only buffer)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return np.ascontiguousarray(arr[top:top + size, left:left + size])


def load_image(src, size: int, key: str) -> np.ndarray:
    """Decode and resize one image (uint8 (size, size, 3)); UnreadableImage naming `key` if it cannot be read."""
    try:
        return center_crop_arr(open_rgb(src), size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise UnreadableImage(key, f"{e.__class__.__name__}: {e}") from None


def to_unit(arr: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) → float (3, H, W) in [-1, 1]."""
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageSource(Dataset):
    """A dataset of images, read one by one. Subclasses set `classes` (index → name; empty: unconditional) and
    `semantic_classes` (0: no maps) and implement `__len__`, `key(i)` and `read(i)` → (uint8 image (S, S, 3), label,
    uint8 semantic map (S, S) or None), raising UnreadableImage."""

    classes: list[str] = []
    semantic_classes: int = 0
    skipped: list[dict] = []  # files seen while listing and not read (not images), as prepare_report.json lists them

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def key(self, i: int) -> str:
        raise NotImplementedError

    def read(self, i: int):
        raise NotImplementedError

    def __getitem__(self, i):
        from lfm_fast.errors import InputError

        try:
            image, label, _ = self.read(i)
        except UnreadableImage as e:
            raise InputError(f"{self.describe()}: cannot read {e.key} ({e.reason})") from None
        return to_unit(image), torch.tensor(label)

    def describe(self) -> str:
        return type(self).__name__
