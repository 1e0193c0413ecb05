"""`lfm-fast export`: the fixed-step sampler (N steps, CFG inside) or the velocity network as ONNX or a TensorRT engine."""

from __future__ import annotations

import os

from lfm_fast.choices import FIXED_SOLVERS
from lfm_fast.cli.common import add_grid_flags, add_ode_steps, flag
from lfm_fast.cli.recipe import autoencoder_spec, check_sampler_flags, sample_config, sampler
from lfm_fast.errors import InputError


def add_parser(sub) -> None:
    e = sub.add_parser("export", help="export the fixed-step sampler (N steps, CFG inside) or the velocity network as ONNX "
                       "or a TensorRT engine")
    e.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors")
    e.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="what --out holds")
    e.add_argument("--solver", choices=FIXED_SOLVERS, default=None,
                   help="the fixed-step solver to unroll; default: the checkpoint's")
    add_ode_steps(e, "ODE solver steps to unroll (default: the checkpoint's)")
    add_grid_flags(e)

    e.add_argument("--graph", choices=("sampler", "velocity"), default="sampler",
                   help="sampler: the whole N-step sampler in one graph, its recipe (solver, steps, grid, CFG) fixed, "
                        "the fastest for that recipe; velocity: the network alone (CFG rows batched through it), driven "
                        "by `sample`'s own solvers, so steps, solver, grid and CFG change without a new export")
    e.add_argument("--with-decoder", action="store_true", help="sampler graph: end with the AE decoder, outputs uint8 NHWC images")
    e.add_argument("--ae", default=None, help="autoencoder for --with-decoder (default: the checkpoint's)")
    precision = e.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true", help="the network's token path (and the decoder) in fp16, typed in "
                           "the graph; its per-sample path (time/label embeddings, adaLN modulations), the ODE state, times "
                           "and solver stay fp32. TensorRT builds it strongly typed")
    precision.add_argument("--bf16", action="store_true", help="the network in bf16 (as --fp16; ONNX opset 22; ONNX "
                           "Runtime's CPU provider cannot run it, TensorRT can)")
    e.add_argument("--batch-range", default=None, help="--format tensorrt: the optimization profile, MIN:MAX or "
                   "MIN:OPT:MAX: images for a sampler graph (default 1:64), network rows for a velocity graph, 2 per image "
                   "under CFG (default 1:128, what `sample`'s default --batch-size 64 needs)")
    e.add_argument("--out", required=True, help="the .onnx file (its weights in OUT.data past 1.5 GiB), or the TensorRT "
                   "engine file, with OUT.json beside it (new; see --overwrite)")
    e.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def run(args):
    import time

    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.export.onnx import export_onnx
    from lfm_fast.choices import FIXED_SOLVERS
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    check_sampler_flags(args)
    if os.path.isdir(args.out) or (os.path.lexists(args.out) and not args.overwrite):
        raise InputError(f"--out {args.out} exists{' and is a folder' if os.path.isdir(args.out) else ''}; name a new "
                         f"file{'' if os.path.isdir(args.out) else ', or pass --overwrite to replace it'}")
    if args.graph == "velocity":  # no recipe in the graph: a flag for one would be ignored
        for name in ("solver", "steps", "cfg", "cfg_interval", "grid", "shift"):
            if getattr(args, name) is not None:
                raise InputError(f"{flag(name)} {getattr(args, name)}: a velocity graph holds the network "
                                 f"alone; pass it to `sample`, which drives the graph (or export --graph sampler)")
        if args.with_decoder:
            raise InputError("--with-decoder: a velocity graph holds the network alone; `sample` decodes its latents")
    if args.format == "tensorrt":
        from lfm_fast.export.tensorrt import parse_batch_range, require_tensorrt

        batch_range = parse_batch_range(args.batch_range or ("1:128" if args.graph == "velocity" else "1:64"))
        require_tensorrt()  # before the ONNX export, not after it
    elif args.batch_range is not None:
        raise InputError(f"--batch-range {args.batch_range}: for --format tensorrt; an ONNX graph's batch is dynamic")
    if args.ae is not None and not args.with_decoder:
        raise InputError(f"--ae {args.ae}: the autoencoder is for --with-decoder (a sampler graph that outputs images)")
    config = read_checkpoint_config(args.ckpt)
    model = DiT.from_pretrained(args.ckpt).eval()
    s = sampler(args, model, config)
    scfg = sample_config(s, args)
    if args.graph == "sampler" and scfg.solver not in FIXED_SOLVERS:
        raise InputError(f"--solver {scfg.solver}{' (the checkpoint default)' if args.solver is None else ''}: the exported "
                         f"sampler unrolls the steps of {', '.join(FIXED_SOLVERS)}; pass one of them")
    ae = load_autoencoder(autoencoder_spec(config, args), device="cpu") if args.with_decoder else None
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    start = time.perf_counter()
    what = f"{args.graph} graph, network {dtype}"
    if args.format == "onnx":
        meta = export_onnx(model, args.out, scfg, ae, dtype, args.graph, s.sigma_min)
    else:
        import tempfile

        from lfm_fast.export.tensorrt import build_engine

        with tempfile.TemporaryDirectory(prefix="lfm-fast-export-") as tmp:  # the intermediate graph, never beside --out
            onnx_path = os.path.join(tmp, "graph.onnx")
            meta = export_onnx(model, onnx_path, scfg, ae, dtype, args.graph, s.sigma_min)
            record = build_engine(onnx_path, args.out, batch_range)
        what += f", TensorRT {record['tensorrt_version']} on {record['gpu']}, batch {':'.join(map(str, batch_range))}"
    recipe = "" if args.graph == "velocity" else f", {scfg.describe()}, NFE {meta.nfe}"
    print(f"wrote {args.out} ({what}{recipe}) in {time.perf_counter() - start:.1f} s")
