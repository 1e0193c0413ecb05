"""FID as pytorch-fid and the ADM evaluator compute it: InceptionV3 pool3 features (2048-d) of the
`pt_inception-2015-12-05` weights, Gaussian statistics, Fréchet distance.

The network is the FID variant of InceptionV3 (TF's pooling: average pools that exclude padding,
max pool in the last block's pool branch). Weights come from a local file (`--inception PATH` or
$LFM_FAST_INCEPTION): pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict. Nothing is
downloaded.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lfm_fast.errors import InputError
from lfm_fast.eval.frechet import frechet_distance, gaussian_stats

INCEPTION_ENV = "LFM_FAST_INCEPTION"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x):
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)  # TF pooling excludes padding


class InceptionA(nn.Module):
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), dbl,
                          self.branch_pool(_avg_pool(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):
    def __init__(self, cin, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool  # the last block of the FID network pools with max (a TF graph quirk)
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Images in [0, 1] (N, 3, H, W) → pool3 features (N, 2048); inputs are resized to 299 bilinearly."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, 32)
        self.Mixed_5c = InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, 128)
        self.Mixed_6c = InceptionC(768, 160)
        self.Mixed_6d = InceptionC(768, 160)
        self.Mixed_6e = InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))


def load_inception(path: str | None = None, device="cpu", needed_by: str = "FID") -> FIDInceptionV3:
    path = path or os.environ.get(INCEPTION_ENV)
    if not path:
        raise InputError(f"{needed_by} needs the Inception weights file {INCEPTION_FILE} (pytorch-fid's, from "
                         f"{INCEPTION_URL}): pass --inception PATH or set ${INCEPTION_ENV}")
    if not os.path.isfile(path):
        raise InputError(f"--inception {path}: no such file (expected pytorch-fid's {INCEPTION_FILE}, from {INCEPTION_URL})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several types for files that are not state dicts
        raise InputError(f"--inception {path}: not a PyTorch state dict ({e.__class__.__name__})") from None
    net = FIDInceptionV3()
    state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}  # the classifier is unused
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(f"--inception {path}: not the FID InceptionV3 weights ({len(missing)} missing, {len(unexpected)} unexpected keys)")
    return net.eval().to(device)


@torch.no_grad()
def inception_features(net: FIDInceptionV3, images: np.ndarray, batch_size: int = 50, progress: bool = True) -> np.ndarray:
    """uint8 (N, H, W, 3) → float64 (N, 2048)."""
    device = next(net.parameters()).device
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception", disable=not progress, mininterval=1):
        x = torch.from_numpy(np.ascontiguousarray(images[i:i + batch_size])).permute(0, 3, 1, 2).float().div(255)
        out.append(net(x.to(device)).double().cpu().numpy())
    return np.concatenate(out)


def load_images(source: str, size: int | None = None) -> np.ndarray:
    """uint8 (N, H, W, 3) from a `samples.npz` (ADM layout: arr_0) or a folder of samples (as they are; images of
    another size, such as a grid beside them, and unreadable files skipped with a warning); given `size` (a
    reference), a folder or any data SPEC of `prepare` instead (recursive, lmdb:PATH, celebamask:PATH, ?limit=N):
    its images resized as training saw them (ADM's center_crop_arr), unreadable ones skipped with a warning."""
    from lfm_fast.data import parse_spec

    scheme, _, options = parse_spec(source)
    if size is not None and (scheme or options or os.path.isdir(source)):
        return _read_source(source, size)
    if source.endswith(".npz"):
        with read_npz(source) as f:
            if "arr_0" not in f:
                raise InputError(f"{source}: no arr_0 array (expected the ADM / `lfm-fast sample` layout)")
            return f["arr_0"]
    return _read_sample_folder(source)


@contextlib.contextmanager
def read_npz(path: str):
    """np.load of a .npz, a file that is not one (or a truncated one, found on reading its arrays) in one line."""
    import zipfile
    import zlib

    if not os.path.isfile(path):
        raise InputError(f"{path}: no such file")
    try:
        with np.load(path) as f:
            yield f
    except InputError:  # the caller's own, about the file's contents
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise InputError(f"{path}: not a readable .npz file ({e.__class__.__name__}: {str(e).splitlines()[0][:80]})") from None


def _read_source(source: str, size: int) -> np.ndarray:
    """A data SPEC's images as training saw them."""
    from lfm_fast.data import open_image_dataset
    from lfm_fast.data.images import UnreadableImage

    ds, _ = open_image_dataset(source, size)
    images, bad = [], []
    for i in range(len(ds)):
        try:
            images.append(ds.read(i)[0])
        except UnreadableImage as e:
            bad.append(e.key)
    _warn_skipped(source, bad, "unreadable image")
    if not images:
        raise InputError(f"{source}: no readable images")
    return np.stack(images)


def _read_sample_folder(source: str) -> np.ndarray:
    """A folder of samples as they are, those of its most common size."""
    from PIL import Image

    from lfm_fast.data.folder import list_images, warn_skipped

    if not os.path.isdir(source):
        raise InputError(f"{source}: no such folder or .npz file")
    paths, skipped = list_images(source)
    warn_skipped(source, skipped)
    if not paths:
        raise InputError(f"{source}: no images found")
    images, unreadable = [], []
    for p in paths:
        try:
            with Image.open(p) as img:
                images.append(np.asarray(img.convert("RGB")))
        except (OSError, ValueError):
            unreadable.append(os.path.basename(p))
    _warn_skipped(source, unreadable, "unreadable file")
    paths = [p for p in paths if os.path.basename(p) not in unreadable]
    if not images:
        raise InputError(f"{source}: no readable images")
    sizes = [im.shape for im in images]
    common = max(set(sizes), key=sizes.count)  # e.g. a `sample` folder: its grid.png beside the images
    odd = [os.path.basename(p) for p, s in zip(paths, sizes) if s != common]
    _warn_skipped(source, odd, "image", f" not of the common size {common[1]}×{common[0]}")
    return np.stack([im for im, s in zip(images, sizes) if s == common])


def _warn_skipped(source: str, names: list[str], what: str, why: str = "") -> None:
    if names:
        warnings.warn(f"{source}: skipped {len(names)} {what}{'s' if len(names) > 1 else ''}{why} "
                      f"({', '.join(names[:3])}{', …' if len(names) > 3 else ''})", stacklevel=3)


def reference_stats(path: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(mu, sigma) from a pytorch-fid statistics file (mu, sigma); None when it holds images instead (ADM
    reference batches keep arr_0 images, whose features must be computed, as does a folder of images)."""
    from lfm_fast.data import parse_spec

    scheme, _, options = parse_spec(path)
    if os.path.isdir(path) or scheme or options:  # a folder or a data SPEC: images
        return None
    if not os.path.isfile(path):
        raise InputError(f"--ref {path}: no such file")
    with read_npz(path) as f:
        if "mu" in f and "sigma" in f:
            return f["mu"], f["sigma"]
    return None


def fid_from_features(a: np.ndarray, b_stats: tuple[np.ndarray, np.ndarray]) -> float:
    return frechet_distance(*gaussian_stats(a), *b_stats)
