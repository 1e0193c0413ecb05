"""`LFMPipeline`: a trained run as one Python object, shaped like diffusers' pipelines.

    pipe = LFMPipeline.from_pretrained("runs/dit", device="cuda", dtype=torch.bfloat16)
    out = pipe(class_labels=[0, 3], num_inference_steps=16, guidance_scale=2.0, solver="heun")
    out.images[0].save("a.png"); out.nfe

The same object serves inpainting (`image=`, `mask_image=`, white = hole) and semantic-map checkpoints
(`semantic_map=`, class ids). It runs what `lfm-fast sample` runs (the same `Sampler`, for any backend, then the
exact composite for inpainting); the recipe defaults are the checkpoint's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lfm_fast.errors import InputError


@dataclass
class LFMPipelineOutput:
    images: Any  # a list of PIL images, uint8 (N, H, W, 3), or latents (N, C, h, w) fp32: as `output_type` asks
    nfe: Any  # `lfm_fast.generate.NfeCount`: NFE per batch and per image, network rows and FLOPs per image


def _as_array(x, mode: str, name: str) -> np.ndarray:
    """PIL images, arrays (H, W[, 3]), lists of them or a stacked batch → one stacked array: "RGB" uint8 (floats in [0, 1] scaled),
    "L" a bool hole mask (bool, 0/1 or 0–255 values; white = hole), "ids" int64 class ids (integers only)."""
    from PIL import Image

    batch = 4 if mode == "RGB" else 3  # an array of this many dims is a batch: (N, H, W, 3) images, (N, H, W) masks/maps
    items = list(x) if isinstance(x, (list, tuple)) or (isinstance(x, np.ndarray) and x.ndim == batch) else [x]
    if not items:
        raise InputError(f"{name}: an empty list")
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            item = item if mode == "ids" else item.convert(mode)
        out.append(np.asarray(item))
    if len({a.shape for a in out}) > 1:
        raise InputError(f"{name}: its items differ in size ({', '.join(str(a.shape) for a in out[:3])})")
    a = np.stack(out)
    if mode == "ids":
        if a.dtype.kind not in "iu":
            raise InputError(f"{name}: expected integer class ids, got {a.dtype}")
        return a.astype(np.int64)
    if mode == "L":
        return a.astype(bool) if a.dtype == bool or a.max() <= 1 else a > 127
    if a.dtype.kind == "f":
        if a.min() < 0 or a.max() > 1:
            raise InputError(f"{name}: float pixels must lie in [0, 1] (or pass uint8 0–255)")
        a = np.round(a * 255)
    return a.astype(np.uint8)


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name}={value!r}: expected a positive integer")
    return int(value)


class LFMPipeline:
    """A checkpoint, its autoencoder and a `Sampler` (lfm_fast.sampler) for one backend, called with the Python API's
    names for the options."""

    def __init__(self, model, vae, config: dict, folder: str | None = None, backend: str = "eager",
                 engine: str | None = None):
        from lfm_fast.sampler import Sampler

        self.model, self.vae, self.config, self.folder = model, vae, config, folder  # folder: calibrated grids
        self.sampler = Sampler(model, config, folder, backend, engine, vae)
        self.class_names, self.sigma_min = self.sampler.class_names, self.sampler.sigma_min

    @classmethod
    def from_pretrained(cls, run: str, device=None, dtype="auto", vae: str | None = None, backend: str = "eager",
                        engine: str | None = None) -> "LFMPipeline":
        """RUN: an inference checkpoint folder (config.json + model.safetensors: `train`'s output, `convert`'s).
        `dtype`: the network's (torch.bfloat16, "bf16", …; "auto": bf16 on CUDA, fp32 elsewhere; below fp32 the
        per-sample path stays fp32). `vae`: the autoencoder (builtin:NAME, a diffusers AutoencoderKL folder or hub id);
        default: the checkpoint's. `backend`: eager, compile, or onnxruntime / tensorrt with `engine` (a graph of
        `lfm-fast export`; it runs in the dtype it was exported in)."""
        from lfm_fast import default_device
        from lfm_fast.autoencoder import load_autoencoder
        from lfm_fast.generate import checkpoint_autoencoder, inference_model
        from lfm_fast.models.dit import DiT, read_checkpoint_config

        device = torch.device(device) if device is not None else default_device()
        config = read_checkpoint_config(run)
        spec = vae or checkpoint_autoencoder(config, run)
        if not spec:
            raise InputError(f"checkpoint {run} records no autoencoder; pass vae=")
        if backend in ("onnxruntime", "tensorrt") and not engine:
            raise InputError(f"backend={backend!r} needs engine= (a graph made by `lfm-fast export`)")
        if backend in ("onnxruntime", "tensorrt") and dtype != "auto":
            raise InputError(f"dtype={dtype!r}: a graph runs in the dtype it was exported in (export --fp16 / --bf16)")
        model = inference_model(DiT.from_pretrained(run), device, dtype if backend in ("eager", "compile") else "fp32")
        return cls(model, load_autoencoder(spec, device=device), config, run, backend, engine)

    @property
    def task(self) -> str:
        return self.sampler.task

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, solver: str | None = None, generator=None, seed: int | None = None,
                 output_type: str = "pil", image=None, mask_image=None, semantic_map=None, batch_size: int = 64,
                 progress: bool = False, **sample_options) -> LFMPipelineOutput:
        """Generate images. `class_labels` (class ids or names) or `num_images` say how many (per input image or map for the
        conditional tasks: `num_images`, default 1). Noise: image i from `seed + i` (as `lfm-fast sample --seed`), or
        drawn in order from `generator` (a torch.Generator, or one per image), or from torch's global generator.
        `num_inference_steps`, `guidance_scale`, `solver` and `sample_options` (grid, shift, atol, rtol, cfg_lo,
        cfg_hi) default to the checkpoint's recipe. `output_type`: "pil", "np" (uint8 N×H×W×3) or "latent"."""
        if output_type not in ("pil", "np", "latent"):
            raise InputError(f"output_type {output_type!r}: expected pil, np or latent")
        scfg = self._recipe(dict(steps=num_inference_steps, cfg=guidance_scale, solver=solver), sample_options)
        batch_size = _count("batch_size", batch_size)
        if seed is not None and generator is not None:
            raise InputError("seed and generator: pass one (seed + i for image i, or generators)")
        conds, composite_with = self._conditions(image, mask_image, semantic_map)
        inputs = 1 if conds is None else len(conds)
        labels = self._labels(class_labels, num_images, conds is not None)
        per = len(labels) if labels is not None else _count("num_images", num_images) if num_images is not None else 1
        total = per * inputs
        if labels is not None:
            labels = labels.repeat(inputs)
        if conds is not None:  # indexed as `sample` does, which keeps the layout (a copy could round differently)
            conds = conds[np.repeat(np.arange(inputs), per)]
        noise = self._noise(total, seed, generator)
        latents, images, nfe = self.sampler.draw(scfg, labels, list(range(total)), conds, batch_size, progress, noise)
        if output_type == "latent":
            if latents is None:
                raise InputError(f"output_type='latent': the graph {self.sampler.engine} ends with the decoder")
            return LFMPipelineOutput(latents, nfe)
        images = self.sampler.images(latents, batch_size) if images is None else images
        if composite_with is not None:  # every known pixel is the input's, exactly
            from lfm_fast.tasks import composite

            pixels, holes = composite_with
            images = composite(images, pixels.repeat(per, 0), holes.repeat(per, 0))
        if output_type == "np":
            return LFMPipelineOutput(images, nfe)
        from PIL import Image

        return LFMPipelineOutput([Image.fromarray(im) for im in images], nfe)

    def _recipe(self, named: dict, sample_options: dict):
        """The checkpoint's recipe with this call's options, checked, a calibrated grid's times loaded."""
        from lfm_fast.sampler import OPTIONS

        for name in sample_options:
            if name in ("steps", "cfg", "solver") or name not in OPTIONS:
                raise InputError(f"unknown sampling option {name!r} (options: grid, shift, atol, rtol, cfg_lo, cfg_hi; the "
                                 f"steps, scale and solver are num_inference_steps, guidance_scale and solver)")
        try:
            return self.sampler.recipe(**named, **sample_options)
        except InputError as e:  # named as this call names it
            raise InputError(str(e).replace("sample.steps", "num_inference_steps").replace("sample.cfg=", "guidance_scale=")
                             .replace("sample.", "").replace("--grid ", "grid=")) from None

    def _labels(self, class_labels, num_images, conditional: bool):
        """The labels of each input's images: `class_labels` (ids or names), else every class in turn (`num_images`,
        default one of each; one image an input for a conditional task), or None for a model without classes."""
        if class_labels is not None:
            return self.sampler.labels(class_labels)
        c = self.model.config
        return self.sampler.labels(None, _count("num_images", num_images) if num_images is not None else
                                   (1 if conditional else c.num_classes))

    def _noise(self, total: int, seed: int | None, generator) -> torch.Tensor:
        """Image i's noise from seed + i (as `lfm-fast sample --seed`), or drawn in order from `generator` (one, or one
        per image), or from torch's global generator."""
        from lfm_fast.sampling import per_image_noise

        c = self.model.config
        shape = (c.in_channels, c.input_size, c.input_size)
        if generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator] * total
            if len(gens) != total:
                raise InputError(f"generator: {len(gens)} generators for {total} images")
            return torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens]).cpu()
        if seed is not None:
            return per_image_noise([seed + i for i in range(total)], shape)
        return torch.randn((total, *shape))

    def _conditions(self, image, mask_image, semantic_map):
        """(conditions (N, ...) or None, (pixels, holes) to composite with or None), checked against the task."""
        task = self.task
        given = {"image": image is not None, "mask_image": mask_image is not None, "semantic_map": semantic_map is not None}
        need = {"inpaint": ("image", "mask_image"), "semantic": ("semantic_map",)}.get(task, ())
        for name, has in given.items():
            if has != (name in need):
                what = {"label": "class-conditional generation, which takes no image, mask_image or semantic_map",
                        "inpaint": "inpainting, which needs image= and mask_image=",
                        "semantic": "semantic maps, which needs semantic_map= alone"}[task]
                raise InputError(f"{name}: this checkpoint is for {what}")
        if task == "label":
            return None, None
        if task == "inpaint":
            pixels, holes = _as_array(image, "RGB", "image"), _as_array(mask_image, "L", "mask_image")
            if len(holes) == 1 and len(pixels) > 1:  # one mask for every image, as the CLI's
                holes = holes.repeat(len(pixels), 0)
            return self.sampler.conditions(pixels, holes), (pixels, holes)
        return self.sampler.conditions(maps=_as_array(semantic_map, "ids", "semantic_map")), None
