"""Latent shards: what `lfm-fast prepare` (data/prepare.py) writes and training reads.

A folder with `meta.json` (the index, written last: a folder without it is an unfinished prepare) and
`shard-XXXXX.safetensors` files. Shard k holds what source items [k·S, (k+1)·S) gave (the readable ones):
`latents` (N, C, H, W; the posterior mean, already multiplied by the AE's scaling factor) and `labels` (N,) int64,
`source_index` (N,) int64, and, for the paper's augmentation, `latents_std` (the posterior's std, fp16) and, per
horizontally flipped image, `latents_flip` and `latents_flip_std`: training draws a flip and z = mean + std·ε per
sample (LFM flips and samples the posterior every batch; encoding the flip, not flipping the latent, keeps what the
AE makes of a flipped image). Conditions, where the data has them: `semantic` (N, H_img, W_img) uint8 class maps
(flipped on the fly); `masked_latents` (N, K, C, H, W) (and `masked_latents_flip`) and `masks` (N, K, H, W) uint8
for inpainting (the hole share of each latent cell × `mask_levels`, 255, in meta.json). Shards are memory-mapped
and a batch is gathered with one fancy index per shard, so a dataset larger than memory trains fine and reading a
batch costs no per-item Python work.
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
from lfm_fast.fileio import atomic_path, resolve_path, write_json


_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "U8": np.uint8}


def _header(path: str) -> tuple[int, dict]:
    """A safetensors file's header: (its length, the JSON: dtype/shape/data_offsets per tensor, __metadata__)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return n, json.loads(f.read(n))


def mmap_safetensors(path: str) -> dict[str, np.ndarray]:
    """Read-only memory-mapped views of a safetensors file's tensors (format: an 8-byte little-endian header
    length, a JSON header of dtype/shape/data_offsets, then the raw bytes); pages load when touched."""
    n, header = _header(path)
    raw = np.memmap(path, dtype=np.uint8, mode="r")
    views = {}
    for name, info in header.items():
        if name != "__metadata__":
            lo, hi = info["data_offsets"]
            views[name] = raw[8 + n + lo:8 + n + hi].view(_NUMPY_DTYPES[info["dtype"]]).reshape(info["shape"])
    return views


def write_shard(path: str, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    """One shard file, atomically (a killed writer leaves no partial shard); `metadata` goes in its header."""
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp,
                  metadata={"lfm_fast": json.dumps(metadata)} if metadata is not None else None)


def read_shard_metadata(path: str) -> dict:
    return json.loads(_header(path)[1].get("__metadata__", {}).get("lfm_fast", "{}"))


class LatentShardWriter:
    """Accumulates batches of named tensors (`latents`, `labels`, and the conditions: `semantic` maps,
    `masked_latents` + `masks`) and writes fixed-size shards into `folder` (for latents made in memory: the tests,
    the benchmarks; `prepare` writes a shard per source range)."""

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
        write_shard(os.path.join(self.folder, name), {k: v[:n] for k, v in whole.items()})
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
            if os.path.isfile(os.path.join(folder, "prepare_job.json")):
                raise InputError(f"latents {folder}: an unfinished `lfm-fast prepare` (no meta.json yet); rerun the same "
                                 f"prepare command to finish it")
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

    @property
    def augmentations(self) -> set[str]:
        """What the shards carry for the paper's augmentation: "flip" (the flipped images' latents), "posterior"
        (the posterior's std)."""
        names = self._shard(0).keys() if self.meta["shards"] else ()
        return {a for a, key in (("flip", "latents_flip"), ("posterior", "latents_std")) if key in names}

    def _pick(self, name: str, indices, flips) -> np.ndarray:
        """Rows of `name`, or of its `_flip` twin where `flips` is set."""
        if flips is None or not np.any(flips):
            return self._gather(name, indices)
        flips = np.asarray(flips, bool)
        flip_name = name.replace("latents", "latents_flip", 1)
        out = self._gather(name, indices)
        out[flips] = self._gather(flip_name, np.asarray(indices)[flips])
        return out

    def get_batch(self, indices, flips=None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(latents, labels) of these samples: the posterior mean of each image, or of its mirror image where
        `flips[i]`; with `noise` (B, C, H, W), a posterior sample mean + std·noise instead."""
        x = torch.from_numpy(self._pick("latents", indices, flips))
        if noise is not None:
            x = x + torch.from_numpy(self._pick("latents_std", indices, flips)).float() * noise
        return x, torch.from_numpy(self._gather("labels", indices))

    def get_condition(self, indices, kind: str, picks=None, flips=None) -> torch.Tensor:
        """The model input of condition `kind` for these samples: semantic, the one-hot map (B, K, H, W) float;
        inpaint, [masked-image latent, hole mask on the latent grid] (B, C + 1, h, w) of mask `picks[i]` of sample i
        (each sample has `inpaint_masks` of them). Where `flips[i]`, the condition of the mirror image."""
        if kind not in self.conditions:
            raise InputError(f"latents {self.folder}: no {kind!r} conditions (they hold: {', '.join(self.conditions) or 'none'})")
        flips = None if flips is None else torch.as_tensor(np.asarray(flips, bool))
        mirror = (lambda t: torch.where(flips.view(-1, *[1] * (t.dim() - 1)), t.flip(-1), t)) if flips is not None else (lambda t: t)
        if kind == "semantic":
            maps = mirror(torch.from_numpy(self._gather("semantic", indices)).long())
            return torch.nn.functional.one_hot(maps, int(self.meta["semantic_classes"])).permute(0, 3, 1, 2).float()
        picks = np.zeros(len(indices), np.int64) if picks is None else np.asarray(picks)
        rows = np.arange(len(indices))
        masked = self._pick("masked_latents", indices, None if flips is None else flips.numpy())[rows, picks]
        masks = self._gather("masks", indices)[rows, picks][:, None].astype(np.float32) / self.meta.get("mask_levels", 1)
        return torch.cat([torch.from_numpy(masked), mirror(torch.from_numpy(masks))], dim=1)
