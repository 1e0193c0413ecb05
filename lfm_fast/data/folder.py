"""Image folders, searched recursively: class sub-folders → labels (torchvision's ImageFolder layout, which is
also ImageNet's train folder of synset folders); a folder of images without sub-folders is one unconditional set.

Class index k is the k-th class folder name in code-point order (Python's `sorted`, never the locale's), so the map
is the same on every machine and for every listing order; for ImageNet's synset folders it is the order DiT and
ADM use (DiT: torchvision's ImageFolder; ADM: the sorted synset prefixes of the file names). `prepare` saves it
in meta.json (`class_names`)."""

from __future__ import annotations

import os
import warnings

from lfm_fast.data.images import IMAGE_EXTENSIONS, ImageSource, load_image
from lfm_fast.errors import InputError


def list_images(folder: str, recursive: bool = False) -> tuple[list[str], list[str]]:
    """(image paths, other files) in a folder (and its sub-folders if `recursive`), each sorted; hidden files and
    folders aside. Like torchvision's ImageFolder, files that are not images are skipped (`warn_skipped` says how
    many), not an error."""
    images, others = [], []
    for top, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if recursive else []
        for f in sorted(files):
            if not f.startswith("."):
                (images if f.lower().endswith(IMAGE_EXTENSIONS) else others).append(os.path.join(top, f))
    return sorted(images), sorted(others)


def warn_skipped(root: str, skipped: list[str]) -> None:
    if skipped:
        skipped = sorted(skipped)
        names = ", ".join(os.path.relpath(p, root) for p in skipped[:3]) + (", …" if len(skipped) > 3 else "")
        warnings.warn(f"image folder {root}: skipped {len(skipped)} file{'s' if len(skipped) > 1 else ''} ({names}): only "
                      f"images ({', '.join(IMAGE_EXTENSIONS)}) are read, and only from the class sub-folders if there "
                      f"are any", stacklevel=3)


class ImageFolderDataset(ImageSource):
    """Items are (image in [-1, 1] (3, size, size), label); label 0 for an unconditional folder."""

    def __init__(self, root: str, image_size: int):
        if not os.path.isdir(root):
            hint = " (a data SPEC is shapes, PATH, lmdb:PATH or celebamask:PATH)" if ":" in root else ""
            raise InputError(f"image folder {root}: no such folder{hint}")
        self.root, self.image_size = root, image_size
        subdirs = sorted(d for d in os.listdir(root) if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
        beside = [os.path.join(root, f) for f in sorted(os.listdir(root))
                  if not f.startswith(".") and os.path.isfile(os.path.join(root, f))] if subdirs else []
        self.classes, self.samples, others = subdirs, [], list(beside)  # files beside class folders are not read
        for k, folder in enumerate([os.path.join(root, d) for d in subdirs] or [root]):
            images, rest = list_images(folder, recursive=True)
            self.samples += [(p, k) for p in images]
            others += rest
        warn_skipped(root, others)
        self.skipped = [{"path": os.path.relpath(p, root), "reason": "not an image file" if p not in beside else
                         "beside the class folders"} for p in sorted(others)]
        if not self.samples:
            lmdb = any(os.path.exists(os.path.join(root, n)) for n in ("data.mdb", "train.lmdb"))
            raise InputError(f"image folder {root}: no images found{'; it holds an LMDB: did you mean lmdb:' + root + '?' if lmdb else ''}")

    def __len__(self):
        return len(self.samples)

    def key(self, i: int) -> str:
        return os.path.relpath(self.samples[i][0], self.root)

    def read(self, i: int):
        path, label = self.samples[i]
        return load_image(path, self.image_size, self.key(i)), label, None

    def describe(self) -> str:
        return f"image folder {self.root}"
