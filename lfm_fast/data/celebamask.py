"""`celebamask:PATH`: CelebAMask-HQ as it ships — `CelebA-HQ-img/{i}.jpg` (1024²) and, per image, one binary
PNG per face part at 512², `CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png` — merged into one map of 19
classes (0 background, then the parts below), as LFM's `preprocess_celeb_mask.py` merges them: parts in its order,
a later part overwriting an earlier one where they overlap (LFM tests the palette index of white; on these 0/255
masks that is "nonzero"). `?split=train` (the default) is LFM's training set, images 0–26,999;
`?split=validation` the rest; `?split=all` every image. A folder of maps merged already (`CelebAMask-HQ-mask/
{i}.png`, class ids as grey values) is read instead when the per-part folder is absent. Images are resized as ADM
resizes them; maps with nearest-neighbour sampling to the same size."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from lfm_fast.data.images import ImageSource, UnreadableImage, load_image
from lfm_fast.errors import InputError

PARTS = ("skin", "l_brow", "r_brow", "l_eye", "r_eye", "eye_g", "l_ear", "r_ear", "ear_r", "nose", "mouth", "u_lip",
         "l_lip", "neck", "neck_l", "cloth", "hair", "hat")  # LFM's preprocess_celeb_mask.py: class k + 1 = PARTS[k]
TRAIN_IMAGES = 27_000  # LFM trains on images 0–26,999 and validates on 27,000–29,999
NUM_CLASSES = len(PARTS) + 1  # + background


def merge_parts(part_masks: dict[str, np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """{part: mask (nonzero = part)} → uint8 class map; later parts of PARTS win where they overlap."""
    out = np.zeros(shape, np.uint8)
    for k, part in enumerate(PARTS):
        if part in part_masks:
            out[part_masks[part] != 0] = k + 1
    return out


class CelebAMaskDataset(ImageSource):
    semantic_classes = NUM_CLASSES

    def __init__(self, root: str, image_size: int, split: str | None = None):
        self.root, self.image_size = root, image_size
        img_dir = os.path.join(root, "CelebA-HQ-img")
        self.anno, self.merged = os.path.join(root, "CelebAMask-HQ-mask-anno"), os.path.join(root, "CelebAMask-HQ-mask")
        if not os.path.isdir(img_dir):
            raise InputError(f"celebamask:{root}: no CelebA-HQ-img folder (expected CelebAMask-HQ's layout: CelebA-HQ-img/ "
                             f"and CelebAMask-HQ-mask-anno/)")
        if not os.path.isdir(self.anno) and not os.path.isdir(self.merged):
            raise InputError(f"celebamask:{root}: no CelebAMask-HQ-mask-anno folder (nor merged maps in CelebAMask-HQ-mask)")
        ids = sorted(int(f[:-4]) for f in os.listdir(img_dir) if f.endswith(".jpg") and f[:-4].isdigit())
        if not ids:
            raise InputError(f"celebamask:{root}: no images named <index>.jpg in CelebA-HQ-img")
        split = split or "train"
        if split not in ("train", "validation", "all"):
            raise InputError(f"celebamask:{root}?split={split}: expected train, validation or all")
        self.ids = [i for i in ids if split == "all" or (i < TRAIN_IMAGES) == (split == "train")]
        if not self.ids:
            raise InputError(f"celebamask:{root}?split={split}: no images of that split")
        self.classes = []

    def __len__(self):
        return len(self.ids)

    def key(self, i: int) -> str:
        return f"CelebA-HQ-img/{self.ids[i]}.jpg"

    def _part_files(self, idx: int) -> dict[str, str]:
        folder = os.path.join(self.anno, str(idx // 2000))
        return {p: f for p in PARTS if os.path.isfile(f := os.path.join(folder, f"{idx:05d}_{p}.png"))}

    def read_map(self, idx: int) -> np.ndarray:
        """The merged class map of image `idx` at the annotation's resolution."""
        if not os.path.isdir(self.anno):
            with Image.open(os.path.join(self.merged, f"{idx}.png")) as m:
                return np.asarray(m.convert("L"), np.uint8).copy()
        masks, files = {}, self._part_files(idx)
        if not files:
            raise OSError(f"no part masks {idx:05d}_*.png in {os.path.join(self.anno, str(idx // 2000))}")
        for part, path in files.items():
            with Image.open(path) as m:
                a = np.asarray(m)
                masks[part] = a[..., 0] if a.ndim == 3 else a
        return merge_parts(masks, next(iter(masks.values())).shape)

    def read(self, i: int):
        idx = self.ids[i]
        image = load_image(os.path.join(self.root, self.key(i)), self.image_size, self.key(i))
        try:
            m = self.read_map(idx)
        except (OSError, ValueError) as e:
            raise UnreadableImage(self.key(i), f"its mask: {e.__class__.__name__}: {e}") from None
        if m.max() >= NUM_CLASSES:
            raise UnreadableImage(self.key(i), f"its map has class {m.max()} (expected < {NUM_CLASSES})")
        sem = np.asarray(Image.fromarray(m).resize((self.image_size, self.image_size), Image.NEAREST))
        return image, 0, sem

    def describe(self) -> str:
        return f"celebamask:{self.root}"
