"""`lfm-fast sample`: generate images from a trained checkpoint."""

from __future__ import annotations

from lfm_fast.choices import INFERENCE_DTYPES, SOLVERS
from lfm_fast.cli.common import (add_backend_flags, add_grid_flags, add_nproc_flag, add_num_images, add_ode_steps,
                                 add_overwrite_flag, backend_overrides, check_positive)
from lfm_fast.cli.recipe import check_sampler_flags, check_task, parse_labels, sample_config, sampler, task_conditions
from lfm_fast.fileio import check_out_dir


def add_parser(sub) -> None:
    s = sub.add_parser("sample", help="generate images from a trained checkpoint")
    s.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors")
    add_num_images(s, 64, "images to generate (with --task inpaint|semantic: per input)")
    s.add_argument("--task", choices=("label", "inpaint", "semantic"), default=None,
                   help="label: class-conditional (or unconditional) generation; inpaint: fill the holes of --image "
                        "given by --mask; semantic: an image for each --semantic map (default: what the checkpoint "
                        "was trained for)")
    s.add_argument("--image", default=None, help="inpaint: an image, or a folder of images")
    s.add_argument("--mask", default=None, help="inpaint: the mask (white = hole, same size as the image; one mask "
                   "serves every image of an --image folder), or a folder of masks named as the images")
    s.add_argument("--semantic", default=None, help="semantic: a palette or grey PNG whose pixel values are class ids "
                   "(shapes: 0 background, 1 circle, 2 square, 3 triangle, 4 diamond, 5 cross, 6 ring), or a folder of them")
    s.add_argument("--labels", default=None, help="comma-separated class ids or names (the checkpoint's, e.g. circle,square), repeated "
                   "to --num-images (default: all classes in turn)")
    s.add_argument("--solver", choices=SOLVERS, default=None, help="default: the checkpoint's preset")
    add_ode_steps(s, "fixed-step solvers: number of ODE steps (default: the checkpoint's)")
    add_grid_flags(s)
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers' absolute tolerance (default: the checkpoint's)")
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers' relative tolerance (default: the checkpoint's)")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--batch-size", type=int, default=64, help="images per solver run (per rank)")
    s.add_argument("--ae", default=None, help="autoencoder to decode with (default: the one recorded in the checkpoint)")
    s.add_argument("--out", required=True, help="folder for the PNGs, grid.png and samples.npz (new or empty)")
    add_overwrite_flag(s)
    add_nproc_flag(s)
    s.add_argument("--backend", choices=("eager", "compile", "onnxruntime", "tensorrt"), default="eager",
                   help="eager: any solver; compile: the fixed-step sampler under torch.compile (on CUDA the network alone, with CUDA graphs; on CPU the whole unrolled sampler); "
                        "onnxruntime / tensorrt: a graph from `lfm-fast export` (--engine): a sampler graph runs its own "
                        "recipe; a velocity graph is driven by this command's solver, steps, grid and CFG")
    s.add_argument("--engine", default=None, help="the .onnx file (onnxruntime) or engine file (tensorrt, with its .json)")
    s.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                   help="the network's dtype with the eager and compile backends: auto = bf16 on CUDA, fp32 on CPU. "
                   "In bf16/fp16 the per-sample time and label embeddings and adaLN modulations stay fp32, and the "
                   "ODE state is always fp32")
    add_backend_flags(s)


def run(args):
    import numpy as np

    from lfm_fast.dist import init_distributed
    from lfm_fast.generate import NfeCount, inference_model, rank_indices, save_samples
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    check_sampler_flags(args)
    check_positive("--num-images", args.num)
    check_positive("--batch-size", args.batch_size)
    check_out_dir(args.out, args.overwrite, "sample")
    config = read_checkpoint_config(args.ckpt)
    task = check_task(args, config)
    d = init_distributed()
    model = DiT.from_pretrained(args.ckpt, **backend_overrides(args))
    # the network in the sampling dtype; a graph checks the weights it was exported from, which stay fp32 here
    model = inference_model(model, d.device, args.dtype if args.backend in ("eager", "compile") else "fp32")
    s = sampler(args, model, config, args.backend, args.ae)
    conds, source, task_inputs = task_conditions(args, task, s)
    total = args.num if source is None else len(source)
    all_labels = s.labels(parse_labels(args.labels), total, "--labels")
    scfg = sample_config(s, args)
    mine = rank_indices(total, args.batch_size, d.rank, d.world_size)  # this rank's whole batches
    seeds = [args.seed + i for i in mine]
    labels = None if all_labels is None else all_labels[mine]
    conds = None if conds is None else conds[mine]
    if args.backend == "compile" and d.is_main:
        import sys

        print("compiling the sampler (torch.compile): each new batch size compiles once, which takes a minute or more "
              "on a CPU", file=sys.stderr, flush=True)
    if mine:
        latents, images, nfe = s.draw(scfg, labels, seeds, conds, args.batch_size, d.is_main)
    else:  # more ranks than batches: this rank has nothing to draw and only joins the collective write
        latents, images, nfe = None, np.zeros((0, 1, 1, 3), np.uint8), 0
    if images is None:
        images = s.images(latents)
    grid = None
    if task != "label":
        from lfm_fast.tasks import composite, task_grid

        if task == "inpaint" and mine:  # every known pixel is the input's, exactly
            images = composite(images, task_inputs[0][source[mine]], task_inputs[1][source[mine]])
        panels = [task_inputs[0], np.repeat(task_inputs[1][..., None] * np.uint8(255), 3, -1)] if task == "inpaint" else task_inputs
        grid = lambda every: task_grid(every, source, panels)  # noqa: E731
    save_samples(d, args.out, images, mine, None if all_labels is None else all_labels.numpy(), args.overwrite, source, grid)
    if d.is_main:
        inputs = total // args.num
        per = f" ({args.num} for each of {inputs} input{'s' if inputs != 1 else ''})" if source is not None else ""
        nfe = nfe if isinstance(nfe, NfeCount) else f"NFE {nfe}"
        dtype = f" {str(next(model.parameters()).dtype).removeprefix('torch.')}" if args.backend in ("eager", "compile") else ""
        print(f"wrote {total} image{'s' if total != 1 else ''}{per} to {args.out} ({args.backend}{dtype}, {scfg.describe()}, "
              f"{nfe}, {d.world_size} rank{'s' if d.world_size > 1 else ''})")
