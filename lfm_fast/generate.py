"""Checkpoint → images: per-image seeded noise, ODE sampling with CFG, AE decoding, and the output files
of `lfm-fast sample` (one PNG per image, grid.png, samples.npz in the ADM evaluator's layout)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from lfm_fast.autoencoder import decode
from lfm_fast.calibrate import load_times
from lfm_fast.choices import INFERENCE_DTYPES, NFE_PER_STEP
from lfm_fast.data.images import to_uint8
from lfm_fast.dist import to_device
from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_dir, image_grid, save_png
from lfm_fast.sampling import SampleConfig, per_image_noise, sample_with, time_grid
from lfm_fast.train.throughput import forward_flops_per_image


def inference_dtype(name: str | torch.dtype | None, device) -> torch.dtype:
    """The network's dtype at sampling: a torch dtype, or one of INFERENCE_DTYPES; "auto" (or None) is bf16 on CUDA
    (tensor cores and the fused kernels) and fp32 elsewhere (many CPUs emulate bf16, 10–100× slower)."""
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name in (None, "auto"):
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if isinstance(name, torch.dtype) and name in dtypes.values():
        return name
    if name not in dtypes:
        raise InputError(f"dtype {name!r}: expected one of {', '.join(INFERENCE_DTYPES)} (or torch.float32, torch.bfloat16, torch.float16)")
    return dtypes[name]


def inference_model(model, device, dtype: str | torch.dtype | None = "auto"):
    """`model` in eval mode on `device` in the sampling dtype, in place. Below fp32 only the token path is cast: the
    per-sample time and label embeddings and adaLN modulations stay fp32 (`cast_token_path`, as exported graphs)."""
    model = model.eval().to(device)
    dt = inference_dtype(dtype, device)
    return model.float() if dt == torch.float32 else cast_token_path(model, dt)


def cast_token_path(model, dtype: torch.dtype):
    """A DiT in `dtype` for inference (sampling, export), in place, but for its per-sample path: the time and label embeddings and
    the adaLN modulations act on one vector a sample (about 1/T of the FLOPs) and stay fp32, their outputs cast at
    the modulation. At 32 Heun steps on the demo checkpoint, rounding every weight to fp16 moves the latents by
    1.1e-2 (max abs), rounding only the token path's by 3.4e-3 (the time embedding alone: 4.5e-3)."""
    keep = {id(p) for name, module in model.named_modules()
            if name in ("t_embedder", "y_embedder") or name.endswith("adaLN_modulation") for p in module.parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.float() if id(p) in keep else p.data.to(dtype)  # never through `dtype` and back
    return model


def checkpoint_sample_config(config: dict) -> SampleConfig:
    """The sampling recipe a checkpoint's config.json records (its experiment's `sample` section over the defaults)."""
    recipe = config.get("meta", {}).get("experiment", {}).get("sample", {})
    return SampleConfig(**{**dataclasses.asdict(SampleConfig()), **recipe})


def resolve_times(scfg: SampleConfig, folder: str | None) -> SampleConfig:
    """A fixed-step recipe's time grid made concrete and checked, for every caller alike (`sample`, `export`, the
    pipeline): a "calibrated" grid takes its times from the checkpoint folder, where `lfm-fast calibrate` stores
    them. Returns `scfg`, its `times` set."""
    if scfg.solver not in NFE_PER_STEP:
        return scfg
    if scfg.grid == "calibrated":
        if folder is None:
            raise InputError("--grid calibrated: the times are stored in the checkpoint folder, and this model has none")
        scfg.times = load_times(folder, scfg)
    try:
        time_grid(scfg.steps, scfg.grid, scfg.shift, scfg.times)
    except ValueError as e:
        raise InputError(f"--grid {scfg.grid}: {e}") from None
    return scfg


def checkpoint_sigma_min(config: dict) -> float:
    return float(config.get("meta", {}).get("experiment", {}).get("flow", {}).get("sigma_min", 1e-5))


def checkpoint_autoencoder(config: dict, folder: str) -> str:
    """The autoencoder a checkpoint records, a relative path resolved against its folder ("" for none)."""
    from lfm_fast.fileio import resolve_path

    return resolve_path(config.get("meta", {}).get("autoencoder", ""), folder)


@torch.no_grad()
def generate(run_batch, labels: torch.Tensor | None, seeds: list[int], shape: tuple[int, ...], batch_size: int = 64,
             device="cpu", progress: bool = True, conds: torch.Tensor | None = None,
             noise: torch.Tensor | None = None) -> torch.Tensor:
    """Outputs of `run_batch(noise, labels[, conds])` for each (label, condition, seed), batch by batch; image i
    depends on seeds[i], labels[i] and conds[i] only, whatever the batch size or the backend that runs the batch.
    `noise` (N, *shape): each image's starting noise given instead of drawn from its seed."""
    out = []
    for i in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress, mininterval=1):
        x = (per_image_noise(seeds[i:i + batch_size], shape) if noise is None else noise[i:i + batch_size].float())
        x = to_device(x, device)
        y = None if labels is None else to_device(labels[i:i + batch_size], device)
        c = None if conds is None else to_device(conds[i:i + batch_size], device, torch.float32)
        out.append(torch.as_tensor(run_batch(x, y) if c is None else run_batch(x, y, c)).cpu())
    return torch.cat(out)


