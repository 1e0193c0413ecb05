"""Latent shards: what `lfm-fast prepare` writes and training reads.

A folder with `meta.json` and `shard-XXXXX.safetensors` files, each holding `latents` (N, C, H, W;
already multiplied by the AE's scaling factor) and `labels` (N,) int64. Shards are memory-mapped and a
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


_NUMPY_DTYPES = {"F32": np.float32, "I64": np.int64}


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
    """Accumulates (latents, labels) batches and writes fixed-size shards into `folder`."""

    def __init__(self, folder: str, shard_size: int = 8192):
        self.folder, self.shard_size = folder, shard_size
        self.buffer: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.shards: list[dict] = []
        self.count = 0

    def add(self, latents: torch.Tensor, labels: torch.Tensor):
        self.buffer.append((latents.detach().float().cpu(), labels.detach().long().cpu()))
        while sum(len(b[1]) for b in self.buffer) >= self.shard_size:
            self._flush(self.shard_size)

    def _flush(self, n: int):
        lat = torch.cat([b[0] for b in self.buffer])
        lab = torch.cat([b[1] for b in self.buffer])
        name = f"shard-{len(self.shards):05d}.safetensors"
        path = os.path.join(self.folder, name)
        save_file({"latents": lat[:n].contiguous(), "labels": lab[:n].contiguous()}, path)
        os.chmod(path, umask_mode(0o666))  # safetensors creates 0600 files
        self.shards.append({"file": name, "num": int(min(n, len(lab)))})
        self.count += self.shards[-1]["num"]
        self.buffer = [(lat[n:], lab[n:])] if len(lab) > n else []

    def close(self, meta: dict) -> dict:
        if self.buffer:
            self._flush(sum(len(b[1]) for b in self.buffer))
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

    def get_batch(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        idx = np.asarray(indices, dtype=np.int64)
        shard_of = np.searchsorted(self.offsets, idx, side="right") - 1
        latents = np.empty((len(idx), *self.latent_shape), dtype=np.float32)
        labels = np.empty(len(idx), dtype=np.int64)
        for s in np.unique(shard_of):
            rows = shard_of == s
            local = idx[rows] - self.offsets[s]
            latents[rows], labels[rows] = self._shard(s)["latents"][local], self._shard(s)["labels"][local]
        return torch.from_numpy(latents), torch.from_numpy(labels)


def prepare_latents(ae_spec: str, data_spec: str, out: str, image_size: int | None = None, num_images: int = 6000,
                    batch_size: int = 64, seed: int = 0, progress: bool = True, overwrite: bool = False) -> dict:
    """Encode a dataset once with the AE and write latent shards (LFM re-encoded every batch; we cache)."""
    from torch.utils.data import DataLoader
    from tqdm.auto import tqdm

    from lfm_fast.autoencoder import downsample_factor, encode, load_autoencoder
    from lfm_fast.data import open_image_dataset
    from lfm_fast.fileio import atomic_dir, check_out_dir, portable_path

    check_out_dir(out, overwrite, "prepare")
    ae = load_autoencoder(ae_spec)
    size = image_size or int(ae.config.sample_size)
    ds, class_names = open_image_dataset(data_spec, size, num_images, seed)
    ds[0]  # fail on an unreadable first image before any output exists
    f = downsample_factor(ae)
    meta = {"autoencoder": portable_path(ae_spec, out),
            "scaling_factor": float(ae.config.scaling_factor), "image_size": size,
            "latent_shape": [int(ae.config.latent_channels), size // f, size // f],
            "num_classes": len(class_names), "class_names": class_names, "dataset": data_spec}
    with atomic_dir(out, "prepare", overwrite) as tmp:
        writer = LatentShardWriter(tmp)
        loader = DataLoader(ds, batch_size=batch_size, shuffle=False)
        for images, labels in tqdm(loader, desc="prepare", disable=not progress, mininterval=1):
            writer.add(encode(ae, images, batch_size), labels)
        return writer.close(meta)
