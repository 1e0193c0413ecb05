"""The sampling recipe `sample`, `export` and `calibrate` share: the checkpoint's, changed by flags; labels, task inputs,
engines."""

from __future__ import annotations

import functools
import os
import warnings

from lfm_fast.cli.common import check_positive, flag, parse_interval
from lfm_fast.errors import InputError


def check_sampler_flags(args):
    """--ode-steps, --shift, --atol, --rtol positive and --cfg non-negative where given (sample and export)."""
    for name in ("steps", "shift", "atol", "rtol"):
        if getattr(args, name, None) is not None:
            check_positive(flag(name), getattr(args, name))
    if args.cfg is not None:
        check_positive("--cfg", args.cfg, allow_zero=True)
    if getattr(args, "engine", None) and args.backend in ("eager", "compile"):
        raise InputError(f"--engine {args.engine}: engines run with --backend onnxruntime or --backend tensorrt "
                         f"(this run's backend is {args.backend})")
    if getattr(args, "dtype", "auto") != "auto" and args.backend not in ("eager", "compile"):
        raise InputError(f"--dtype {args.dtype}: a graph runs in the dtype it was exported in (export --fp16 / --bf16)")


def parse_labels(text: str | None, num: int, num_classes: int, class_names=()):
    """--labels (ids or the checkpoint's class names, comma-separated) repeated to `num` images, or every class in
    turn; None for a checkpoint without classes."""
    import torch

    from lfm_fast.generate import class_ids

    if num_classes == 0:
        if text:
            raise InputError("--labels: this checkpoint takes no class labels")
        return None
    if text is None:
        return torch.arange(num) % num_classes
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise InputError(f"--labels {text!r}: expected comma-separated class ids or names, like 0,3 or circle,square")
    return torch.tensor(class_ids(values, num_classes, class_names, f"--labels {text!r}"))[torch.arange(num) % len(values)]


def sample_config(config: dict, args):
    from lfm_fast.choices import NFE_PER_STEP
    from lfm_fast.generate import checkpoint_sample_config, resolve_times

    scfg = checkpoint_sample_config(config)
    for name in ("solver", "steps", "cfg", "grid", "shift", "atol", "rtol"):
        if getattr(args, name, None) is not None:
            setattr(scfg, name, getattr(args, name))
    if getattr(args, "nfe", None) is not None:  # calibrate: --nfe, in whole steps of the solver
        per = NFE_PER_STEP[scfg.solver]
        if args.nfe % per:
            raise InputError(f"--nfe {args.nfe}: {scfg.solver} takes {per} NFE a step; pass a multiple of {per}")
        scfg.steps = args.nfe // per
    if getattr(args, "cfg_interval", None) is not None:
        scfg.cfg_lo, scfg.cfg_hi = parse_interval(args.cfg_interval)
    backend = getattr(args, "backend", "eager")
    if backend in ("eager", "compile") or engine_meta(backend, args.engine).graph == "velocity":  # a sampler graph's
        check_flags_apply(args, scfg)  # own recipe: checked by open_graph
    return resolve_times(scfg, args.ckpt)


def check_flags_apply(args, scfg):
    """Flags given on the command line that the chosen solver or grid would ignore are refused, not ignored."""
    from lfm_fast.choices import NFE_PER_STEP, SOLVERS

    given = [n for n in ("steps", "grid", "shift", "atol", "rtol") if getattr(args, n, None) is not None]
    if scfg.solver not in NFE_PER_STEP:
        for name in ("steps", "grid", "shift"):
            if name in given:
                raise InputError(f"{flag(name)} {getattr(args, name)}: {scfg.solver} is adaptive (its steps follow --atol/"
                                 f"--rtol) and takes no {'steps' if name == 'steps' else 'time grid'}; pass a fixed-step solver")
        return
    for name in ("atol", "rtol"):
        if name in given:
            adaptive = ", ".join(s for s in SOLVERS if s not in NFE_PER_STEP)
            raise InputError(f"{flag(name)} {getattr(args, name)}: {scfg.solver} is a fixed-step solver; tolerances are for "
                             f"the adaptive ones ({adaptive})")
    if "shift" in given and scfg.grid in ("uniform", "calibrated"):
        raise InputError(f"--shift {args.shift}: the {scfg.grid} grid takes no shift; pass --grid shifted or --grid power")
    if "grid" in given and scfg.grid in ("shifted", "power") and scfg.shift == 1.0:
        warnings.warn(f"--grid {scfg.grid} with shift 1 is the uniform grid; pass --shift (e.g. 3 for shifted, 2 for power)")


