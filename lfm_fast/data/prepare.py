"""`lfm-fast prepare`: encode a data source once with the autoencoder into the latent shards of data/latents.py,
streaming and resumable, on one process or many (torchrun)."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

from lfm_fast.data.latents import read_shard_metadata, write_shard
from lfm_fast.errors import InputError
from lfm_fast.faults import fault_point
from lfm_fast.fileio import write_json


class Item(NamedTuple):
    """A source item as `prepare` reads it in a DataLoader worker. An unreadable one carries its error instead of an
    image (reported, not raised, so one bad file does not stop the workers)."""
    index: int
    image: torch.Tensor | None  # (H, W, 3) uint8
    label: int
    semantic: torch.Tensor | None  # (H, W) class ids, where the source has maps
    error: dict | None  # {"key", "reason"}: this item is unreadable; {"fatal": message}: the source itself is unusable


class _Items(Dataset):
    """A source's items as `Item`s."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from lfm_fast.data.images import UnreadableImage

        try:
            image, label, semantic = self.ds.read(i)
            return Item(i, torch.from_numpy(np.ascontiguousarray(image)), int(label),
                        None if semantic is None else torch.from_numpy(np.ascontiguousarray(semantic)), None)
        except UnreadableImage as e:
            return Item(i, None, 0, None, {"key": e.key, "reason": e.reason})
        except InputError as e:  # the source itself (not one item) is unusable: stopped in the main process, one line
            return Item(i, None, 0, None, {"fatal": str(e)})


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
    from lfm_fast.data.lmdb_data import close_envs
    from lfm_fast.data.shapes import ShapesDataset
    from lfm_fast.dist import init_distributed, launched_by_torchrun
    from lfm_fast.fileio import check_out_dir

    group = init_distributed("cpu") if launched_by_torchrun() else None  # gloo, for the set-up barriers only
    rank, world = (group.rank, group.world_size) if group else (0, 1)
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    state = _prepare_state(out)
    if state != "unfinished":
        check_out_dir(out, overwrite, "prepare")
    # the data source first where its size is known (a hub autoencoder may take a while to fail)
    ds, class_names = open_image_dataset(data_spec, image_size, num_images, seed) if image_size else (None, None)
    ae = load_autoencoder(ae_spec, device=device)
    size = image_size or int(ae.config.sample_size)
    ds, class_names = (ds, class_names) if ds is not None else open_image_dataset(data_spec, size, num_images, seed)
    f = downsample_factor(ae)
    if size % f:
        raise InputError(f"--image-size {size}: expected a multiple of the AE's downsampling factor {f}")
    meta = _index_meta(ae, ae_spec, out, ds, class_names, size, data_spec, flip, inpaint_masks, hole_range, seed)
    procedural = isinstance(getattr(ds, "dataset", ds), ShapesDataset)  # drawn in memory: nothing to decode
    job = dict(meta, source_items=len(ds), shard_size=shard_size, batch_size=batch_size, seed=seed,
               num_images=num_images if procedural else None)
    num_shards = -(-len(ds) // shard_size)
    resumed, made = _claim_folder(out, state, job, overwrite, num_shards, rank, group)

    mine = [k for k in range(rank, num_shards, world) if not os.path.isfile(os.path.join(out, _shard_name(k)))]
    batches = [list(range(lo, min(lo + batch_size, hi))) for k in mine
               for hi in [min(len(ds), (k + 1) * shard_size)] for lo in range(k * shard_size, hi, batch_size)]
    workers = (0 if procedural else min(4, os.cpu_count() or 1)) if workers is None else workers
    if workers:
        close_envs()  # the workers open their own
    loader = torch.utils.data.DataLoader(_Items(ds), batch_sampler=batches, num_workers=workers,
                                         collate_fn=_as_list, prefetch_factor=4 if workers else None)
    encoder = _Encoder(ae, flip, inpaint_masks, hole_range, seed, size, f, batch_size)
    try:
        rate = _encode_shards(loader, ds, out, shard_size, meta, strict, _key_field(ds),
                              sum(len(b) for b in batches), progress and rank == 0, encoder)
    except BaseException:
        if rank == 0 and state == "new":
            _abandon(out, made)
        raise
    return _write_index(out, ds, num_shards, meta, rate, resumed) if rank == 0 else {}


def _index_meta(ae, ae_spec, out, ds, class_names, size, data_spec, flip, inpaint_masks, hole_range, seed) -> dict:
    """meta.json's settings: what the shards hold and how they were made (the job's identity, with its sizes)."""
    from lfm_fast.autoencoder import downsample_factor
    from lfm_fast.data.masks import MASK_LEVELS
    from lfm_fast.fileio import portable_path

    f = downsample_factor(ae)
    semantic_classes = int(getattr(ds, "semantic_classes", 0))
    meta = {"autoencoder": portable_path(ae_spec, out),
            "scaling_factor": float(ae.config.scaling_factor), "image_size": size,
            "latent_shape": [int(ae.config.latent_channels), size // f, size // f],
            "num_classes": len(class_names), "class_names": class_names, "dataset": data_spec, "flip": flip,
            "conditions": (["semantic"] if semantic_classes else []) + (["inpaint"] if inpaint_masks else [])}
    if semantic_classes:
        meta["semantic_classes"] = semantic_classes
    if inpaint_masks:
        meta.update(inpaint_masks=inpaint_masks, hole_range=list(hole_range), mask_seed=seed, mask_levels=MASK_LEVELS)
    return meta


def _claim_folder(out, state, job, overwrite, num_shards, rank, group) -> tuple[int, bool]:
    """Check an unfinished prepare in `out` against this job, then (rank 0, once every rank has checked) clear what
    is not resumed and write the marker and the job. Returns (shards already done, whether `out` was made here)."""
    from lfm_fast.fileio import umask_mode, write_marker

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
    if group:
        group.barrier()  # every rank has validated (and read the folder's state) before rank 0 writes
    made = not os.path.exists(out)
    if rank == 0:  # everything is validated: the folder is written only now
        if state in ("complete", "replace") or (state == "unfinished" and not resumed):
            _clear_prepare(out)
        os.makedirs(out, mode=umask_mode(), exist_ok=True)
        write_marker(out, "prepare")
        write_json(os.path.join(out, "prepare_job.json"), job)
        if resumed:
            print(f"lfm-fast prepare: resuming {out}: {resumed} of {num_shards} shards are done", file=sys.stderr)
    if group:
        group.barrier()
    return resumed, made


def _abandon(out: str, made: bool) -> None:
    """A new prepare that finished no shard leaves no folder behind (a resumable one keeps its shards)."""
    from lfm_fast.fileio import MARKER

    if any(n.startswith("shard-") for n in os.listdir(out)):
        return
    _clear_prepare(out)
    os.remove(os.path.join(out, MARKER))
    if made and not os.listdir(out):
        os.rmdir(out)


def _write_index(out, ds, num_shards, meta, rate, resumed) -> dict:
    """Rank 0, once every rank's shards are on disk: prepare_report.json, then meta.json (last: the folder is
    complete). Returns the index with the skipped count and the shards resumed."""
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
    write_json(os.path.join(out, "meta.json"), meta)
    return dict(meta, skipped=len(skipped), resumed_shards=resumed)


def _encode_shards(loader, ds, out, shard_size, meta, strict, key_field, total, progress, encoder) -> float:
    """The encoding loop: batches in, a shard file out when its last batch is done. Returns images/s."""
    from tqdm.auto import tqdm

    parts: dict[str, list[torch.Tensor]] = {}
    skipped: list[dict] = []
    t0 = time.time()
    with tqdm(total=total, desc="prepare", unit="img", disable=not progress, mininterval=1) as bar:
        for items in loader:
            k = items[0].index // shard_size
            for it in items:
                if it.error is not None and "fatal" in it.error:
                    raise InputError(it.error["fatal"])
                if it.error is not None:
                    if strict:
                        raise InputError(f"{ds.describe()}: cannot read {it.error['key']} ({it.error['reason']}); "
                                         f"without --strict it is skipped and listed in prepare_report.json")
                    skipped.append({key_field: it.error["key"], "reason": it.error["reason"]})
            good = [it for it in items if it.image is not None]
            if good:
                encoder.encode(parts, good)
            bar.update(len(items))
            hi = min(len(ds), (k + 1) * shard_size)
            if items[-1].index == hi - 1:  # the shard's last batch
                tensors = {name: torch.cat(v) for name, v in parts.items()} if parts else _empty_shard(meta, encoder.flip)
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


@dataclass
class _Encoder:
    """What a prepare stores of each batch of readable items: the posterior mean and std of each image (and of its
    mirror image), labels, source indices, semantic maps, and the K masked-image latents with their masks."""
    ae: object
    flip: bool
    inpaint_masks: int
    hole_range: tuple[float, float]
    seed: int
    size: int
    f: int
    batch_size: int

    def encode(self, parts: dict[str, list[torch.Tensor]], good: list[Item]) -> None:
        """Encode one batch and append its tensors to `parts`."""
        from lfm_fast.autoencoder import encode
        from lfm_fast.data.masks import MASK_LEVELS, make_masks, masked_image_condition

        ae, flip, K, size, f, batch_size = self.ae, self.flip, self.inpaint_masks, self.size, self.f, self.batch_size
        index = torch.tensor([it.index for it in good])
        # NCHW in memory: a channels-last view would change the convolutions' sums (and the latents in their last bits)
        images = torch.stack([it.image for it in good]).permute(0, 3, 1, 2).contiguous().float().div(127.5).sub(1.0)
        views = [images, images.flip(-1)] if flip else [images]
        mean, std = encode(ae, torch.cat(views), 2 * batch_size, std=True)
        out = {"latents": mean[:len(good)], "latents_std": std[:len(good)].half(),
               "labels": torch.tensor([it.label for it in good]), "source_index": index}
        if flip:
            out.update(latents_flip=mean[len(good):], latents_flip_std=std[len(good):].half())
        if good[0].semantic is not None:
            out["semantic"] = torch.stack([it.semantic for it in good]).to(torch.uint8)
        if K:
            holes = torch.from_numpy(np.concatenate([make_masks(K, size, self.seed, self.hole_range, start=int(i) * K)
                                                     for i in index]))
            lat, grid = masked_image_condition(ae, images.repeat_interleave(K, 0), holes, f, batch_size)
            out["masked_latents"] = lat.view(len(good), K, *lat.shape[1:])
            if flip:
                lat_f, _ = masked_image_condition(ae, images.flip(-1).repeat_interleave(K, 0), holes.flip(-1), f, batch_size)
                out["masked_latents_flip"] = lat_f.view(len(good), K, *lat.shape[1:])
            out["masks"] = (grid.view(len(good), K, size // f, size // f) * MASK_LEVELS).round().to(torch.uint8)
        for name, t in out.items():
            parts.setdefault(name, []).append(t)
