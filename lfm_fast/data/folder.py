"""Image folders: class sub-folders → labels (torchvision's ImageFolder layout); a folder of images
without sub-folders is one unconditional set. Images are centre-cropped and resized (ADM's recipe)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lfm_fast.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(folder: str) -> list[str]:
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    paths = [os.path.join(folder, f) for f in files if os.path.isfile(os.path.join(folder, f))]
    for p in paths:
        if not p.lower().endswith(IMAGE_EXTENSIONS):
            raise InputError(f"image folder: {p} is not an image (expected {', '.join(IMAGE_EXTENSIONS)})")
    return paths


def center_crop_resize(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    s = min(img.size)
    left, top = (img.width - s) // 2, (img.height - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)
    return np.array(img, dtype=np.uint8)


class ImageFolderDataset(Dataset):
    """Items are (image in [-1, 1] (3, size, size), label); label 0 for an unconditional folder."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            raise InputError(f"image folder {root}: no such folder")
        self.image_size = image_size
        subdirs = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        if subdirs:
            self.classes = subdirs
            self.samples = [(p, k) for k, d in enumerate(subdirs) for p in list_images(os.path.join(root, d))]
        else:
            self.classes = []
            self.samples = [(p, 0) for p in list_images(root)]
        if not self.samples:
            raise InputError(f"image folder {root}: no images found")

    @property
    def num_classes(self) -> int:
        """0 for an unconditional folder (no class sub-folders)."""
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                arr = center_crop_resize(img, self.image_size)
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"image folder: cannot read {path} as an image ({e.__class__.__name__})") from None
        return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0), torch.tensor(label)