def sigma_min(config: dict) -> float:
    from lfm_fast.generate import checkpoint_sigma_min

    return checkpoint_sigma_min(config)


def autoencoder_spec(config: dict, args) -> str:
    from lfm_fast.generate import checkpoint_autoencoder

    spec = args.ae or checkpoint_autoencoder(config, args.ckpt)
    if not spec:
        raise InputError(f"checkpoint {args.ckpt} records no autoencoder; pass --ae")
    return spec


def engine_meta(backend: str, engine: str | None):
    """The `GraphMeta` of --engine: an ONNX graph's own, or the one a TensorRT engine's record keeps; read once per
    version of the file (a command asks twice; a file exported again in the same process is read again)."""
    if not engine:
        raise InputError(f"--backend {backend} needs --engine FILE (made by `lfm-fast export`)")
    stat = os.stat(engine) if os.path.isfile(engine) else None
    return _read_engine_meta(backend, engine, stat and (stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read_engine_meta(backend: str, engine: str, version):
    if backend == "onnxruntime":
        from lfm_fast.export.onnx import read_metadata

        return read_metadata(engine)
    from lfm_fast.export.onnx import GraphMeta
    from lfm_fast.export.tensorrt import read_engine_record

    if engine.endswith(".onnx") and not os.path.isfile(engine + ".json"):
        raise InputError(f"--engine {engine}: an ONNX graph; run it with --backend onnxruntime, or build a "
                         f"TensorRT engine from the checkpoint with `lfm-fast export --format tensorrt`")
    return GraphMeta.from_props(read_engine_record(engine)["onnx"])


def draw(args, scfg, model, config: dict, labels, seeds: list[int], conds, total: int, device, progress: bool):
    """This rank's samples by --backend: (latents, None, NFE), or (None, uint8 images, NFE) from a sampler graph that
    ends with the decoder. Eager and a velocity graph run `scfg` through the solvers; compile and a sampler graph
    run the unrolled fixed-step sampler (a graph's own recipe, checked against the flags by `open_graph`)."""
    import torch

    from lfm_fast.generate import generate, generate_latents

    c, every = model.config, args.batch_size
    shape = (c.in_channels, c.input_size, c.input_size)
    net = model
    if args.backend == "compile":
        from lfm_fast.export.sampler import compile_sampler

        sampler, nfe = compile_sampler(model, scfg, sigma_min=sigma_min(config))
        run = (lambda n, y, cond=None: sampler(n, torch.zeros(n.shape[0], dtype=torch.long, device=n.device) if y is None
                                               else y, cond))
        return generate(run, labels, seeds, shape, every, device, progress=progress, conds=conds), None, nfe
    if args.backend in ("onnxruntime", "tensorrt"):
        meta, runner = open_graph(args, scfg, model, total)
        if meta.graph == "sampler":
            def run(noise, y, cond=None):
                y = torch.zeros(noise.shape[0], dtype=torch.long) if y is None else y
                return runner.run({"noise": noise, "labels": y, "cond": cond}).cpu()

            out = generate(run, labels, seeds, shape, every, progress=progress, conds=conds)
            return (None, out.numpy(), meta.nfe) if meta.with_decoder else (out, None, meta.nfe)
        from lfm_fast.export.ort import velocity_net

        net = velocity_net(runner, c)  # driven by the solvers as the eager network is
    latents, nfe = generate_latents(net, labels, seeds, scfg, every, progress=progress, conds=conds,
                                    sigma_min=sigma_min(config))
    return latents, None, nfe


def open_graph(args, scfg, model, total: int):
    """--engine for the onnxruntime / tensorrt backends, checked against the checkpoint and the flags (a sampler
    graph's recipe becomes `scfg`): (its GraphMeta, a runner whose profile takes every batch of this run)."""
    from lfm_fast.export.onnx import weights_digest

    meta, c = engine_meta(args.backend, args.engine), model.config
    if meta.latent_shape != (c.in_channels, c.input_size, c.input_size):
        raise InputError(f"--engine {args.engine}: its latent shape {list(meta.latent_shape)} does not match checkpoint "
                         f"{args.ckpt}")
    if (meta.condition, meta.num_classes, meta.cond_shape) != (c.condition, c.num_classes, tuple(c.cond_shape)):
        raise InputError(f"--engine {args.engine} was exported from a model {trained_for(meta.condition, meta.num_classes)}, "
                         f"checkpoint {args.ckpt} is one {trained_for(c.condition, c.num_classes)}: export this checkpoint")
    if meta.weights_sha256 != weights_digest(model):
        raise InputError(f"--engine {args.engine} was exported from other weights than checkpoint {args.ckpt}'s: export "
                         f"this checkpoint")
    if meta.recipe is not None:
        check_graph_recipe(args, meta.recipe)
        for name in ("solver", "steps", "cfg", "grid", "shift", "cfg_lo", "cfg_hi", "times"):
            setattr(scfg, name, getattr(meta.recipe, name))
    per = 2 if meta.graph == "velocity" and scfg.cfg != 1.0 else 1  # rows an image: both CFG halves through the graph
    if args.backend == "onnxruntime":  # ONNX Runtime's TensorRT provider builds its profile for this run's batches
        from lfm_fast.export.ort import OrtGraph

        most = min(args.batch_size, total) * per
        runner = OrtGraph(args.engine, batch_range=(1, most, most))
    else:
        from lfm_fast.export.tensorrt import TensorRTRunner

        runner = TensorRTRunner(args.engine)
    # every batch this run makes, against the engine's profile (TensorRT, or ONNX Runtime's TensorRT provider)
    for rows in {min(args.batch_size, total), total % args.batch_size or args.batch_size}:
        runner.check_batch(rows * per, f"--batch-size {args.batch_size}" + (" (2 network rows an image under CFG)" if per == 2 else ""))
    return meta, runner


def check_graph_recipe(args, recipe) -> None:
    """Recipe flags given with a sampler graph must be the ones it was exported with."""
    for tolerance in ("atol", "rtol"):
        if getattr(args, tolerance) is not None:
            raise InputError(f"--{tolerance} {getattr(args, tolerance)}: the graph {args.engine} unrolls "
                             f"{recipe.solver}, a fixed-step solver; tolerances are for the adaptive ones")
    fixed = {"solver": recipe.solver, "steps": recipe.steps, "cfg": float(recipe.cfg), "grid": recipe.grid,
             "shift": recipe.shift, "cfg_interval": (recipe.cfg_lo, recipe.cfg_hi)}
    for name, value in fixed.items():
        asked = getattr(args, name)
        if asked is None:
            continue
        given = parse_interval(asked) if name == "cfg_interval" else type(value)(asked)
        if given != value:
            shown = f"{value[0]}:{value[1]}" if name == "cfg_interval" else value
            raise InputError(f"{flag(name)} {asked}: the graph {args.engine} was exported with {name}={shown} (export "
                             f"--graph velocity to choose the recipe when sampling)")


def trained_for(condition: str, num_classes: int) -> str:
    if condition != "none":
        return {"inpaint": "for inpainting", "semantic": "for semantic maps"}.get(condition, f"for {condition}")
    return f"of {num_classes} classes" if num_classes else "without conditions"


def check_task(args, config: dict) -> str:
    """The task: --task, or what the checkpoint was trained for; its inputs present, and only its."""
    from lfm_fast.tasks import TASKS

    trained = config["model"].get("condition", "none")
    trained = "label" if trained == "none" else trained
    task = args.task or trained
    if task != trained:
        raise InputError(f"--task {task}: checkpoint {args.ckpt} was trained for {trained}"
                         f"{'-conditioned generation' if trained == 'label' else ''}, not {task}")
    need = {"inpaint": ("image", "mask"), "semantic": ("semantic",)}.get(task, ())
    for name in ("image", "mask", "semantic"):
        given = getattr(args, name) is not None
        if given != (name in need):
            why = " (it is for --task inpaint or semantic)" if task not in TASKS else (
                "" if args.task else f" (checkpoint {args.ckpt} was trained for {task})")
            raise InputError(f"--task {task} {'needs' if not given else 'takes no'} --{name}{why}")
    return task


def task_conditions(args, task: str, model, ae):
    """(conditions of every image, the input each image comes from, the input panels of the grid), or Nones."""
    import numpy as np

    if task == "label":
        return None, None, None
    from lfm_fast.autoencoder import downsample_factor
    from lfm_fast.tasks import inpaint_condition, palette, read_inpaint_inputs, read_semantic_inputs, semantic_condition

    c = model.config
    if task == "inpaint":
        factor = downsample_factor(ae)
        names, pixels, holes = read_inpaint_inputs(args.image, args.mask, c.input_size * factor)
        conds, panels = inpaint_condition(ae, pixels, holes, factor), [pixels, holes]
    else:
        names, maps = read_semantic_inputs(args.semantic, c.input_size << c.cond_stages, c.semantic_classes)
        conds, panels = semantic_condition(maps, c.semantic_classes), [palette(c.semantic_classes)[maps]]
    source = np.repeat(np.arange(len(names)), args.num)
    return conds[source], source, panels
