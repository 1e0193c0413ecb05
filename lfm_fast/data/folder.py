"""Image folders: class sub-folders → labels (torchvision's ImageFolder layout); a folder of images
without sub-folders is one unconditional set. Images are centre-cropped and resized (ADM's recipe)."""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from lfm_fast.errors import InputError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(folder: str) -> tuple[list[str], list[str]]:
    """(image paths, other files) of a folder, sorted; hidden files and sub-folders aside. Like torchvision's
    ImageFolder, files that are not images are skipped (`warn_skipped` says how many), not an error."""
    files = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    paths = [os.path.join(folder, f) for f in files if os.path.isfile(os.path.join(folder, f))]
    return [p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS)], [p for p in paths if not p.lower().endswith(IMAGE_EXTENSIONS)]


def warn_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        skipped = sorted(skipped)
        names = ", ".join(os.path.relpath(p, root) for p in skipped[:3]) + (", …" if len(skipped) > 3 else "")
        warnings.warn(f"image folder {root}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} ({names}): only "
                      f"images ({', '.join(IMAGE_EXTENSIONS)}) are read, and only from the class sub-folders if there "
                      f"are any", stacklevel=2)


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
        self.classes, self.samples, skipped = subdirs, [], sum(list_images(root), []) if subdirs else []  # beside classes
        for k, folder in enumerate([os.path.join(root, d) for d in subdirs] or [root]):
            images, others = list_images(folder)
            self.samples += [(p, k) for p in images]
            skipped += others
        warn_skipped(root, skipped)
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
