"""What `sample`, `export` and `calibrate` give the Sampler (lfm_fast.sampler): the recipe flags, labels and task inputs
as this CLI spells them, checked."""

from __future__ import annotations

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


def parse_labels(text: str | None) -> list[str] | None:
    """--labels: comma-separated class ids or names (None: every class in turn)."""
    if text is None:
        return None
    values = [v.strip() for v in text.split(",") if v.strip()]
    if not values:
        raise InputError(f"--labels {text!r}: expected comma-separated class ids or names, like 0,3 or circle,square")
    return values


def spelling(args):
    """How this command's flags name a recipe option, with the text given (for the Sampler's errors)."""
    def spell(name: str, value) -> str:
        if name in ("cfg_lo", "cfg_hi"):
            return f"--cfg-interval {args.cfg_interval}"
        return f"{flag(name)} {getattr(args, name, value)}"
    return spell


def recipe_options(args) -> dict:
    """The recipe flags given (None: not given), as SampleConfig fields."""
    options = {name: getattr(args, name, None) for name in ("solver", "steps", "cfg", "grid", "shift", "atol", "rtol")}
    if getattr(args, "cfg_interval", None) is not None:
        options["cfg_lo"], options["cfg_hi"] = parse_interval(args.cfg_interval)
    return options


def sampler(args, model, config: dict, backend: str = "eager", vae=None):
    """The Sampler of this command: checkpoint --ckpt, errors in its flags' words."""
    from lfm_fast.sampler import Sampler

    return Sampler(model, config, args.ckpt, backend, getattr(args, "engine", None), vae, spelling(args))


def sample_config(sampler, args):
    """The recipe of --ckpt changed by the flags; calibrate's --nfe counts whole steps of the solver."""
    options = recipe_options(args)
    if getattr(args, "nfe", None) is not None:
        from lfm_fast.choices import NFE_PER_STEP

        solver = args.solver or sampler.recipe().solver
        per = NFE_PER_STEP[solver]
        if args.nfe % per:
            raise InputError(f"--nfe {args.nfe}: {solver} takes {per} NFE a step; pass a multiple of {per}")
        options["steps"] = args.nfe // per
    return sampler.recipe(**options)


def autoencoder_spec(config: dict, args) -> str:
    from lfm_fast.generate import checkpoint_autoencoder

    spec = args.ae or checkpoint_autoencoder(config, args.ckpt)
    if not spec:
        raise InputError(f"checkpoint {args.ckpt} records no autoencoder; pass --ae")
    return spec


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


def task_conditions(args, task: str, sampler):
    """(conditions of every image, the input each image comes from, the input panels of the grid), or Nones."""
    import numpy as np

    if task == "label":
        return None, None, None
    from lfm_fast.tasks import palette, read_inpaint_inputs, read_semantic_inputs

    c = sampler.model.config
    if task == "inpaint":
        from lfm_fast.autoencoder import downsample_factor

        names, pixels, holes = read_inpaint_inputs(args.image, args.mask, c.input_size * downsample_factor(sampler.autoencoder))
        conds, panels = sampler.conditions(pixels, holes), [pixels, holes]
    else:
        names, maps = read_semantic_inputs(args.semantic, c.input_size << c.cond_stages, c.semantic_classes)
        conds, panels = sampler.conditions(maps=maps), [palette(c.semantic_classes)[maps]]
    source = np.repeat(np.arange(len(names)), args.num)
    return conds[source], source, panels