@dataclass
class NfeCount:
    """NFE of a sampling run: per batch (network calls, the most of any batch) and per image (the evaluations an
    image took part in: LFM's count, which is the batch count for fixed-step solvers), and network rows per image
    (2 per guided evaluation, 1 per unguided one) with the network FLOPs they take."""
    per_batch: int = 0
    per_image_mean: float = 0.0
    per_image_max: int = 0
    rows_per_image: float = 0.0
    flops_per_image: float = 0.0

    def __str__(self):
        rows = f", {self.rows_per_image:g} network rows per image ({self.flops_per_image / 1e9:.3g} GFLOP)"
        if self.per_image_max == self.per_batch and self.per_image_mean == self.per_batch:
            return f"NFE {self.per_batch}{rows}"
        return f"NFE per image {self.per_image_mean:.1f} (max {self.per_image_max}), {self.per_batch} per batch{rows}"


def generate_latents(model, labels: torch.Tensor | None, seeds: list[int], cfg: SampleConfig, batch_size: int = 64,
                     progress: bool = True, conds: torch.Tensor | None = None,
                     sigma_min: float = 1e-5, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, NfeCount]:
    """Eager sampling with any solver: fp32 noise and state, the network in its own dtype."""
    mc = model.config
    device = getattr(model, "device", None) or next(model.parameters()).device  # a GraphNet (an exported graph) has no weights
    image_nfe, rows, calls = [], 0, 0

    def run(noise, y, c=None):
        nonlocal rows, calls
        res = sample_with(model, noise, y, cfg, c, sigma_min)
        image_nfe.append(res.image_nfe)
        rows, calls = rows + res.net_rows, max(calls, res.nfe)
        return res.latents.float()

    latents = generate(run, labels, seeds, (mc.in_channels, mc.input_size, mc.input_size), batch_size, device,
                       progress, conds, noise)
    per_image = torch.cat(image_nfe) if image_nfe else torch.zeros(1)
    rows_per_image = rows / max(len(seeds), 1)
    return latents, NfeCount(calls, float(per_image.float().mean()), int(per_image.max()), rows_per_image,
                             rows_per_image * forward_flops_per_image(mc))


def class_ids(values, num_classes: int, class_names=(), what: str = "class_labels") -> list[int]:
    """Class ids from ids or class names (a checkpoint's `class_names`): 3, "3" and "square" alike. `what` names the
    input in the error."""
    ids = []
    for v in values:
        if isinstance(v, str) and v in class_names:
            ids.append(list(class_names).index(v))
            continue
        i = int(v) if isinstance(v, str) and v.isdigit() else v
        if not isinstance(i, (int, np.integer)) or isinstance(i, bool) or not 0 <= i < num_classes:
            names = f" or one of {', '.join(class_names)}" if class_names else ""
            raise InputError(f"{what}: {v!r} is not a class of this checkpoint: expected a class id in 0..{num_classes - 1}{names}")
        ids.append(int(i))
    return ids


def latents_to_images(ae, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
    """Scaled latents → uint8 (N, H, W, 3)."""
    return to_uint8(decode(ae, latents, batch_size))


def rank_indices(num: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The images rank r makes: whole batches [b·bs, (b+1)·bs) with b ≡ r (mod world size). Batches are the same
    at any world size, so every image comes out of the same batch, bit for bit, however many ranks run."""
    starts = range(rank * batch_size, num, world_size * batch_size)
    return [i for s in starts for i in range(s, min(s + batch_size, num))]


def save_samples(d, out: str, images: np.ndarray, indices: list[int], labels: np.ndarray | None,
                 overwrite: bool = False, source: np.ndarray | None = None, grid=None) -> None:
    """Collective: each rank's `images` (image numbers `indices`) into one folder `out`, which rank 0 commits
    atomically: `{index:06d}_class{label}.png` per image, `grid.png`, and `samples.npz` (arr_0, labels) in the
    ADM evaluator's layout, plus `source` (the input each image was made from) for the conditional tasks, whose
    grid `grid(all images)` lays out. Needs a file system all ranks share (one node, or a shared mount)."""
    labs = None if labels is None else np.asarray(labels, np.int64)

    def write_part(tmp):
        for i, img in zip(indices, images):
            save_png(os.path.join(tmp, f"{i:06d}.png" if labs is None else f"{i:06d}_class{labs[i]}.png"), img)
        np.savez(os.path.join(tmp, f".part-{d.rank}.npz"), images=images, indices=np.asarray(indices, np.int64))
        d.barrier()

    if not d.is_main:
        write_part(d.broadcast_object(None))
        d.barrier()
        return
    with atomic_dir(out, "sample", overwrite) as tmp:
        d.broadcast_object(tmp)
        write_part(tmp)
        parts = []
        for r in range(d.world_size):
            with np.load(os.path.join(tmp, f".part-{r}.npz")) as f:
                if len(f["indices"]):  # a rank without a batch wrote an empty part
                    parts.append((f["indices"], f["images"]))
            os.remove(os.path.join(tmp, f".part-{r}.npz"))
        order = np.concatenate([p[0] for p in parts])
        every = np.concatenate([p[1] for p in parts])[np.argsort(order)]
        save_png(os.path.join(tmp, "grid.png"), image_grid(every[:256]) if grid is None else grid(every),
                 upscale=max(1, 128 // every.shape[1]))
        extra = {} if source is None else {"source": np.asarray(source, np.int64)}
        with open(os.path.join(tmp, "samples.npz"), "wb") as f:
            np.savez(f, arr_0=every, labels=np.full(len(every), -1, np.int64) if labs is None else labs, **extra)
    d.barrier()
