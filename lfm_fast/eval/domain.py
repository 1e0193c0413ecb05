"""Domain metrics for the shapes demo: a small CNN classifier trained on real images, then used to
check that generated images show the class they were asked for."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm


class ShapesClassifier(nn.Module):
    def __init__(self, num_classes: int, width: int = 32):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, 2 * width), block(2 * width, 2 * width))
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, progress: bool = True) -> ShapesClassifier:
    """Images in [-1, 1]; light augmentation (flips, small noise) so it also reads slightly blurred samples."""
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
        x = x + 0.05 * torch.randn(x.shape, generator=g)
        loss = F.cross_entropy(clf(x), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return clf.eval()


@torch.no_grad()
def classify(clf: ShapesClassifier, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([clf(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
