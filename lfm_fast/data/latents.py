"""Latent shards: what `lfm-fast prepare` writes and training reads.

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
import sys
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch.utils.data import Dataset

from lfm_fast.errors import InputError
from lfm_fast.faults import fault_point
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


class _Items(Dataset):
    """A source's items as `prepare` reads them in DataLoader workers: (index, image, label, map, error) — an
    unreadable item is reported, not raised, so one bad file does not stop the workers."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from lfm_fast.data.images import UnreadableImage

        try:
            image, label, semantic = self.ds.read(i)
            return i, torch.from_numpy(np.ascontiguousarray(image)), int(label), \
                None if semantic is None else torch.from_numpy(np.ascontiguousarray(semantic)), None
        except UnreadableImage as e:
            return i, None, 0, None, {"key": e.key, "reason": e.reason}
        except InputError as e:  # the source itself (not one item) is unusable: stopped in the main process, one line
            return i, None, 0, None, {"fatal": str(e)}


def _as_list(items):
    return items


def _key_field(ds) -> str:
    from lfm_fast.data.lmdb_data import LMDBDataset

    inner = getattr(ds, "dataset", ds)
    return "key" if isinstance(inner, LMDBDataset) else "path"


PREPARE_FILES = ("meta.json", "prepare_report.json", "prepare_job.json")


