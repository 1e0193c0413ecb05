"""`Sampler`: one checkpoint's sampling for every backend: its recipe (the checkpoint's, changed by the caller's options
and checked), the labels, the task's conditions, the noise, the network, compiled network or exported graph that runs
the solver, and the decoder. `lfm-fast sample`, `export` and `calibrate` and `LFMPipeline` adapt it; each names the
options its own way (`spell`), and nothing else orchestrates sampling.

    s = Sampler(model, config, folder, backend="onnxruntime", engine="runs/sampler.onnx")
    scfg = s.recipe(steps=8)                      # refused if the graph unrolls another recipe
    latents, images, nfe = s.draw(scfg, s.labels(["circle", 3], 4), seeds=[0, 1, 2, 3])
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np
import torch

from lfm_fast.choices import NFE_PER_STEP, SOLVERS
from lfm_fast.errors import InputError
from lfm_fast.generate import (checkpoint_autoencoder, checkpoint_sample_config, checkpoint_sigma_min, class_ids, generate,
                               generate_latents, latents_to_images, resolve_times)
from lfm_fast.sampling import SampleConfig
from lfm_fast.validation import validate_section

BACKENDS = ("eager", "compile", "onnxruntime", "tensorrt")
GRAPH_BACKENDS = ("onnxruntime", "tensorrt")
OPTIONS = ("solver", "steps", "cfg", "grid", "shift", "atol", "rtol", "cfg_lo", "cfg_hi")


def keyword(name: str, value) -> str:
    """How a keyword caller (the Python API) gave an option, in errors."""
    return f"{ {'steps': 'num_inference_steps', 'cfg': 'guidance_scale'}.get(name, name)}={value!r}"


def trained_for(condition: str, num_classes: int) -> str:
    if condition != "none":
        return {"inpaint": "for inpainting", "semantic": "for semantic maps"}.get(condition, f"for {condition}")
    return f"of {num_classes} classes" if num_classes else "without conditions"


def graph_meta(backend: str, engine: str | None):
    """The `GraphMeta` of an exported graph: an ONNX graph's own, or the one a TensorRT engine's record keeps; read once
    per version of the file (a graph exported again in the same process is read again)."""
    if not engine:
        raise InputError(f"--backend {backend} needs --engine FILE (made by `lfm-fast export`)")
    stat = os.stat(engine) if os.path.isfile(engine) else None
    return _read_graph_meta(backend, engine, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_graph_meta(backend: str, engine: str, version):
    from lfm_fast.export.onnx import GraphMeta, read_metadata

    if backend == "onnxruntime":
        return read_metadata(engine)
    from lfm_fast.export.tensorrt import read_engine_record

    if engine.endswith(".onnx") and not os.path.isfile(engine + ".json"):
        raise InputError(f"--engine {engine}: an ONNX graph; run it with --backend onnxruntime, or build a "
                         f"TensorRT engine from the checkpoint with `lfm-fast export --format tensorrt`")
    return GraphMeta.from_props(read_engine_record(engine)["onnx"])


class Sampler:
    """Sampling from `model` (a DiT in its sampling dtype and device; fp32 for a graph backend, whose weights it checks)
    with `config` (its config.json) from checkpoint folder `folder` (calibrated grids, the recorded autoencoder).
    `backend`: eager (any solver), compile (the fixed-step sampler under torch.compile), onnxruntime / tensorrt (an
    exported `engine`: a sampler graph runs its own recipe, a velocity graph is driven by the solvers). `vae`: the
    decoder, or its spec (default: the checkpoint's). `spell(name, value)` says how the caller gave an option, in errors."""

    def __init__(self, model, config: dict, folder: str | None = None, backend: str = "eager", engine: str | None = None,
                 vae=None, spell=keyword):
        if backend not in BACKENDS:
            raise InputError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
        self.model, self.config, self.folder, self.backend, self.engine = model, config, folder, backend, engine
        self.vae, self.spell = vae, spell
        self.class_names = config.get("meta", {}).get("class_names", [])
        self.sigma_min = checkpoint_sigma_min(config)
        self.meta = self._check_graph() if backend in GRAPH_BACKENDS else None

    @property
    def task(self) -> str:
        return {"none": "label"}.get(self.model.config.condition, self.model.config.condition)

    @property
    def autoencoder(self):
        """The decoder: the one given (a module, or a spec to load), else the checkpoint's; loaded once, on the model's
        device."""
        if self.vae is None or isinstance(self.vae, str):
            from lfm_fast.autoencoder import load_autoencoder

            spec = self.vae or checkpoint_autoencoder(self.config, self.folder or "")
            if not spec:
                raise InputError(f"checkpoint {self.folder} records no autoencoder; pass --ae")
            self.vae = load_autoencoder(spec, device=self.device)
        return self.vae

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # the recipe ------------------------------------------------------------------------------------------------

    def recipe(self, **options) -> SampleConfig:
        """The checkpoint's recipe with `options` (SampleConfig fields; None: not given). A sampler graph's recipe is its
        own (a given option must equal it); otherwise an option the solver or grid would ignore is refused, the recipe
        checked and a calibrated grid's times loaded from the checkpoint folder."""
        unknown = set(options) - set(OPTIONS)
        if unknown:
            raise InputError(f"unknown sampling option {sorted(unknown)[0]!r}; expected one of {', '.join(OPTIONS)}")
        given = {k: v for k, v in options.items() if v is not None}
        scfg = checkpoint_sample_config(self.config)
        if self.meta is not None and self.meta.recipe is not None:
            return self._graph_recipe(scfg, given)
        for name, value in given.items():
            setattr(scfg, name, value)
        self._check_applies(given, scfg)
        validate_section("sample", scfg)
        return resolve_times(scfg, self.folder)

    def _check_applies(self, given: dict, scfg: SampleConfig) -> None:
        """Options the chosen solver or grid would ignore are refused, not ignored."""
        if scfg.solver not in NFE_PER_STEP:
            for name in ("steps", "grid", "shift"):
                if name in given:
                    raise InputError(f"{self.spell(name, given[name])}: {scfg.solver} is adaptive (its steps follow --atol/"
                                     f"--rtol) and takes no {'steps' if name == 'steps' else 'time grid'}; pass a fixed-step solver")
            return
        for name in ("atol", "rtol"):
            if name in given:
                adaptive = ", ".join(s for s in SOLVERS if s not in NFE_PER_STEP)
                raise InputError(f"{self.spell(name, given[name])}: {scfg.solver} is a fixed-step solver; tolerances are "
                                 f"for the adaptive ones ({adaptive})")
        if "shift" in given and scfg.grid in ("uniform", "calibrated"):
            raise InputError(f"{self.spell('shift', given['shift'])}: the {scfg.grid} grid takes no shift; pass --grid "
                             f"shifted or --grid power")
        if "grid" in given and scfg.grid in ("shifted", "power") and scfg.shift == 1.0:
            warnings.warn(f"{self.spell('grid', given['grid'])} with shift 1 is the uniform grid; pass --shift (e.g. 3 "
                          f"for shifted, 2 for power)")

    def _graph_recipe(self, scfg: SampleConfig, given: dict) -> SampleConfig:
        """A sampler graph's own recipe; options given must be the ones it was exported with."""
        recipe = self.meta.recipe
        for name in ("atol", "rtol"):
            if name in given:
                raise InputError(f"{self.spell(name, given[name])}: the graph {self.engine} unrolls {recipe.solver}, a "
                                 f"fixed-step solver; tolerances are for the adaptive ones")
        for name in ("solver", "steps", "cfg", "grid", "shift", "cfg_lo", "cfg_hi"):
            value = getattr(recipe, name)
            if name in given and type(value)(given[name]) != value:
                shown = f"cfg_interval={recipe.cfg_lo}:{recipe.cfg_hi}" if name in ("cfg_lo", "cfg_hi") else f"{name}={value}"
                raise InputError(f"{self.spell(name, given[name])}: the graph {self.engine} was exported with {shown} "
                                 f"(export --graph velocity to choose the recipe when sampling)")
        for name in ("solver", "steps", "cfg", "grid", "shift", "cfg_lo", "cfg_hi", "times"):
            setattr(scfg, name, getattr(recipe, name))
        return scfg

    # what each image is made from --------------------------------------------------------------------------------

    def labels(self, values=None, count: int | None = None, what: str = "class_labels") -> torch.Tensor | None:
        """Class ids from `values` (ids or the checkpoint's class names) repeated to `count` images, or every class in
        turn; None for a checkpoint without classes."""
        c = self.model.config
        if not c.num_classes:
            if values is not None:
                raise InputError(f"{what}: this checkpoint takes no class labels")
            return None
        if values is None:
            return torch.arange(count) % c.num_classes
        values = list(np.atleast_1d(np.asarray(values, dtype=object)))
        if not values:
            raise InputError(f"{what}: an empty list")
        ids = torch.tensor(class_ids(values, c.num_classes, self.class_names, what))
        return ids if count is None else ids[torch.arange(count) % len(ids)]

    def conditions(self, pixels: np.ndarray | None = None, holes: np.ndarray | None = None, maps: np.ndarray | None = None,
                   names: list[str] | None = None) -> torch.Tensor | None:
        """The task's conditions, one per input: inpainting's from RGB uint8 `pixels` (N, H, W, 3) and bool `holes`
        (N, H, W) (white = hole), semantic maps' from class-id `maps` (N, H, W); checked against the model (`names`
        say which input in an error). None for label generation."""
        from lfm_fast.tasks import check_holes, inpaint_condition, semantic_condition

        c = self.model.config
        if self.task == "inpaint":
            from lfm_fast.autoencoder import downsample_factor

            factor = downsample_factor(self.autoencoder)
            size = c.input_size * factor
            if pixels.shape[1:] != (size, size, 3) or holes.shape[1:] != (size, size) or len(holes) != len(pixels):
                raise InputError(f"image and mask_image: expected {len(pixels)} RGB image(s) and as many masks (or one), "
                                 f"{size}×{size} each; got images {pixels.shape} and masks {holes.shape}")
            check_holes(holes, names or [f"mask_image {i}" for i in range(len(holes))])
            return inpaint_condition(self.autoencoder, pixels, holes, factor)
        if self.task == "semantic":
            size = c.input_size << c.cond_stages
            if maps.shape[1:] != (size, size) or maps.min() < 0 or maps.max() >= c.semantic_classes:
                raise InputError(f"semantic_map: expected {size}×{size} class ids in 0..{c.semantic_classes - 1}")
            return semantic_condition(maps, c.semantic_classes)
        return None

    # drawing ------------------------------------------------------------------------------------------------------

    def draw(self, scfg: SampleConfig, labels: torch.Tensor | None, seeds: list[int], conds: torch.Tensor | None = None,
             batch_size: int = 64, progress: bool = False, noise: torch.Tensor | None = None):
        """Images for (labels[i], conds[i], seeds[i]) (or the given `noise`), batch by batch: (latents, None, NFE), or
        (None, uint8 images, NFE) from a sampler graph that ends with the decoder."""
        c, model = self.model.config, self.model
        shape = (c.in_channels, c.input_size, c.input_size)
        if self.backend == "compile":
            from lfm_fast.export.sampler import compile_sampler

            sampler, nfe = compile_sampler(model, scfg, sigma_min=self.sigma_min)
            run = (lambda n, y, cond=None: sampler(n, torch.zeros(n.shape[0], dtype=torch.long, device=n.device)
                                                   if y is None else y, cond))
            return generate(run, labels, seeds, shape, batch_size, self.device, progress, conds, noise), None, nfe
        if self.meta is not None:
            runner = self._runner(scfg, len(seeds), batch_size)
            if self.meta.graph == "sampler":
                def run(n, y, cond=None):
                    return runner(n, torch.zeros(n.shape[0], dtype=torch.long) if y is None else y, cond).cpu()

                out = generate(run, labels, seeds, shape, batch_size, "cpu", progress, conds, noise)
                return (None, out.numpy(), self.meta.nfe) if self.meta.with_decoder else (out, None, self.meta.nfe)
            from lfm_fast.export.ort import velocity_net

            model = velocity_net(runner, c)  # driven by the solvers as the eager network is
        latents, nfe = generate_latents(model, labels, seeds, scfg, batch_size, progress, conds, self.sigma_min, noise)
        return latents, None, nfe

    def images(self, latents: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        """Latents → uint8 (N, H, W, 3) through the autoencoder's decoder."""
        return latents_to_images(self.autoencoder, latents.float(), batch_size)

    # exported graphs ------------------------------------------------------------------------------------------------

    def _check_graph(self):
        """The engine's GraphMeta, checked against the checkpoint: latent shape, conditions, weights."""
        from lfm_fast.export.onnx import weights_digest

        meta, c, where = graph_meta(self.backend, self.engine), self.model.config, self.folder or "the model"
        if meta.latent_shape != (c.in_channels, c.input_size, c.input_size):
            raise InputError(f"--engine {self.engine}: its latent shape {list(meta.latent_shape)} does not match "
                             f"checkpoint {where}")
        if (meta.condition, meta.num_classes, meta.cond_shape) != (c.condition, c.num_classes, tuple(c.cond_shape)):
            raise InputError(f"--engine {self.engine} was exported from a model {trained_for(meta.condition, meta.num_classes)}, "
                             f"checkpoint {where} is one {trained_for(c.condition, c.num_classes)}: export this checkpoint")
        if meta.weights_sha256 != weights_digest(self.model):
            raise InputError(f"--engine {self.engine} was exported from other weights than checkpoint {where}'s: export "
                             f"this checkpoint")
        return meta

    def _runner(self, scfg: SampleConfig, count: int, batch_size: int):
        """A runner of the engine (a sampler graph's: called as (noise, labels, cond)) whose profile takes every batch
        of `count` images `batch_size` at a time."""
        sampler = self.meta.graph == "sampler"
        per = 2 if not sampler and scfg.cfg != 1.0 else 1  # rows an image: a velocity graph takes both CFG halves
        if self.backend == "onnxruntime":  # ONNX Runtime's TensorRT provider builds its profile for these batches
            from lfm_fast.export.ort import OrtGraph, OrtSampler

            most = min(batch_size, count) * per
            runner = (OrtSampler if sampler else OrtGraph)(self.engine, batch_range=(1, most, most))
        else:
            from lfm_fast.export.tensorrt import TensorRTRunner, TensorRTSampler

            runner = (TensorRTSampler if sampler else TensorRTRunner)(self.engine)
        for rows in {min(batch_size, count), count % batch_size or batch_size}:
            runner.check_batch(rows * per, f"--batch-size {batch_size}" + (" (2 network rows an image under CFG)" if per == 2 else ""))
        return runner
