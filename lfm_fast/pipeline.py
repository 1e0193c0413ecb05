"""`LFMPipeline`: a trained run as one Python object, shaped like diffusers' pipelines.

    pipe = LFMPipeline.from_pretrained("runs/dit", device="cuda", dtype=torch.bfloat16)
    out = pipe(class_labels=[0, 3], num_inference_steps=16, guidance_scale=2.0, solver="heun")
    out.images[0].save("a.png"); out.nfe

The same object serves inpainting (`image=`, `mask_image=`, white = hole) and semantic-map checkpoints
(`semantic_map=`, class ids). It runs what `lfm-fast sample --backend eager` runs (`generate_latents`, the
autoencoder's decoder, the exact composite for inpainting); the recipe defaults are the checkpoint's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from lfm_fast.errors import InputError


@dataclass
class LFMPipelineOutput:
    images: Any  # a list of PIL images, uint8 (N, H, W, 3), or latents (N, C, h, w) fp32: as `output_type` asks
    nfe: Any  # `lfm_fast.generate.NfeCount`: NFE per batch and per image, network rows and FLOPs per image


def _as_array(x, mode: str) -> np.ndarray:
    """PIL images, arrays (H, W[, 3]) or lists of them → one stacked uint8/int64 array."""
    from PIL import Image

    items = x if isinstance(x, (list, tuple)) else [x]
    out = []
    for item in items:
        if isinstance(item, Image.Image):
            item = np.array(item if mode == "ids" else item.convert(mode))
        out.append(np.asarray(item))
    return np.stack(out)


class LFMPipeline:
    def __init__(self, model, vae, config: dict):
        self.model, self.vae, self.config = model, vae, config
        meta = config.get("meta", {})
        self.class_names = meta.get("class_names", [])
        self.sigma_min = float(meta.get("experiment", {}).get("flow", {}).get("sigma_min", 1e-5))

    @classmethod
    def from_pretrained(cls, run: str, device=None, dtype=torch.float32, vae: str | None = None) -> "LFMPipeline":
        """RUN: an inference checkpoint folder (config.json + model.safetensors: `train`'s output, `convert`'s).
        `vae`: the autoencoder (builtin:NAME, a diffusers AutoencoderKL folder or hub id); default: the checkpoint's."""
        from lfm_fast import default_device
        from lfm_fast.autoencoder import load_autoencoder
        from lfm_fast.fileio import resolve_path
        from lfm_fast.models.dit import DiT, read_checkpoint_config

        device = torch.device(device) if device is not None else default_device()
        config = read_checkpoint_config(run)
        spec = vae or resolve_path(config.get("meta", {}).get("autoencoder", ""), run)
        if not spec:
            raise InputError(f"checkpoint {run} records no autoencoder; pass vae=")
        model = DiT.from_pretrained(run).eval().to(device, dtype)
        return cls(model, load_autoencoder(spec, device=device), config)

    @property
    def task(self) -> str:
        return {"none": "label"}.get(self.model.config.condition, self.model.config.condition)

    @torch.no_grad()
    def __call__(self, class_labels=None, num_images: int | None = None, num_inference_steps: int | None = None,
                 guidance_scale: float | None = None, solver: str | None = None, generator=None, seed: int | None = None,
                 output_type: str = "pil", image=None, mask_image=None, semantic_map=None, batch_size: int = 64,
                 progress: bool = False, **sample_options) -> LFMPipelineOutput:
        """Generate images. `class_labels` (ints) or `num_images` say how many (per input image or map for the
        conditional tasks: `num_images`, default 1). Noise: image i from `seed + i` (as `lfm-fast sample --seed`), or
        drawn in order from `generator` (a torch.Generator, or one per image), or from torch's global generator.
        `num_inference_steps`, `guidance_scale`, `solver` and `sample_options` (grid, shift, atol, rtol, cfg_lo,
        cfg_hi) default to the checkpoint's recipe. `output_type`: "pil", "np" (uint8 N×H×W×3) or "latent"."""
        from lfm_fast.generate import generate_latents, latents_to_images
        from lfm_fast.sampling import SampleConfig, per_image_noise

        c = self.model.config
        if output_type not in ("pil", "np", "latent"):
            raise InputError(f"output_type {output_type!r}: expected pil, np or latent")
        recipe = self.config.get("meta", {}).get("experiment", {}).get("sample", {})
        scfg = SampleConfig(**{**dataclasses.asdict(SampleConfig()), **recipe})
        for name, value in dict(steps=num_inference_steps, cfg=guidance_scale, solver=solver, **sample_options).items():
            if not hasattr(scfg, name):
                raise InputError(f"unknown sampling option {name!r}")
            if value is not None:
                setattr(scfg, name, value)
        conds, composite_with = self._conditions(image, mask_image, semantic_map)
        inputs = 1 if conds is None else len(conds)
        if class_labels is not None:
            if not c.num_classes:
                raise InputError("class_labels: this checkpoint takes no class labels")
            labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1)
            if ((labels < 0) | (labels >= c.num_classes)).any():
                raise InputError(f"class_labels must lie in 0..{c.num_classes - 1}")
            per = len(labels)
        else:
            per = num_images or (1 if conds is not None else (c.num_classes or 1))
            labels = torch.arange(per) % c.num_classes if c.num_classes else None
        total = per * inputs
        if labels is not None:
            labels = labels.repeat(inputs)
        if conds is not None:
            conds = conds.repeat_interleave(per, dim=0)
        shape = (c.in_channels, c.input_size, c.input_size)
        if generator is not None:
            gens = generator if isinstance(generator, (list, tuple)) else [generator] * total
            if len(gens) != total:
                raise InputError(f"generator: {len(gens)} generators for {total} images")
            noise = torch.stack([torch.randn(shape, generator=g, device=g.device) for g in gens]).cpu()
        elif seed is not None:
            noise = per_image_noise([seed + i for i in range(total)], shape)
        else:
            noise = torch.randn((total, *shape))
        latents, nfe = generate_latents(self.model, labels, list(range(total)), scfg, batch_size, progress, conds,
                                        self.sigma_min, noise=noise)
        if output_type == "latent":
            return LFMPipelineOutput(latents, nfe)
        images = latents_to_images(self.vae, latents, batch_size)
        if composite_with is not None:  # every known pixel is the input's, exactly
            from lfm_fast.tasks import composite

            pixels, holes = composite_with
            images = composite(images, pixels.repeat(per, 0), holes.repeat(per, 0))
        if output_type == "np":
            return LFMPipelineOutput(images, nfe)
        from PIL import Image

        return LFMPipelineOutput([Image.fromarray(im) for im in images], nfe)

    def _conditions(self, image, mask_image, semantic_map):
        """(conditions (N, ...) or None, (pixels, holes) to composite with or None), checked against the task."""
        from lfm_fast.autoencoder import downsample_factor
        from lfm_fast.tasks import inpaint_condition, semantic_condition

        c, task = self.model.config, self.task
        given = {"image": image is not None, "mask_image": mask_image is not None, "semantic_map": semantic_map is not None}
        need = {"inpaint": ("image", "mask_image"), "semantic": ("semantic_map",)}.get(task, ())
        for name, has in given.items():
            if has != (name in need):
                raise InputError(f"{name}: this checkpoint is for {task}{' (needs image= and mask_image=)' if task == 'inpaint' else ''}"
                                 f"{' (needs semantic_map=)' if task == 'semantic' else ''}")
        if task == "label":
            return None, None
        if task == "inpaint":
            factor = downsample_factor(self.vae)
            size = c.input_size * factor
            pixels, holes = _as_array(image, "RGB").astype(np.uint8), _as_array(mask_image, "L") > 127
            if pixels.shape[1:3] != (size, size) or holes.shape != pixels.shape[:3]:
                raise InputError(f"image and mask_image: expected {size}×{size} each (got {pixels.shape[1:3]} and {holes.shape[1:]})")
            return inpaint_condition(self.vae, pixels, holes, factor), (pixels, holes)
        size = c.input_size << c.cond_stages
        maps = _as_array(semantic_map, "ids").astype(np.int64)
        if maps.shape[1:] != (size, size) or maps.min() < 0 or maps.max() >= c.semantic_classes:
            raise InputError(f"semantic_map: expected {size}×{size} class ids in 0..{c.semantic_classes - 1}")
        return semantic_condition(maps, c.semantic_classes), None