def prepare_latents(ae_spec: str, data_spec: str, out: str, image_size: int | None = None, num_images: int = 6000,
                    batch_size: int = 64, seed: int = 0, progress: bool = True, overwrite: bool = False,
                    inpaint_masks: int = 0, hole_range: tuple[float, float] = (0.1, 0.6), flip: bool = True,
                    shard_size: int = 4096, strict: bool = False, workers: int | None = None) -> dict:
    """Encode a data source once with the AE into latent shards (LFM re-encoded every batch; we cache), streaming:
    DataLoader workers decode, the AE encodes in batches, and shard k (source items [k·S, (k+1)·S)) is written
    atomically when done. Killed and rerun with the same settings, it continues from the shards on disk, and the
    result is the one an uninterrupted run writes (the batches are the same: they never cross a shard). Under
    torchrun every rank takes every world-size-th shard; rank 0 writes the index (meta.json) and
    prepare_report.json (`encoded`, and `skipped`: the unreadable items, with why) when all are done.

    Per image: the posterior mean and std of the image and (with `flip`) of its mirror image; semantic maps where
    the data has them; with `inpaint_masks=K`, K seeded masks (LaMa-style, hole ratio in `hole_range`; mask k of
    item i is mask i·K + k of the seed's sequence): the latent of the masked image (holes grey) and the mask on the
    latent grid, so inpainting trains without running the encoder. `strict`: stop at the first unreadable item."""
    from lfm_fast.autoencoder import downsample_factor, load_autoencoder
    from lfm_fast.data import open_image_dataset
    from lfm_fast.data.masks import MASK_LEVELS
    from lfm_fast.dist import init_distributed, launched_by_torchrun
    from lfm_fast.fileio import MARKER, check_out_dir, portable_path, umask_mode, write_marker

    rank, world = 0, 1
    if launched_by_torchrun():
        d = init_distributed("cpu")  # a gloo group, for the set-up barrier; each rank encodes on its own device
        rank, world = d.rank, d.world_size
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    state = _prepare_state(out)
    if state != "unfinished":
        check_out_dir(out, overwrite, "prepare")
    ae = load_autoencoder(ae_spec, device=device)
    size = image_size or int(ae.config.sample_size)
    ds, class_names = open_image_dataset(data_spec, size, num_images, seed)
    f = downsample_factor(ae)
    if size % f:
        raise InputError(f"--image-size {size}: expected a multiple of the AE's downsampling factor {f}")
    semantic_classes = int(getattr(ds, "semantic_classes", 0))
    num_shards = -(-len(ds) // shard_size)
    meta = {"autoencoder": portable_path(ae_spec, out),
            "scaling_factor": float(ae.config.scaling_factor), "image_size": size,
            "latent_shape": [int(ae.config.latent_channels), size // f, size // f],
            "num_classes": len(class_names), "class_names": class_names, "dataset": data_spec, "flip": flip,
            "conditions": (["semantic"] if semantic_classes else []) + (["inpaint"] if inpaint_masks else [])}
    if semantic_classes:
        meta["semantic_classes"] = semantic_classes
    if inpaint_masks:
        meta.update(inpaint_masks=inpaint_masks, hole_range=list(hole_range), mask_seed=seed, mask_levels=MASK_LEVELS)
    from lfm_fast.data.shapes import ShapesDataset

    procedural = isinstance(getattr(ds, "dataset", ds), ShapesDataset)  # drawn in memory: nothing to decode
    job = dict(meta, source_items=len(ds), shard_size=shard_size, batch_size=batch_size, seed=seed,
               num_images=num_images if procedural else None)
    resumed = 0
    if state == "unfinished":
        with open(os.path.join(out, "prepare_job.json")) as fh:
            old = json.load(fh)
        differs = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
        if differs and not overwrite:
            raise InputError(f"--out {out} holds an unfinished prepare with other settings (they differ in: "
                             f"{', '.join(differs)}); rerun it as it was to continue, or pass --overwrite to start over")
        resumed = 0 if differs else sum(os.path.isfile(os.path.join(out, _shard_name(k))) for k in range(num_shards))
        if differs:
            state = "replace"
    if world > 1:
        d.barrier()  # every rank has validated (and read the folder's state) before rank 0 writes
    made = not os.path.exists(out)
    if rank == 0:  # everything is validated: the folder is written only now
        if state in ("complete", "replace") or (state == "unfinished" and not resumed):
            _clear_prepare(out)
        os.makedirs(out, mode=umask_mode(), exist_ok=True)
        write_marker(out, "prepare")
        write_json(os.path.join(out, "prepare_job.json"), job)
        if resumed:
            print(f"lfm-fast prepare: resuming {out}: {resumed} of {num_shards} shards are done", file=sys.stderr)
    if world > 1:
        d.barrier()

    mine = [k for k in range(rank, num_shards, world) if not os.path.isfile(os.path.join(out, _shard_name(k)))]
    batches = [list(range(lo, min(lo + batch_size, hi))) for k in mine
               for hi in [min(len(ds), (k + 1) * shard_size)] for lo in range(k * shard_size, hi, batch_size)]
    workers = (0 if procedural else min(4, os.cpu_count() or 1)) if workers is None else workers
    if workers:
        from lfm_fast.data.lmdb_data import close_envs

        close_envs()  # the workers open their own
    loader = torch.utils.data.DataLoader(_Items(ds), batch_sampler=batches, num_workers=workers,
                                         collate_fn=_as_list, prefetch_factor=4 if workers else None)
    key_field = _key_field(ds)
    try:
        rate = _encode_shards(loader, ds, out, shard_size, meta, flip, strict, key_field, len(batches) and
                              sum(len(b) for b in batches), progress and rank == 0,
                              dict(ae=ae, flip=flip, inpaint_masks=inpaint_masks, hole_range=hole_range, seed=seed,
                                   size=size, f=f, batch_size=batch_size))
    except BaseException:
        if rank == 0 and state == "new" and not any(n.startswith("shard-") for n in os.listdir(out)):
            _clear_prepare(out)  # nothing finished: leave no folder behind (a resumable one keeps its shards)
            os.remove(os.path.join(out, MARKER))
            if made and not os.listdir(out):
                os.rmdir(out)
        raise
    if rank != 0:
        return {}
    while not all(os.path.isfile(os.path.join(out, _shard_name(k))) for k in range(num_shards)):
        time.sleep(0.5)  # the other ranks' shards (torchrun stops this rank if one of them fails)
    shards, skipped, count = [], [dict(it) for it in getattr(ds, "skipped", [])], 0
    for k in range(num_shards):
        info = read_shard_metadata(os.path.join(out, _shard_name(k)))
        skipped += info["skipped"]
        if info["num"]:
            shards.append({"file": _shard_name(k), "num": info["num"]})
            count += info["num"]
    write_json(os.path.join(out, "prepare_report.json"), {"encoded": count, "skipped": skipped,
                                                           "images_per_s_last_run": rate})
    if not count:
        raise InputError(f"{ds.describe()}: no item could be read (see {os.path.join(out, 'prepare_report.json')})")
    meta = dict(meta, num_samples=count, shards=shards)
    write_json(os.path.join(out, "meta.json"), meta)  # last: the folder is complete
    return dict(meta, skipped=len(skipped), resumed_shards=resumed)


def _encode_shards(loader, ds, out, shard_size, meta, flip, strict, key_field, total, progress, enc) -> float:
    """The encoding loop: batches in, a shard file out when its last batch is done. Returns images/s."""
    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {}
    skipped: list[dict] = []
    t0 = time.time()
    with tqdm(total=total, desc="prepare", unit="img", disable=not progress, mininterval=1) as bar:
        for items in loader:
            k = items[0][0] // shard_size
            for it in items:
                if it[4] is not None and "fatal" in it[4]:
                    raise InputError(it[4]["fatal"])
                if it[4] is not None:
                    if strict:
                        raise InputError(f"{ds.describe()}: cannot read {it[4]['key']} ({it[4]['reason']}); without "
                                         f"--strict it is skipped and listed in prepare_report.json")
                    skipped.append({key_field: it[4]["key"], "reason": it[4]["reason"]})
            good = [it for it in items if it[1] is not None]
            if good:
                _encode_batch(parts, good, **enc)
            bar.update(len(items))
            hi = min(len(ds), (k + 1) * shard_size)
            if items[-1][0] == hi - 1:  # the shard's last batch
                tensors = {name: torch.cat(v) for name, v in parts.items()} if parts else _empty_shard(meta, flip)
                write_shard(os.path.join(out, _shard_name(k)), tensors,
                            {"rows": [k * shard_size, hi], "num": len(tensors["labels"]), "skipped": skipped})
                parts, skipped = {}, []
                fault_point("prepare-shard", k)
        return bar.n / max(time.time() - t0, 1e-9)


def _shard_name(k: int) -> str:
    return f"shard-{k:05d}.safetensors"


def _prepare_state(out: str) -> str:
    """"new" (no folder, or an empty one), "complete" (a meta.json), "unfinished" (a prepare killed or stopped
    before its index), or "other" (anything else: check_out_dir decides)."""
    if not os.path.isdir(out) or not os.listdir(out):
        return "new"
    from lfm_fast.fileio import read_marker

    if (read_marker(out) or {}).get("command") != "prepare":
        return "other"
    if os.path.isfile(os.path.join(out, "meta.json")):
        return "complete"
    return "unfinished" if os.path.isfile(os.path.join(out, "prepare_job.json")) else "other"


def _clear_prepare(out: str) -> None:
    """Remove what a prepare wrote in `out` (and nothing else): its shards, index, report and job."""
    if not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if name in PREPARE_FILES or (name.startswith("shard-") and name.endswith(".safetensors")):
            os.remove(os.path.join(out, name))


def _empty_shard(meta: dict, flip: bool) -> dict[str, torch.Tensor]:
    c, h, w = meta["latent_shape"]
    t = {"latents": torch.zeros(0, c, h, w), "latents_std": torch.zeros(0, c, h, w, dtype=torch.float16),
         "labels": torch.zeros(0, dtype=torch.long), "source_index": torch.zeros(0, dtype=torch.long)}
    if flip:
        t.update(latents_flip=t["latents"], latents_flip_std=t["latents_std"])
    return t


def _encode_batch(parts, good, ae, flip, inpaint_masks, hole_range, seed, size, f, batch_size) -> None:
    """Encode one batch of readable items and append its tensors to `parts`."""
    from lfm_fast.autoencoder import encode
    from lfm_fast.data.masks import MASK_LEVELS, make_masks, masked_image_condition

    index = torch.tensor([it[0] for it in good])
    # NCHW in memory: a channels-last view would change the convolutions' sums (and the latents in their last bits)
    images = torch.stack([it[1] for it in good]).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)
    views = [images, images.flip(-1)] if flip else [images]
    mean, std = encode(ae, torch.cat(views), 2 * batch_size, std=True)
    out = {"latents": mean[:len(good)], "latents_std": std[:len(good)].half(),
           "labels": torch.tensor([it[2] for it in good]), "source_index": index}
    if flip:
        out.update(latents_flip=mean[len(good):], latents_flip_std=std[len(good):].half())
    if good[0][3] is not None:
        out["semantic"] = torch.stack([it[3] for it in good]).to(torch.uint8)
    if inpaint_masks:
        K = inpaint_masks
        holes = torch.from_numpy(np.concatenate([make_masks(K, size, seed, hole_range, start=int(i) * K) for i in index]))
        lat, grid = masked_image_condition(ae, images.repeat_interleave(K, 0), holes, f, batch_size)
        out["masked_latents"] = lat.view(len(good), K, *lat.shape[1:])
        if flip:
            lat_f, _ = masked_image_condition(ae, images.flip(-1).repeat_interleave(K, 0), holes.flip(-1), f, batch_size)
            out["masked_latents_flip"] = lat_f.view(len(good), K, *lat.shape[1:])
        out["masks"] = (grid.view(len(good), K, size // f, size // f) * MASK_LEVELS).round().to(torch.uint8)
    for name, t in out.items():
        parts.setdefault(name, []).append(t)
