"""Latent shards: what `lfm-fast prepare` writes and training reads.

A folder with `meta.json` and `shard-XXXXX.safetensors` files, each holding `latents` (N, C, H, W;
already multiplied by the AE's scaling factor) and `labels` (N,) int64, and the conditions the data has:
`semantic` (N, H_img, W_img) uint8 class maps; `masked_latents` (N, K, C, H, W) and `masks` (N, K, H, W)
uint8 for inpainting (the hole share of each latent cell × `mask_levels`, 255, in meta.json). Shards are memory-mapped and a
batch is gathered with one fancy index per shard, so a dataset larger than memory trains fine and reading
a batch costs no per-item Python work.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from lfm_fast.errors import InputError
from lfm_fast.fileio import resolve_path, umask_mode, write_json


_NUMPY_DTYPES = {"F32": np.float32, "I64": np.int64, "U8": np.uint8}


def mmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read-only memory-mapped views of a safetensors file's tensors (format: an 8-byte little-endian header
    length, a JSON header of dtype/shape/data_offsets, then the raw bytes); pages load when touched."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    for name, info in header.items():
        if name != "__metadata__":
            lo, hi = info["data_offsets"]
            views[name] = raw[8 + n + lo:8 + n + hi].view(_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    return views


class LatentShardWriter:
    """Accumulates batches of named tensors (`latents`, `labels`, and the conditions: `semantic` maps,
    `masked_latents` + `masks`) and writes fixed-size shards into `folder`."""

    def __init__(self, folder: str, shard_size: int = 8192):
        self.folder, self.shard_size = folder, shard_size
        self.buffer: dict[str, list[torch.Tensor]] = {}
        self.shards: list[dict] = []
        self.count = 0

    def add(self, latents: torch.Tensor, labels: torch.Tensor, **conditions: torch.Tensor):
        batch = {"latents": latents.detach().float(), "labels": labels.detach().long(), **conditions}
        for name, t in batch.items():
            self.buffer.setdefault(name, []).append(t.detach().cpu())
        while self._buffered() >= self.shard_size:
            self._flush(self.shard_size)

    def _buffered(self) -> int:
        return sum(len(t) for t in self.buffer.get("labels", []))

    def _flush(self, n: int):
        whole = {name: torch.cat(parts) for name, parts in self.buffer.items()}
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = os.path.join(self.folder, name)
        save_file({k: v[:n].contiguous() for k, v in whole.items()}, path)
        os.chmod(path, umask_mode(0o666))  # safetensors creates 0600 files
        self.shards.append({"file": name, "num": int(min(n, len(whole["labels"])))})
        self.count += self.shards[-1]["num"]
        self.buffer = {k: [v[n:]] for k, v in whole.items()} if len(whole["labels"]) > n else {}

    def close(self, meta: dict) -> dict:
        if self.buffer:
            self._flush(self._buffered())
        meta = dict(meta, num_samples=self.count, shards=self.shards)
        write_json(os.path.join(self.folder, "meta.json"), meta)
        return meta


class LatentShardDataset(Dataset):
    """Random access over the shards of a `prepare` folder; items are (latent, label)."""

    def __init__(self, folder: str):
        path = os.path.join(folder, "meta.json")
        if not os.path.isfile(path):
            raise InputError(f"latents {folder}: no meta.json (expected a folder written by `lfm-fast prepare`)")
        with open(path) as f:
            self.meta = json.load(f)
        self.folder = folder
        self.offsets, total = [], 0
        for shard in self.meta["shards"]:
            self.offsets.append(total)
            total += shard["num"]
        self.length = total
        self._handles = {}

    @property
    def num_classes(self) -> int:
        return int(self.meta.get("num_classes", 0))

    @property
    def autoencoder(self) -> str:
        """The AE these latents came from: a local folder (resolved) or a hub id."""
        return resolve_path(self.meta.get("autoencoder", ""), self.folder)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.meta["latent_shape"])

    def __len__(self):
        return self.length

    def _shard(self, s: int) -> dict[str, np.ndarray]:
        if s not in self._handles:  # mapped lazily: each DataLoader worker maps its own
            self._handles[s] = mmap_safetensors(os.path.join(self.folder, self.meta["shards"][s]["file"]))
        return self._handles[s]

    def __getitem__(self, i: int):
        if not 0 <= i < self.length:
            raise IndexError(i)
        x, y = self.get_batch([i])
        return x[0], y[0]

    @property
    def conditions(self) -> list[str]:
        """The conditions these latents carry: "semantic" (maps at image resolution), "inpaint" (K masked-image
        latents and latent-grid masks per sample)."""
        return list(self.meta.get("conditions", []))

    def _gather(self, name: str, indices) -> np.ndarray:
        """Rows `indices` of tensor `name`, one fancy index per shard."""
        idx = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        first = self._shard(int(shard_of[0]))[name] if len(idx) else self._shard(0)[name]
        out = np.empty((len(idx), *first.shape[1:]), dtype=first.dtype)
        for s in np.unique(shard_of):
            rows = shard_of == s
            out[rows] = self._shard(s)[name][idx[rows] - self.offsets[s]]
        return out

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self._gather("latents", indices)), torch.from_numpy(self._gather("labels", indices))

    def get_condition(self, indices, kind: str, picks=None) -> torch.Tensor:
        """The model input of condition `kind` for these samples: semantic, the one-hot map (B, K, H, W) float;
        inpaint, [masked-image latent, hole mask on the latent grid] (B, C + 1, h, w) of mask `picks[i]` of sample i
        (each sample has `inpaint_masks` of them)."""
        if kind not in self.conditions:
            raise InputError(f"latents {self.folder}: no {kind!r} conditions (they hold: {', '.join(self.conditions) or 'none'})")
        if kind == "semantic":
            maps = torch.from_numpy(self._gather("semantic", indices)).long()
            return torch.nn.functional.one_hot(maps, int(self.meta["semantic_classes"])).permute(0, 3, 1, 2).float()
        picks = np.zeros(len(indices), np.int64) if picks is None else np.asarray(picks)
        rows = np.arange(len(indices))
        masked = self._gather("masked_latents", indices)[rows, picks]
        masks = self._gather("masks", indices)[rows, picks][:, None].astype(np.float32) / self.meta.get("mask_levels", 1)
        return torch.cat([torch.from_numpy(masked), torch.from_numpy(masks)], dim=1)


def prepare_latents(ae_spec: str, data_spec: str, out: str, image_size: int | None = None, num_images: int = 6000,
                    batch_size: int = 64, seed: int = 0, progress: bool = True, overwrite: bool = False,
                    inpaint_masks: int = 0, hole_range: tuple[float, float] = (0.1, 0.6)) -> dict:
    """Encode a dataset once with the AE and write latent shards (LFM re-encoded every batch; we cache).

    Semantic maps are stored where the data has them (`shapes`). With `inpaint_masks=K`, each image also gets K
    seeded masks (LaMa-style, hole ratio in `hole_range`): the latents of the masked image (holes grey) and the
    mask on the latent grid (the share of each latent cell's pixels that are hole), so inpainting trains without
    running the encoder (the masked image's latent is what the model is conditioned on)."""
    from tqdm.auto import tqdm

    from lfm_fast.autoencoder import downsample_factor, encode, load_autoencoder
    from lfm_fast.data import open_image_dataset
    from lfm_fast.data.masks import MASK_LEVELS, make_masks, masked_image_condition
    from lfm_fast.data.shapes import NUM_SEMANTIC
    from lfm_fast.fileio import atomic_dir, check_out_dir, portable_path

    check_out_dir(out, overwrite, "prepare")
    ae = load_autoencoder(ae_spec)
    size = image_size or int(ae.config.sample_size)
    ds, class_names = open_image_dataset(data_spec, size, num_images, seed)
    ds[0]  # fail on an unreadable first image before any output exists
    f = downsample_factor(ae)
    semantic = getattr(ds, "semantic", None)
    meta = {"autoencoder": portable_path(ae_spec, out),
            "scaling_factor": float(ae.config.scaling_factor), "image_size": size,
            "latent_shape": [int(ae.config.latent_channels), size // f, size // f],
            "num_classes": len(class_names), "class_names": class_names, "dataset": data_spec,
            "conditions": (["semantic"] if semantic is not None else []) + (["inpaint"] if inpaint_masks else [])}
    if semantic is not None:
        meta["semantic_classes"] = NUM_SEMANTIC
    if inpaint_masks:
        meta.update(inpaint_masks=inpaint_masks, hole_range=list(hole_range), mask_seed=seed, mask_levels=MASK_LEVELS)
    with atomic_dir(out, "prepare", overwrite) as tmp:
        writer = LatentShardWriter(tmp)
        for lo in tqdm(range(0, len(ds), batch_size), desc="prepare", disable=not progress, mininterval=1):
            idx = list(range(lo, min(lo + batch_size, len(ds))))
            images, labels = torch.stack([ds[i][0] for i in idx]), torch.stack([torch.as_tensor(ds[i][1]) for i in idx])
            conditions = {}
            if semantic is not None:
                conditions["semantic"] = semantic[idx].to(torch.uint8)
            if inpaint_masks:  # mask k of image i is mask i·K + k of the seeded sequence
                holes = torch.from_numpy(make_masks(len(idx) * inpaint_masks, size, seed, hole_range, start=lo * inpaint_masks))
                holes = holes.view(len(idx), inpaint_masks, size, size)
                lat, grid = masked_image_condition(ae, images.repeat_interleave(inpaint_masks, 0), holes.flatten(0, 1), f,
                                                   batch_size)
                conditions["masked_latents"] = lat.view(len(idx), inpaint_masks, *lat.shape[1:])
                grid = grid.view(len(idx), inpaint_masks, size // f, size // f)
                conditions["masks"] = (grid * MASK_LEVELS).round().to(torch.uint8)
            writer.add(encode(ae, images, batch_size), labels, **conditions)
        return writer.close(meta)
