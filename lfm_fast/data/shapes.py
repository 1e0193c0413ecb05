"""`shapes`: the embedded, procedural dataset (deterministic by seed; nothing to download).

Each RGB image holds one shape on a dark gradient background; the class fixes both the shape kind
and its hue, so a class is recognisable by either. Every image comes with its label and a per-pixel
semantic map (0 = background, k + 1 = shape kind k) for the conditional tasks.
"""

from __future__ import annotations

import numpy as np
import torch

from lfm_fast.data.images import ImageSource, to_tensor

SHAPE_CLASSES = ("circle", "square", "triangle", "diamond", "cross", "ring")
SHAPE_COLORS = np.array([
    (0.95, 0.20, 0.20),  # red
    (0.20, 0.85, 0.30),  # green
    (0.25, 0.40, 1.00),  # blue
    (1.00, 0.90, 0.20),  # yellow
    (0.95, 0.30, 0.90),  # magenta
    (0.20, 0.90, 0.95),  # cyan
])
NUM_SEMANTIC = len(SHAPE_CLASSES) + 1  # + background
SEMANTIC_PALETTE = np.round(255 * np.vstack([(0, 0, 0), SHAPE_COLORS])).astype(np.uint8)  # map id → its class's colour


def _box_sdf(px, py, hx, hy):
    qx, qy = np.abs(px) - hx, np.abs(py) - hy
    return np.hypot(np.maximum(qx, 0), np.maximum(qy, 0)) + np.minimum(np.maximum(qx, qy), 0)


def shape_sdf(kind: int, px: np.ndarray, py: np.ndarray, r: float, angle: float) -> np.ndarray:
    """Signed distance (pixels, negative inside) to shape `kind` of size r centred at the origin."""
    c, s = np.cos(angle), np.sin(angle)
    x, y = c * px + s * py, -s * px + c * py
    name = SHAPE_CLASSES[kind]
    if name == "circle":
        return np.hypot(x, y) - r
    if name == "square":
        return _box_sdf(x, y, 0.8 * r, 0.8 * r)
    if name == "triangle":  # intersection of three half-planes: circumradius 1.2 r
        a = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.max([-(x * np.cos(t) + y * np.sin(t)) for t in a], axis=0) - 0.6 * r
    if name == "diamond":
        a, b = 1.25 * r, 0.7 * r  # an elongated rhombus, so it is no rotated square
        return (np.abs(x) / a + np.abs(y) / b - 1) * (a * b / np.hypot(a, b))
    if name == "cross":
        return np.minimum(_box_sdf(x, y, r, 0.32 * r), _box_sdf(x, y, 0.32 * r, r))
    if name == "ring":
        return np.abs(np.hypot(x, y) - 0.72 * r) - 0.28 * r
    raise ValueError(kind)


def make_shapes(num: int, size: int = 32, seed: int = 0, random_colours: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images (N, size, size, 3) uint8, labels (N,) int64, semantic maps (N, size, size) uint8.
    `random_colours`: every shape gets a random hue, saturation and value instead of its class colour (the
    data of the colour-blind judge: the same shapes, with no class information left in colour)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(SHAPE_CLASSES), num)
    radius = rng.uniform(0.22, 0.36, num) * size
    margin = 0.9 * radius[:, None]  # keep most of the shape inside the frame
    centre = rng.uniform(margin, size - margin, (num, 2))
    angle = rng.uniform(0, 2 * np.pi, num)
    jitter = rng.uniform(-0.08, 0.08, (num, 3))
    bg_top, bg_bottom = rng.uniform(0.0, 0.35, (num, 3)), rng.uniform(0.0, 0.35, (num, 3))
    colours = random_colour(rng, num) if random_colours else SHAPE_COLORS[labels]

    coords = np.arange(size) + 0.5
    py, px = np.meshgrid(coords, coords, indexing="ij")
    ramp = (py / size)[..., None]
    images = np.empty((num, size, size, 3), np.uint8)
    semantic = np.empty((num, size, size), np.uint8)
    for i in range(num):
        sdf = shape_sdf(labels[i], px - centre[i, 0], py - centre[i, 1], radius[i], angle[i])
        cover = np.clip(0.5 - sdf, 0.0, 1.0)[..., None]  # one-pixel anti-aliased edge
        bg = (1 - ramp) * bg_top[i] + ramp * bg_bottom[i]
        colour = np.clip(colours[i] + jitter[i], 0, 1)
        images[i] = np.round(255 * (bg * (1 - cover) + colour * cover)).astype(np.uint8)
        semantic[i] = np.where(cover[..., 0] > 0.5, labels[i] + 1, 0)
    return images, labels.astype(np.int64), semantic


def random_colour(rng: np.random.Generator, num: int) -> np.ndarray:
    """Bright colours of any hue (HSV: hue uniform, saturation 0.2–1, value 0.65–1) → RGB (num, 3)."""
    h, sat, v = rng.uniform(0, 6, num), rng.uniform(0.2, 1.0, num), rng.uniform(0.65, 1.0, num)
    k = (np.array([5, 3, 1])[None, :] + h[:, None]) % 6
    return v[:, None] * (1 - sat[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1))


class ShapesDataset(ImageSource):
    """Items are (image in [-1, 1] (3, H, W), label); `semantic` holds the maps."""

    classes = list(SHAPE_CLASSES)
    semantic_classes = NUM_SEMANTIC

    def __init__(self, num_images: int = 6000, image_size: int = 32, seed: int = 0, random_colours: bool = False):
        self._uint8, labels, semantic = make_shapes(num_images, image_size, seed, random_colours)
        self.images = to_tensor(self._uint8)
        self.labels = torch.from_numpy(labels)
        self.semantic = torch.from_numpy(semantic)

    def __len__(self):
        return len(self.labels)

    def key(self, i: int) -> str:
        return f"shapes/{i}"

    def read(self, i: int):
        return self._uint8[i], int(self.labels[i]), self.semantic[i].numpy()

    def __getitem__(self, i):
        return self.images[i], self.labels[i]

    def describe(self) -> str:
        return "shapes"
