import os

import numpy as np
import pytest
import torch

from lfm_fast.data.latents import LatentShardWriter


def perturbed(model, scale=0.05, seed=0):
    """Leave adaLN-Zero's zero init (v ≡ 0) so outputs depend on every input; returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


CONDITIONED = {"none": {}, "inpaint": dict(condition="inpaint", cond_channels=5),
               "semantic": dict(condition="semantic", cond_channels=3, semantic_classes=7, cond_stages=2)}


def a_condition(kind, n):
    if kind == "inpaint":  # masked-image latent and hole mask on the 8×8 latent grid
        return torch.cat([torch.randn(n, 4, 8, 8), (torch.rand(n, 1, 8, 8) < 0.4).float()], dim=1)
    if kind == "semantic":  # one-hot map at 4× the latent grid
        return torch.nn.functional.one_hot(torch.randint(0, 7, (n, 32, 32)), 7).permute(0, 3, 1, 2).float()
    return None


class PoolAE(torch.nn.Module):
    """A stand-in autoencoder for the inpainting condition: its posterior mode is the average over each 4×4 cell
    (3 → 3 channels), scaled by `config.scaling_factor` in `encode` as diffusers' AutoencoderKL's latents are."""

    def __init__(self, scaling_factor: float):
        import types

        super().__init__()
        self.config = types.SimpleNamespace(scaling_factor=scaling_factor)
        self.w = torch.nn.Parameter(torch.ones(()))

    def encode(self, x):
        import types

        pooled = torch.nn.functional.avg_pool2d(x, 4) * self.w
        return types.SimpleNamespace(latent_dist=types.SimpleNamespace(mode=lambda: pooled))


def write_random_latents(folder, n=48, shape=(4, 8, 8), num_classes=3, seed=0, shard_size=20, autoencoder="",
                         conditions=False):
    """Random latent shards; with `conditions`, also random semantic maps (5 classes, at 2× the latent grid) and 2
    inpainting masks per sample (masked latents and latent-grid masks)."""
    g = torch.Generator().manual_seed(seed)
    os.makedirs(folder, exist_ok=True)
    writer = LatentShardWriter(str(folder), shard_size=shard_size)
    labels = torch.arange(n) % max(1, num_classes)
    # class-dependent means so a conditional model has something to learn
    lat = torch.randn((n, *shape), generator=g) * 0.5 + labels.view(-1, 1, 1, 1).float() - 1
    meta = {"latent_shape": list(shape), "num_classes": num_classes, "autoencoder": autoencoder, "image_size": 2 * shape[1],
            "scaling_factor": 1.0, "class_names": [f"c{i}" for i in range(num_classes)]}
    std = torch.full_like(lat, 0.05).half()  # the paper's augmentation: mirror-image latents and a posterior std
    extra = {"latents_flip": lat.flip(-1), "latents_std": std, "latents_flip_std": std}
    if conditions:
        masks = (torch.rand((n, 2, *shape[1:]), generator=g) < 0.4).to(torch.uint8)
        masked = lat[:, None] * (1 - masks[:, :, None].float())
        extra.update(semantic=torch.randint(0, 5, (n, 2 * shape[1], 2 * shape[2]), generator=g).to(torch.uint8),
                     masked_latents=masked, masked_latents_flip=masked.flip(-1), masks=masks)
        meta.update(conditions=["semantic", "inpaint"], semantic_classes=5, inpaint_masks=2)
    writer.add(lat, labels, **extra)
    return writer.close(meta)


@pytest.fixture
def random_latents(tmp_path):
    folder = tmp_path / "latents"
    write_random_latents(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory):
    """A tiny trained AE, its latents and a tiny trained DiT, made once through the real code paths."""
    from lfm_fast.autoencoder import train_autoencoder
    from lfm_fast.config import get_preset
    from lfm_fast.data.prepare import prepare_latents
    from lfm_fast.data.shapes import ShapesDataset
    from lfm_fast.train.loop import train

    root = tmp_path_factory.mktemp("pipeline")
    ds = ShapesDataset(96, 32, seed=0)
    train_autoencoder(ds.images, str(root / "ae"), steps=4, batch_size=8, channels=(32, 32), progress=False)
    prepare_latents(str(root / "ae"), "shapes", str(root / "latents"), 32, 96, progress=False)
    cfg = get_preset("small-data")
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = 6, 16, 3
    train(cfg, str(root / "latents"), str(root / "dit"), progress=False)
    return root


@pytest.fixture(scope="session", autouse=True)
def repeated_sqrtm_once(tmp_path_factory):
    """scipy's sqrtm of a 2048-wide FID covariance product takes ~14 s here, and the eval tests meet the same few
    products (the same two image sets, in several commands and files, and pytorch-fid's formula beside ours) again and
    again: each distinct matrix is computed once a session, by whichever xdist worker meets it first (the others wait
    on its lock file and read the result). The code under test still calls sqrtm; a repeated input gets the first
    call's result, with `disp=False`'s error estimate computed as scipy does."""
    import fcntl
    import hashlib

    from scipy import linalg

    real = linalg.sqrtm
    base = tmp_path_factory.getbasetemp()  # under xdist, each worker's: their parent is the session's, shared
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "sqrtm-cache"
    folder.mkdir(exist_ok=True)

    def sqrtm(a, disp=True, **kwargs):
        a = np.asarray(a)
        if a.ndim != 2 or a.shape[0] < 512 or kwargs:
            return real(a, **kwargs) if disp is True else real(a, disp=disp, **kwargs)
        path = folder / f"{a.shape[0]}-{a.dtype.str[1:]}-{hashlib.sha1(np.ascontiguousarray(a).tobytes()).hexdigest()}.npy"
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not path.exists():
                np.save(path.with_suffix(".tmp.npy"), real(a))
                os.replace(path.with_suffix(".tmp.npy"), path)
        res = np.load(path)
        return res if disp else (res, np.linalg.norm(res @ res - a, "fro") ** 2 / np.linalg.norm(a, "fro"))

    linalg.sqrtm = sqrtm
    yield
    linalg.sqrtm = real


@pytest.fixture(scope="session")
def random_inception(tmp_path_factory):
    """Random weights in the layout of pytorch-fid's weights file, with BatchNorm statistics measured on shapes images
    (a forward in train mode): each layer then keeps its inputs' spread, so pool3 features differ from image to image
    and FIDs, precision and recall take real values (with the BatchNorm statistics drawn at random instead, every
    image gave the same features to 1e-8, and every FID was 0)."""
    from lfm_fast.data.shapes import make_shapes
    from lfm_fast.eval.fid import FIDInceptionV3, inception_features

    torch.manual_seed(0)
    net = FIDInceptionV3()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # the cumulative average: the statistics of the batch below
    net.train()
    with torch.no_grad():
        inception_features(net, make_shapes(16, 32, seed=7)[0], batch_size=16, progress=False)
    state = net.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    state["fc.weight"], state["fc.bias"] = torch.randn(1008, 2048) * 0.01, torch.zeros(1008)
    path = tmp_path_factory.mktemp("inception") / "pt_inception.pth"
    torch.save(state, path)
    return str(path), state


# Skips: on a machine without CUDA exactly the tests marked `gpu` skip; anything else that skips (a broken import
# behind an importorskip, a missing download of `make install`) fails the run, so that a hard dependency can never
# silently take its tests with it. With CUDA, a `gpu` test may still skip for TensorRT, which is not on PyPI.
def skip_problems(reports, cuda: bool) -> list[str]:
    """What is wrong with the run's skips: a skip of an unmarked test, or (without CUDA) a `gpu` test that ran."""
    problems = []
    for r in reports:
        gpu = "gpu" in getattr(r, "keywords", ())  # a module skipped at collection has no keywords
        reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
        if r.skipped and not gpu:
            problems.append(f"{r.nodeid} skipped ({reason}): only CUDA and TensorRT tests may skip")
        elif r.skipped and cuda and "tensorrt" not in reason.lower():
            problems.append(f"{r.nodeid} skipped on a CUDA machine ({reason})")
        elif gpu and not cuda and not r.skipped and r.when == "call":
            problems.append(f"{r.nodeid} is marked gpu but ran without CUDA")
    return problems


def pytest_sessionfinish(session, exitstatus):
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or exitstatus not in (0, 1, 5):  # passed, failed, or nothing collected (all skipped)
        return
    reports = [r for key in ("passed", "failed", "skipped") for r in reporter.stats.get(key, [])
               if getattr(r, "nodeid", None) and (r.when == "call" or r.skipped)]
    session.config.skip_problems = skip_problems(reports, torch.cuda.is_available())
    if session.config.skip_problems:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):  # after pytest_sessionfinish
    for line in getattr(config, "skip_problems", None) and ["FAILED: unexpected skips", *config.skip_problems] or ():
        terminalreporter.write_line(line, red=True)


# The longest files first: `make test` hands whole files to its workers in collection order (xdist's
# --no-loadscope-reorder: by default it orders files by test count), so a long file met last would run alone at the end (measured: test_distributed.py, ~6 minutes, started at 65 % of the run)
LONGEST_FIRST = ("test_distributed.py", "test_tasks.py", "test_eval.py", "test_export.py", "test_readme.py",
                 "test_domain.py", "test_prepare.py", "test_dit_kernels.py", "test_dryrun.py", "test_autoencoder.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file's own order is kept
