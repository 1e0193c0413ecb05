"""Domain metrics for the shapes demo: small CNN classifiers that check that generated images show the
class they were asked for.

Two judges: the *classifier* is trained on real shapes, where each class also has its own hue, so it may
read colour alone; the *shape judge* is trained on shapes of random colours with shuffled channels
(drawn from a seed the generator never sees), so it can only read the shape. A sample that has the right
colour but the wrong outline passes the first and fails the second."""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


JUDGE_SEED = 10_000  # the shape judge's data: far from the generator's seeds (the demo's seed, seed + 1)
JUDGES_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "judges")


class ShapesClassifier(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features: what the shape-judge Fréchet distance compares."""
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, colour_blind: bool = False, progress: bool = True) -> ShapesClassifier:
    """Images in [-1, 1]; light augmentation (flips, small noise) so it also reads slightly blurred samples.
    `colour_blind` also permutes each image's RGB channels at random and blurs by a random amount (a judge that
    shall not read colour, and shall credit a slightly soft outline but not a blob)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    clf = ShapesClassifier(num_classes)
    opt = torch.optim.AdamW(clf.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    for _ in tqdm(range(steps), desc="classifier", disable=not progress, mininterval=1):
        idx = torch.randint(0, len(images), (batch_size,), generator=g)
        x = images[idx]
        if torch.rand(1, generator=g) < 0.5:
            x = x.flip(3)
        if colour_blind:
            perm = torch.argsort(torch.rand(batch_size, 3, generator=g), dim=1)
            x = torch.take_along_dim(x, perm[:, :, None, None], dim=1)
            blur = torch.rand(batch_size, 1, 1, 1, generator=g) * (torch.rand(batch_size, 1, 1, 1, generator=g) < 0.5)
            x = torch.lerp(x, F.avg_pool2d(x, 3, 1, 1, count_include_pad=False), blur)
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(clf(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


def train_shape_judge(num_images: int = 20_000, image_size: int = 32, seed: int = JUDGE_SEED, steps: int = 4000,
                      progress: bool = True) -> ShapesClassifier:
    """The colour-blind judge: trained on `shapes` with random colours and shuffled channels, drawn from `seed`
    (apart from the generator's data seeds)."""
    from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset

    ds = ShapesDataset(num_images, image_size, seed, random_colours=True)
    return train_classifier(ds.images, ds.labels, len(SHAPE_CLASSES), steps, seed=seed, colour_blind=True, progress=progress)


def train_judges(out: str, progress: bool = True, overwrite: bool = False) -> dict:
    """Train the demo's two judges and save them to `out` (what ships in lfm_fast/assets/judges, made by
    `python -m lfm_fast.eval.domain --out lfm_fast/assets/judges`): the classifier on real shapes (the
    demo's training images, seed 0) and the colour-blind shape judge."""
    from safetensors.torch import save_file

    from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset
    from lfm_fast.fileio import atomic_dir, write_json

    start = time.time()
    real = ShapesDataset(6000, 32, seed=0)
    judges = {"classifier": train_classifier(real.images, real.labels, len(SHAPE_CLASSES), 600, seed=0, progress=progress),
              "shape_judge": train_shape_judge(progress=progress)}
    held_out = ShapesDataset(1200, 32, seed=1)
    summary = {name: {"held_out_real_accuracy": float((classify(m, held_out.images) == held_out.labels).float().mean())}
               for name, m in judges.items()}
    summary["seconds"] = round(time.time() - start, 1)
    with atomic_dir(out, "judges", overwrite) as tmp:
        for name, m in judges.items():
            save_file(m.state_dict(), os.path.join(tmp, f"{name}.safetensors"))
        write_json(os.path.join(tmp, "judges.json"), summary)
    return summary


def load_judges(folder: str = JUDGES_DIR) -> tuple[ShapesClassifier, ShapesClassifier]:
    """(classifier, shape_judge) as shipped with the package."""
    from safetensors.torch import load_file

    from lfm_fast.data.shapes import SHAPE_CLASSES

    out = []
    for name in ("classifier", "shape_judge"):
        m = ShapesClassifier(len(SHAPE_CLASSES))
        m.load_state_dict(load_file(os.path.join(folder, f"{name}.safetensors")))
        out.append(m.eval())
    return out[0], out[1]


@torch.no_grad()
def embed(clf: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([clf.embed(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def classify(clf: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([clf(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])


def shape_centred_holes(semantic: np.ndarray, seed: int, hole_range: tuple[float, float] = (0.3, 0.5),
                        kind: str = "mixed") -> np.ndarray:
    """The inpainting demo's test holes, (N, H, W) bool: mask i of the training generator's style (LaMa strokes and
    boxes, hole ratio in `hole_range`, drawn from (seed, i)), shifted cyclically so that the hole's centre of mass
    lands on the centre of the shape in semantic map i. A cyclic shift keeps the hole ratio exactly."""
    from lfm_fast.data.masks import random_mask

    n, size = semantic.shape[0], semantic.shape[-1]
    angles = 2 * np.pi * (np.arange(size) + 0.5) / size

    def cyclic_centre(weights):  # the circular mean of a cyclic axis, in pixels
        return float(np.angle((weights * np.exp(1j * angles)).sum()) % (2 * np.pi) / (2 * np.pi) * size)

    coords = np.arange(size) + 0.5
    holes = np.empty((n, size, size), bool)
    for i in range(n):
        mask = random_mask(size, np.random.default_rng([seed, i]), hole_range, kind)
        shape = semantic[i] > 0
        cy, cx = (coords[:, None] * shape).sum() / shape.sum(), (coords[None, :] * shape).sum() / shape.sum()
        shift = (round(cy - cyclic_centre(mask.sum(1))), round(cx - cyclic_centre(mask.sum(0))))
        holes[i] = np.roll(mask, shift, axis=(0, 1))
    return holes


def mean_colour_fill(images: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """The inpainting floor: each hole filled with the mean colour of its image's known pixels (uint8 NHWC)."""
    out = images.copy()
    for img, hole in zip(out, holes):
        img[hole] = np.round(img[~hole].reshape(-1, 3).mean(0)).astype(np.uint8)
    return out


def semantic_from_colours(images: np.ndarray) -> np.ndarray:
    """The semantic demo's map recovery, an exact colour rule for `shapes` (no learnt net): a pixel whose brightest
    channel passes 0.55 is shape (backgrounds stay below 0.35, shape colours above 0.85), of the class whose colour
    is nearest; every other pixel is background. Class ids as the data's maps (0 background, k + 1 shape k)."""
    from lfm_fast.data.shapes import SHAPE_COLORS

    x = images.astype(np.float32) / 255
    nearest = ((x[..., None, :] - SHAPE_COLORS) ** 2).sum(-1).argmin(-1)
    return np.where(x.max(-1) > 0.55, nearest + 1, 0)


def mean_iou(predicted: np.ndarray, target: np.ndarray, num_classes: int) -> tuple[float, list[float]]:
    """mIoU over a set of maps: per class, intersection over union summed over every pixel of every map (classes
    absent from both are left out), then the mean over classes. Returns (mIoU, per-class IoU, NaN where absent)."""
    ious = []
    for k in range(num_classes):
        p, t = predicted == k, target == k
        union = int((p | t).sum())
        ious.append(int((p & t).sum()) / union if union else float("nan"))
    return float(np.nanmean(ious)), ious


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train the shapes demo's judges (what ships in lfm_fast/assets/judges)")
    parser.add_argument("--out", default=JUDGES_DIR)
    parser.add_argument("--overwrite", action="store_true", help="replace --out (a folder this command wrote)")
    args = parser.parse_args()
    print(train_judges(args.out, overwrite=args.overwrite))
