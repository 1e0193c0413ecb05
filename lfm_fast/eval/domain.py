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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="train the shapes demo's judges (what ships in lfm_fast/assets/judges)")
    parser.add_argument("--out", default=JUDGES_DIR)
    parser.add_argument("--overwrite", action="store_true", help="replace --out (a folder this command wrote)")
    args = parser.parse_args()
    print(train_judges(args.out, overwrite=args.overwrite))
