"""Image sources behind the one data SPEC of `train-ae`, `prepare` and `eval`, and the latent shards training reads.

SPEC is one of:
  shapes                     the embedded procedural set (labels and semantic maps)
  PATH                       an image folder, recursive: class sub-folders → labels (ImageNet's train folder of
                             synset folders included); no sub-folders → unconditional
  lmdb:PATH[?split=NAME]     LSUN's LMDB, or the CelebA-HQ / FFHQ layout of LFM's LMDBDataset (split train or
                             validation); told apart by what PATH holds
  celebamask:PATH[?split=…]  CelebAMask-HQ: images with their 19-class face-part maps (for semantic synthesis)
Any SPEC takes `?limit=N` (its first N items: LFM's LSUN runs use the first 120,000); options join with `&`.
"""

from __future__ import annotations

from torch.utils.data import Subset

from lfm_fast.data.folder import ImageFolderDataset
from lfm_fast.data.shapes import ShapesDataset
from lfm_fast.errors import InputError

SCHEMES = {"lmdb": ("split", "limit"), "celebamask": ("split", "limit"), "": ("limit",)}


def parse_spec(spec: str) -> tuple[str, str, dict[str, str]]:
    """'lmdb:data/x?split=validation&limit=5' → ('lmdb', 'data/x', {'split': 'validation', 'limit': '5'})."""
    body, _, query = spec.partition("?")
    scheme, sep, path = body.partition(":")
    if not sep or scheme not in SCHEMES or len(scheme) == 1:  # a plain path (a Windows drive letter stays a path)
        scheme, path = "", body
    options = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or key not in SCHEMES[scheme]:
            allowed = ", ".join(f"{k}=…" for k in SCHEMES[scheme])
            raise InputError(f"data {spec!r}: unknown option {item!r} (this source takes {allowed})")
        options[key] = value
    return scheme, path, options


def open_image_dataset(spec: str, image_size: int = 32, num_images: int = 6000, seed: int = 0):
    """A data SPEC (see the module docstring) → (dataset, class_names). Datasets are ImageSources (`key`, `read`)."""
    scheme, path, options = parse_spec(spec)
    if not scheme and path == "shapes":
        ds = ShapesDataset(num_images, image_size, seed)
    elif scheme == "lmdb":
        from lfm_fast.data.lmdb_data import LMDBDataset

        ds = LMDBDataset(path, image_size, options.get("split"))
    elif scheme == "celebamask":
        from lfm_fast.data.celebamask import CelebAMaskDataset

        ds = CelebAMaskDataset(path, image_size, options.get("split"))
    else:
        ds = ImageFolderDataset(path, image_size)
    if "limit" in options:
        try:
            limit = int(options["limit"])
            assert limit > 0
        except (ValueError, AssertionError):
            raise InputError(f"data {spec!r}: limit={options['limit']}: expected a positive count") from None
        if limit < len(ds):
            ds = LimitedSource(ds, limit)
    return ds, list(ds.classes)


class LimitedSource(Subset):
    """The first `limit` items of a source, with its interface."""

    def __init__(self, ds, limit: int):
        super().__init__(ds, range(limit))
        self.classes, self.semantic_classes, self.skipped = ds.classes, ds.semantic_classes, ds.skipped

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def key(self, i: int) -> str:
        return self.dataset.key(i)

    def read(self, i: int):
        return self.dataset.read(i)

    def describe(self) -> str:
        return self.dataset.describe()
