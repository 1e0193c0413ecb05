"""Datasets: the embedded `shapes`, image folders, and the latent shards that training reads."""

from __future__ import annotations

from lfm_fast.data.folder import ImageFolderDataset
from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset


def open_image_dataset(spec: str, image_size: int = 32, num_images: int = 6000, seed: int = 0):
    """A data SPEC: "shapes" (procedural) or a path to an image folder. Returns (dataset, class_names)."""
    if spec == "shapes":
        return ShapesDataset(num_images, image_size, seed), list(SHAPE_CLASSES)
    ds = ImageFolderDataset(spec, image_size)
    return ds, ds.classes
