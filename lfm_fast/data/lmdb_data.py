"""`lmdb:PATH`: the two LMDB layouts the LFM code reads, told apart by what PATH holds.

- LSUN's (`church_outdoor_train_lmdb`, `bedroom_train_lmdb`, …): PATH is the LMDB environment (it holds
  `data.mdb`); keys are anything (LSUN's are image ids), values encoded WebP/JPEG/PNG bytes. Items follow the key
  order of the database (byte order, as LSUN's own loader lists them), so `?limit=120000` is the first 120,000 —
  the subset LFM trains on.
- The CelebA-HQ / FFHQ one of LFM's `LMDBDataset`: PATH holds `train.lmdb` (and optionally `validation.lmdb`,
  read with `lmdb:PATH?split=validation`); keys are `str(index)`, values the raw RGB bytes of a square image
  (3·S² bytes, S the dataset's side: that of its first item) or encoded image bytes.

A value is read as raw RGB only in LFM's layout and only at the dataset's side; any other value that is not an
encoded image (in LSUN's layout, any at all) is an unreadable item, skipped and reported like a corrupt file.

Environments are opened read-only, without locks, once per process (an LMDB handle must not cross a fork, so
every DataLoader worker opens its own)."""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from lfm_fast.data.images import ImageSource, UnreadableImage, center_crop_arr, load_image
from lfm_fast.errors import InputError

_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM")


def _is_encoded(value: bytes) -> bool:
    return value[:4].startswith(_MAGIC) or (value[:4] == b"RIFF" and value[8:12] == b"WEBP")


_ENVS: dict[tuple[str, int], object] = {}  # (path, pid) → environment: LMDB allows one handle per process


def close_envs() -> None:
    """Close this process's environments: py-lmdb refuses to open one that the parent held open at a fork, so a
    DataLoader's workers can open their own only if the parent holds none (`prepare` calls this first)."""
    for key in [k for k in _ENVS if k[1] == os.getpid()]:
        _ENVS.pop(key).close()


def _open_env(path: str):
    try:
        import lmdb
    except ImportError:
        raise InputError("lmdb: the lmdb package is missing; pip install 'lfm-fast[lmdb]'") from None
    key = (os.path.realpath(path), os.getpid())
    if key not in _ENVS:
        try:
            _ENVS[key] = lmdb.open(path, readonly=True, lock=False, readahead=False, meminit=False, max_readers=256)
        except lmdb.Error as e:
            raise InputError(f"lmdb:{path}: cannot open it as an LMDB environment ({e})") from None
    return _ENVS[key]


class LMDBDataset(ImageSource):
    def __init__(self, path: str, image_size: int, split: str | None = None):
        self.path, self.image_size = path, image_size
        if os.path.isfile(path):
            raise InputError(f"lmdb:{path}: a file; name the LMDB folder (the one that holds data.mdb, or train.lmdb)")
        if os.path.isfile(os.path.join(path, "data.mdb")):
            if split is not None:
                raise InputError(f"lmdb:{path}?split={split}: this is one LMDB environment (LSUN's layout); "
                                 f"splits are folders train.lmdb / validation.lmdb of LFM's layout")
            self.layout, self.env_path, self.raw_side = "lsun", path, None  # LSUN's values are encoded images
            with _open_env(path).begin(write=False) as txn:
                self.keys = [k for k, _ in txn.cursor()]  # byte order of the keys
        else:
            split = split or "train"
            self.layout, self.env_path = "lfm", os.path.join(path, f"{split}.lmdb")
            if not os.path.isdir(path):
                raise InputError(f"lmdb:{path}: no such folder")
            if not os.path.isfile(os.path.join(self.env_path, "data.mdb")):
                found = sorted(f for f in os.listdir(path) if f.endswith(".lmdb"))
                raise InputError(f"lmdb:{path}: neither an LMDB environment (data.mdb) nor a folder with {split}.lmdb "
                                 f"(LFM's layout){'; it holds ' + ', '.join(found) if found else ''}")
            with _open_env(self.env_path).begin(write=False) as txn:
                n = txn.stat()["entries"]
                self.keys = [str(i).encode() for i in range(n)]
                if n and txn.get(self.keys[-1]) is None:
                    raise InputError(f"lmdb:{self.env_path}: {n} entries but no key {n - 1!r}; LFM's layout keys "
                                     f"images by str(index)")
                first = txn.get(self.keys[0]) if n else None
            # the side of the raw images: the first item's (None where it is encoded: no raw values expected)
            self.raw_side = None if first is None or _is_encoded(first) else math.isqrt(len(first) // 3)
        close_envs()  # listed: reads open it again, in whichever process they run
        if not self.keys:
            raise InputError(f"lmdb:{path}: the database is empty")
        self.classes = []

    def __len__(self):
        return len(self.keys)

    def key(self, i: int) -> str:
        return self.keys[i].decode("utf-8", "backslashreplace")

    def _txn_get(self, key: bytes):
        with _open_env(self.env_path).begin(write=False) as txn:  # each DataLoader worker opens its own
            return txn.get(key)

    def read(self, i: int):
        value, key = self._txn_get(self.keys[i]), self.key(i)
        if value is None:
            raise UnreadableImage(key, "no such key")
        if not _is_encoded(value):  # LFM's raw layout: a square RGB image of the dataset's side, row-major
            side = self.raw_side
            if side is None or len(value) != 3 * side * side:
                raw = f"raw RGB of this dataset's {side}×{side} images" if side else (
                    "raw RGB (LSUN's values are encoded images)" if self.layout == "lsun" else
                    "raw RGB (this dataset's first item is an encoded image)")
                raise UnreadableImage(key, f"{len(value)} bytes: neither an encoded image nor {raw}")
            img = Image.fromarray(np.frombuffer(value, np.uint8).reshape(side, side, 3), "RGB")
            return center_crop_arr(img, self.image_size), 0, None
        return load_image(value, self.image_size, key), 0, None

    def describe(self) -> str:
        return f"lmdb:{self.path}"
