"""`lfm-fast` command line: demo | train-ae | prepare | train | sample | export | calibrate | eval | presets | convert.

A bad input ends with one line `lfm-fast: error: …` on stderr, exit code 2, and no partial output.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import warnings

from lfm_fast.errors import InputError, RunError
from lfm_fast.fileio import check_out_dir

EXAMPLES = """examples:
  lfm-fast demo --out runs/demo
  lfm-fast prepare --ae builtin:shapes --data shapes --out runs/latents
  lfm-fast train-ae --data shapes --out runs/ae --steps 2500 --latent-noise 0.1 --scale-equivariance 0.5
  lfm-fast train --latents runs/latents --preset small-data --out runs/dit --steps 2000 train.lr=5e-4
  lfm-fast train --nproc 2 --latents runs/latents --preset small-data --out runs/dit2 train.precision=bf16
  lfm-fast sample --ckpt runs/dit --num 64 --labels 0,3 --solver heun --ode-steps 16 --cfg 2 --seed 0 --out runs/samples
  lfm-fast export --ckpt runs/dit --format onnx --solver heun --ode-steps 8 --cfg 2 --with-decoder --out runs/sampler.onnx
  lfm-fast sample --ckpt runs/dit --backend onnxruntime --engine runs/sampler.onnx --num 64 --out runs/samples-ort
  lfm-fast calibrate --ckpt runs/dit --solver dpm++2m --nfe 16 --cfg 2
  lfm-fast sample --ckpt runs/dit --solver dpm++2m --ode-steps 16 --cfg 2 --grid calibrated --out runs/samples-cal
"""


class _Help(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one worth saying)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not any(action.default is v for v in (None, False, True, argparse.SUPPRESS)) and action.option_strings):
            text += " (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice) as one line too, like every other bad input; --help
    with the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        command = self.prog.removeprefix("lfm-fast").strip()
        self.exit(2, f"lfm-fast: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    """The whole command line, built without importing torch (`--help` answers in a fraction of a second)."""
    from lfm_fast.choices import FIXED_SOLVERS, INFERENCE_DTYPES, SOLVERS

    p = _Parser(prog="lfm-fast", description="Latent flow matching: train and sample DiT velocity networks "
                                "in an autoencoder's latent space.", epilog=EXAMPLES)
    from lfm_fast import __version__

    p.add_argument("--version", action="version", version=f"lfm-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of these (each has --help):")

    r = sub.add_parser("presets", help="list the experiment presets, or print one's full config (JSON)")
    r.add_argument("name", nargs="?", metavar="NAME", help="a preset: its whole config, as "
                   "`train --preset NAME` starts from and key=value overrides change")

    d = sub.add_parser("demo", help="end to end on the embedded shapes data: AE → latents → DiT → samples → report")
    d.add_argument("--task", choices=("label", "inpaint", "semantic"), default="label",
                   help="label: class-conditional generation with CFG; inpaint: fill a hole over the shape (known pixels "
                        "kept exactly); semantic: draw an image from a semantic map")
    d.add_argument("--out", default=None, help="output folder, new or empty; see --overwrite (default: runs/demo, or "
                   "runs/demo-TASK for --task inpaint|semantic)")
    _add_overwrite_flag(d)
    length = d.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a ≤2-minute run with tiny budgets (what the tests use)")
    length.add_argument("--long", action="store_true", help="the DiT trains 20,000 steps (instead of 6,000; 8,000 "
                        "for --task inpaint): ≤ 30 minutes")
    d.add_argument("--train-ae", action="store_true", help="train the autoencoder here (≈ 20 minutes more on 2 cores) instead of "
                   "using the pretrained builtin:shapes one")
    d.add_argument("--seed", type=int, default=0, help="seed of every stage (data, training, sampling)")

    a = sub.add_parser("train-ae", help="train the small built-in AutoencoderKL (for data without a pretrained AE)")
    a.add_argument("--data", required=True, help="'shapes' or an image folder")
    a.add_argument("--out", required=True, help="folder for the diffusers AutoencoderKL (config.json + weights)")
    _add_overwrite_flag(a)
    a.add_argument("--steps", type=int, default=800, help="training steps (builtin:shapes was trained 2,500)")
    a.add_argument("--batch-size", type=int, default=16, help="images per step")
    a.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    a.add_argument("--image-size", type=int, default=32, help="images are centre-cropped and resized to this")
    a.add_argument("--num-images", type=int, default=6000, help="shapes only: how many images to draw")
    a.add_argument("--latent-noise", type=float, default=0.0, metavar="SIGMA",
                   help="decode latents + SIGMA·std(latents)·noise while training, so the decoder forgives the small "
                        "latent errors of a generator (builtin:shapes used 0.1)")
    a.add_argument("--scale-equivariance", type=float, default=0.0, metavar="W",
                   help="weight of a second loss: the 2×-downsampled latent must decode to the 2×-downsampled image; "
                        "keeps high frequencies out of the latents, so a generator learns them faster (builtin:shapes used 0.5)")
    a.add_argument("--seed", type=int, default=0, help="seed of the data draw and the training")

    r = sub.add_parser("prepare", help="encode a dataset once into latent shards (safetensors)")
    r.add_argument("--ae", required=True, help="builtin:shapes (shipped, pretrained on shapes), an AutoencoderKL folder, "
                   "or a hub id such as stabilityai/sd-vae-ft-mse")
    r.add_argument("--data", required=True, metavar="SPEC", help="shapes | PATH (an image folder, recursive; class "
                   "sub-folders become labels, as ImageNet's synset folders) | lmdb:PATH[?split=validation] (LSUN's LMDB, "
                   "or LFM's CelebA-HQ/FFHQ layout with train.lmdb) | celebamask:PATH[?split=train|validation|all] "
                   "(CelebAMask-HQ, with its 19-class maps); any of them takes ?limit=N (the first N items)")
    r.add_argument("--out", required=True, help="folder for the latent shards (new or empty; an unfinished prepare "
                   "there, killed or stopped, is continued when rerun with the same settings)")
    _add_overwrite_flag(r)
    r.add_argument("--image-size", type=int, default=None, help="default: the AE's sample_size")
    r.add_argument("--num-images", type=int, default=None, help="shapes only: how many to draw (default 6000; other "
                   "sources take ?limit=N)")
    r.add_argument("--batch-size", type=int, default=64, help="images encoded at once")
    r.add_argument("--inpaint-masks", type=int, default=0, metavar="K",
                   help="for inpainting: K seeded masks per image, each stored as the latent of the masked image and "
                        "the mask on the latent grid (0: none)")
    r.add_argument("--hole-range", default="0.1:0.6", metavar="LO:HI", help="hole ratio range of those masks (the "
                   "inpainting demo trains with 0.3:0.7)")
    r.add_argument("--seed", type=int, default=0, help="seed of the shapes drawing and of the inpainting masks")
    r.add_argument("--no-flip", dest="flip", action="store_false", help="do not also encode each image's mirror image "
                   "(default: encoded, so training can flip as LFM does (data.flip); twice the encoding time; an image's latents "
                   "with their stds take 3× the disk of its mean alone, 1.5× without the mirror image)")
    r.add_argument("--shard-size", type=int, default=4096, metavar="N", help="source items per shard (the unit of "
                   "resuming and of the work split over --nproc ranks)")
    r.add_argument("--workers", type=int, default=None, metavar="N", help="DataLoader workers decoding images "
                   "(default: min(4, CPUs); 0 for shapes)")
    r.add_argument("--strict", action="store_true", help="stop at the first unreadable image, naming it (default: skip "
                   "it and list it in prepare_report.json)")
    _add_nproc_flag(r)

    t = sub.add_parser("train", help="train a DiT velocity network on latent shards")
    t.add_argument("--latents", default=None, help="folder written by `lfm-fast prepare` (required, except with --dry-run)")
    t.add_argument("--preset", default=None, help="a preset name (`lfm-fast presets` lists them); required for a new run (with --resume: "
                   "the run's own)")
    t.add_argument("--out", default=None, help="run folder: checkpoints/ (sharded, DCP), metrics.jsonl, grids, and the "
                   "final config.json + model.safetensors (the EMA weights; with train.ema_decay=0, as the paper presets have it, the "
                   "trained weights; none of these with train.save_checkpoints=false, for benchmark runs, which write "
                   "only metrics.jsonl and the grids); required, except with --dry-run")
    t.add_argument("--dry-run", action="store_true", help="build the preset's model and data pipeline on random latents "
                   "of its shape and print its parameters, forward GFLOP per image, activation memory per GPU count and "
                   "one step's time here (no --latents, no --out; nothing is written)")
    t.add_argument("--dry-run-batch", type=int, default=2, metavar="B", help="the reduced batch of --dry-run's timed "
                   "steps (its time is scaled to the preset's batch)")
    t.add_argument("--steps", type=int, default=None, help="train.steps (default: the preset's, or with --resume the run's)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out (any world size), "
                   "with the run's saved config; overrides may change lr, steps, logging and checkpointing, not the "
                   "model, data or batch")
    t.add_argument("--stop-at", type=int, default=None, metavar="STEP",
                   help="end (with a checkpoint) at this step, as a job with a time limit would; --resume goes on")
    _add_nproc_flag(t)
    _add_backend_flags(t)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4 model.qk_norm=true")

    s = sub.add_parser("sample", help="generate images from a trained checkpoint")
    s.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors")
    s.add_argument("--num", type=int, default=64, help="images to generate (with --task inpaint|semantic: per input)")
    s.add_argument("--task", choices=("label", "inpaint", "semantic"), default=None,
                   help="label: class-conditional (or unconditional) generation; inpaint: fill the holes of --image "
                        "given by --mask; semantic: an image for each --semantic map (default: what the checkpoint "
                        "was trained for)")
    s.add_argument("--image", default=None, help="inpaint: an image, or a folder of images")
    s.add_argument("--mask", default=None, help="inpaint: the mask (white = hole, same size as the image; one mask "
                   "serves every image of an --image folder), or a folder of masks named as the images")
    s.add_argument("--semantic", default=None, help="semantic: a palette or grey PNG whose pixel values are class ids "
                   "(shapes: 0 background, 1 circle, 2 square, 3 triangle, 4 diamond, 5 cross, 6 ring), or a folder of them")
    s.add_argument("--labels", default=None, help="comma-separated class ids, repeated to --num (default: all classes in turn)")
    s.add_argument("--solver", choices=SOLVERS, default=None, help="default: the checkpoint's preset")
    _add_ode_steps(s, "fixed-step solvers: number of ODE steps (default: the checkpoint's)")
    _add_grid_flags(s)
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers' absolute tolerance (default: the checkpoint's)")
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers' relative tolerance (default: the checkpoint's)")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--batch-size", type=int, default=64, help="images per solver run (per rank)")
    s.add_argument("--ae", default=None, help="autoencoder to decode with (default: the one recorded in the checkpoint)")
    s.add_argument("--out", required=True, help="folder for the PNGs, grid.png and samples.npz (new or empty)")
    _add_overwrite_flag(s)
    _add_nproc_flag(s)
    s.add_argument("--backend", choices=("eager", "compile", "onnxruntime", "tensorrt"), default="eager",
                   help="eager: any solver; compile: the unrolled fixed-step sampler under torch.compile; "
                        "onnxruntime / tensorrt: a graph from `lfm-fast export` (--engine): a sampler graph runs its own "
                        "recipe; a velocity graph is driven by this command's solver, steps, grid and CFG")
    s.add_argument("--engine", default=None, help="the .onnx file (onnxruntime) or engine file (tensorrt, with its .json)")
    s.add_argument("--dtype", choices=INFERENCE_DTYPES, default="auto",
                   help="the network's dtype with the eager and compile backends: auto = bf16 on CUDA, fp32 on CPU. "
                   "In bf16/fp16 the per-sample time and label embeddings and adaLN modulations stay fp32, and the "
                   "ODE state is always fp32")
    _add_backend_flags(s)

    e = sub.add_parser("export", help="export the fixed-step sampler (N steps, CFG inside) or the velocity network as ONNX "
                       "or a TensorRT engine")
    e.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors")
    e.add_argument("--format", choices=("onnx", "tensorrt"), default="onnx", help="what --out holds")
    e.add_argument("--solver", choices=FIXED_SOLVERS, default=None,
                   help="the fixed-step solver to unroll; default: the checkpoint's")
    _add_ode_steps(e, "ODE solver steps to unroll (default: the checkpoint's)")
    _add_grid_flags(e)

    k = sub.add_parser("calibrate", help="fit the time grid of a fixed-step solver to a checkpoint (for --grid calibrated)",
                       description="Fit the N-step time grid that minimises the solver's error against per-image "
                       "dopri5 (1e-7, float64) on a calibration batch, by gradient descent on the grid, and store it in "
                       "the checkpoint folder (calibrated_grids.json), where `sample/export --grid calibrated` find it.")
    k.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors (the grid is stored here)")
    k.add_argument("--nfe", type=int, required=True, help="network evaluations of the grid: steps × the solver's NFE per step")
    k.add_argument("--solver", choices=FIXED_SOLVERS, default="ab3", help="the fixed-step solver")
    k.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    k.add_argument("--cfg-interval", default=None, metavar="LO:HI", help="guidance interval (default: the checkpoint's)")
    k.add_argument("--num", type=int, default=64, help="calibration images (seeds 10⁶, 10⁶ + 1, …)")
    k.add_argument("--iters", type=int, default=60, help="gradient steps on the grid")
    k.add_argument("--overwrite", action="store_true", help="replace a grid already stored for the same solver, steps, "
                   "cfg and interval")
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

    c = sub.add_parser("convert", help="DiT weights to or from diffusers' DiTTransformer2DModel, or from the LFM paper's .pth",
                       description="--to diffusers: an inference checkpoint (config.json + model.safetensors) → a folder "
                       "that diffusers.DiTTransformer2DModel.from_pretrained loads (pass it timestep = t · time_scale). "
                       "--from diffusers: such a folder (e.g. facebookresearch/DiT's converted weights; learned-sigma "
                       "models keep their first C output channels) → an inference checkpoint. --from lfm: the LFM "
                       "paper's model_{epoch}.pth or content.pth (VinAIResearch/LFM's DiT) → an inference checkpoint "
                       "that samples as LFM's model does.")
    way = c.add_mutually_exclusive_group(required=True)
    way.add_argument("--to", choices=("diffusers",), help="convert SRC, one of our checkpoints, to this layout")
    way.add_argument("--from", dest="from_", choices=("diffusers", "lfm"), help="convert SRC, in this layout, to our checkpoint")
    c.add_argument("src", metavar="SRC", help="the folder (or, --from lfm, the .pth file) to convert")
    c.add_argument("out_pos", metavar="OUT", nargs="?", help=argparse.SUPPRESS)  # the first spelling: SRC OUT
    c.add_argument("--out", help="the new (or empty) folder to write; see --overwrite")
    c.add_argument("--arch", default=None, help="--from lfm: the DiT it is, e.g. DiT-L/2 (default: content.pth's "
                   "args.model_type)")
    c.add_argument("--num-classes", type=int, default=None, metavar="N", help="--from lfm: the class count (default: "
                   "content.pth's args, else from the label table: 1 row = unconditional, N + 1 rows = N classes)")
    c.add_argument("--weights", choices=("auto", "ema", "model"), default="auto", help="--from lfm content.pth: its EMA "
                   "weights (from the optimizer state) or its raw model_dict; auto: EMA where the run kept them")
    c.add_argument("--ae", default=None, help="the autoencoder to record in the new checkpoint (default: --from lfm, "
                   "content.pth's args.pretrained_autoencoder_ckpt, else LFM's stabilityai/sd-vae-ft-mse; otherwise none)")
    _add_overwrite_flag(c)

    v = sub.add_parser("eval", help="FID, precision/recall and latent FD of samples against a reference")
    v.add_argument("--samples", required=True, help="samples.npz (arr_0: N×H×W×3 uint8) or a folder of images")
    v.add_argument("--ref", required=True, help="reference: stats .npz (mu, sigma), images .npz (arr_0), a folder, or a "
                   "data SPEC of `prepare` (lmdb:PATH, celebamask:PATH, …?limit=N), resized to the samples' size")
    v.add_argument("--metrics", default="fid", help="comma-separated: fid, pr, latent_fd")
    v.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth (or $LFM_FAST_INCEPTION)")
    v.add_argument("--ae", default=None, help="autoencoder folder, for latent_fd")
    v.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    v.add_argument("--save-stats", default=None, help="also write the samples' Inception mu/sigma to this .npz")
    v.add_argument("--out", default=None, help="write the metrics JSON here (it is printed either way)")
    return p


def _add_grid_flags(p):
    from lfm_fast.choices import GRIDS

    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = off (default: the checkpoint's)")
    p.add_argument("--cfg-interval", default=None, metavar="LO:HI",
                   help="apply CFG only where LO ≤ t ≤ HI (t = 1 noise, 0 data); elsewhere the conditional half alone "
                        "(default: the checkpoint's, 0:1 = everywhere)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="time grid of fixed-step solvers: uniform; shifted (SD3's shift); power (t_i = (1 − i/N)^ρ, ρ = "
                        "--shift); calibrated (fitted by `lfm-fast calibrate`, stored with the checkpoint) "
                        "(default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="the shifted grid's shift, or the power grid's ρ (default: the checkpoint's)")


class _Once(argparse.Action):
    """A flag and its old spelling both given with different values: refused, not the last one silently kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) not in (None, values):
            parser.error(f"{option_string} {values}: the same setting as {_flag(self.dest)} given before "
                         f"({getattr(namespace, self.dest)}); --steps is its old spelling; give it once")
        setattr(namespace, self.dest, values)


def _add_ode_steps(p, help: str):
    """--ode-steps (the ODE solver's; `train --steps` counts optimizer steps), with --steps as its hidden old spelling."""
    p.add_argument("--ode-steps", dest="steps", type=int, default=None, metavar="N", action=_Once, help=help)
    p.add_argument("--steps", dest="steps", type=int, default=None, action=_Once, help=argparse.SUPPRESS)


def _flag(name: str) -> str:
    """The sampler flag of a SampleConfig field: `steps` → --ode-steps, `cfg_interval` → --cfg-interval."""
    return "--ode-steps" if name == "steps" else "--" + name.replace("_", "-")


def _add_overwrite_flag(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, if lfm-fast wrote it (never '.', a folder above it, or a training run)")


def _add_nproc_flag(p):
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N local processes (starts torchrun for you, as `torchrun --nproc_per_node=N -m "
                   "lfm_fast -- …` would, and reports a failure in one line). Multi-node: call torchrun yourself (README)")


def _add_backend_flags(p):
    from lfm_fast.choices import ATTENTION_BACKENDS, NORM_BACKENDS

    p.add_argument("--attn-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="attention kernels (default: the config's, 'auto' = Triton on CUDA for bf16/fp16, SDPA for fp32; on CPU plain matmuls (math) for bf16 up to 512 tokens, else SDPA)")
    p.add_argument("--norm-backend", choices=NORM_BACKENDS, default=None,
                   help="adaLN modulate / gated residual kernels, model.norm_backend: triton (fused Triton kernels; on "
                   "CPU they run Triton's interpreter only under TRITON_INTERPRET=1), compile (the PyTorch expression, "
                   "for torch.compile to fuse), reference (plain PyTorch), auto (Triton on CUDA, else PyTorch; default: "
                   "the config's)")
    p.add_argument("--kernels", dest="norm_backend", choices=NORM_BACKENDS, default=None, help=argparse.SUPPRESS)  # old name


def _backend_overrides(args) -> dict:
    return {k: v for k, v in (("attn_backend", args.attn_backend), ("norm_backend", args.norm_backend)) if v is not None}


def _cmd_demo(args):
    from lfm_fast.demo import run_demo

    budget = "quick" if args.quick else "long" if args.long else "full"
    out = args.out or ("runs/demo" if args.task == "label" else f"runs/demo-{args.task}")
    r = run_demo(out, task=args.task, budget=budget, seed=args.seed, train_ae=args.train_ae, overwrite=args.overwrite)
    if args.task == "label":
        headline = (f"shape_accuracy={r['shape_accuracy']:.3f} class_accuracy={r['class_accuracy']:.3f} ae_shape_accuracy="
                    f"{r['ae_shape_accuracy']:.3f} shape_fd={r['shape_fd']:.2f} (real-vs-real {r['shape_fd_real_vs_real']:.2f})")
    elif args.task == "inpaint":
        headline = (f"hole_label_consistency={r['hole_label_consistency']:.3f} (mean-colour fill "
                    f"{r['hole_label_consistency_mean_fill']:.3f}) fd_hole={r['fd_hole']:.2f} "
                    f"known_region_max_abs_err={r['known_region_max_abs_err']}")
    else:
        headline = f"miou={r['miou']:.3f} (real images {r['miou_real']:.3f}, AE reconstructions {r['miou_ae_reconstruction']:.3f})"
    print(f"wrote {out}/report.json, report.md, samples.png: {headline} nfe={r['nfe']} seconds_total={r['seconds_total']:.0f}")


def _check_sampler_flags(args):
    """--ode-steps, --shift, --atol, --rtol positive and --cfg non-negative where given (sample and export)."""
    for name in ("steps", "shift", "atol", "rtol"):
        if getattr(args, name, None) is not None:
            _check_positive(_flag(name), getattr(args, name))
    if args.cfg is not None:
        _check_positive("--cfg", args.cfg, allow_zero=True)
    if getattr(args, "engine", None) and args.backend in ("eager", "compile"):
        raise InputError(f"--engine {args.engine}: engines run with --backend onnxruntime or --backend tensorrt "
                         f"(this run's backend is {args.backend})")
    if getattr(args, "dtype", "auto") != "auto" and args.backend not in ("eager", "compile"):
        raise InputError(f"--dtype {args.dtype}: a graph runs in the dtype it was exported in (export --fp16 / --bf16)")


def _check_positive(name: str, value, allow_zero: bool = False):
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{name} {value}: expected a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} {value}: expected a {'non-negative' if allow_zero else 'positive'} number")


def _cmd_train_ae(args):
    from lfm_fast.autoencoder import train_autoencoder
    from lfm_fast.data import open_image_dataset

    for name in ("steps", "batch_size", "lr", "image_size", "num_images"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    for name in ("latent_noise", "scale_equivariance"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name), allow_zero=True)
    check_out_dir(args.out, args.overwrite, "train-ae")
    ds, _ = open_image_dataset(args.data, args.image_size, args.num_images, args.seed)
    import torch

    images = torch.stack([ds[i][0] for i in range(len(ds))])
    summary = train_autoencoder(images, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                latent_noise=args.latent_noise, scale_equivariance=args.scale_equivariance,
                                overwrite=args.overwrite)
    print(f"wrote {args.out}: recon_mse={summary['recon_mse']:.4f} scaling_factor={summary['scaling_factor']:.4f}")


def _cmd_prepare(args):
    from lfm_fast.data.latents import prepare_latents

    from lfm_fast.data import parse_spec

    for name in ("batch_size", "shard_size", "num_images", "image_size"):
        if getattr(args, name) is not None:
            _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    scheme, path, _ = parse_spec(args.data)
    if args.num_images is not None and (scheme or path != "shapes"):
        raise InputError(f"--num-images is for --data shapes; to read the first N items of {args.data}, add ?limit=N")
    args.num_images = args.num_images or 6000
    _check_positive("--inpaint-masks", args.inpaint_masks, allow_zero=True)
    if args.workers is not None:
        _check_positive("--workers", args.workers, allow_zero=True)
    try:
        lo, hi = (float(v) for v in args.hole_range.split(":"))
    except ValueError:
        raise InputError(f"--hole-range {args.hole_range}: expected LO:HI, e.g. 0.1:0.6") from None
    if not 0 <= lo <= hi <= 1 or hi == 0:
        raise InputError(f"--hole-range {args.hole_range}: expected 0 ≤ LO ≤ HI ≤ 1 and HI > 0")
    meta = prepare_latents(args.ae, args.data, args.out, args.image_size, args.num_images, args.batch_size, args.seed,
                           overwrite=args.overwrite, inpaint_masks=args.inpaint_masks, hole_range=(lo, hi),
                           flip=args.flip, shard_size=args.shard_size, strict=args.strict, workers=args.workers)
    if meta:  # rank 0
        classes = meta["num_classes"]
        print(f"wrote {args.out}: {meta['num_samples']} latents of shape {meta['latent_shape']}, {classes} "
              f"class{'' if classes == 1 else 'es'}{', conditions: ' + ', '.join(meta['conditions']) if meta['conditions'] else ''}"
              f"{', flips' if meta['flip'] else ''}; {meta['skipped']} skipped (prepare_report.json)")


def _cmd_train(args):
    from lfm_fast.config import apply_overrides, from_dict, get_preset
    from lfm_fast.train.checkpoint import latest_checkpoint, read_trainer_state
    from lfm_fast.train.loop import train

    if args.resume and args.out is None:
        raise InputError("--resume: name the run folder with --out")
    if args.resume:
        ckpt = latest_checkpoint(args.out)
        if ckpt is None:
            raise InputError(f"--resume: no complete checkpoint in {args.out}/checkpoints")
        base = from_dict(read_trainer_state(ckpt)["config"])
        if args.preset is not None and args.preset != base.name:
            raise InputError(f"--resume --preset {args.preset}: the run in {args.out} was trained with preset "
                             f"{base.name!r}; drop --preset (the run's own config is used)")
    elif args.preset is None:
        raise InputError("train: --preset is required for a new run (see lfm-fast train --help)")
    else:
        base = get_preset(args.preset)
    cfg = apply_overrides(base, args.overrides)
    if args.steps is not None:
        cfg.train.steps = args.steps
    for name, value in _backend_overrides(args).items():
        setattr(cfg.model, name, value)
    if args.dry_run:
        from lfm_fast.train.dryrun import dry_run, format_dry_run

        if args.resume or args.latents or args.out:
            raise InputError("--dry-run runs on random latents and writes nothing: drop --resume, --latents and --out")
        _check_positive("--dry-run-batch", args.dry_run_batch)
        print(format_dry_run(dry_run(cfg, args.dry_run_batch)))
        return
    for flag in ("latents", "out"):
        if getattr(args, flag) is None:
            raise InputError(f"train: --{flag} is required (or --dry-run)")
    if not os.path.isdir(args.latents):
        raise InputError(f"--latents {args.latents}: no such folder")
    result = train(cfg, args.latents, args.out, resume=args.resume, stop_at=args.stop_at)
    from lfm_fast.dist import is_main_process

    if is_main_process() and "stopped_by" in result and not cfg.train.save_checkpoints:
        print(f"lfm-fast: {result['stopped_by']}: stopped at step {result['step']} (train.save_checkpoints=false: "
              f"nothing to resume)", file=sys.stderr)
    elif is_main_process() and "stopped_by" in result:
        print(f"lfm-fast: {result['stopped_by']}: stopped at step {result['step']} with a checkpoint in {args.out}; "
              f"run the same command with --resume to continue", file=sys.stderr)
    elif is_main_process():
        unfinished = result["step"] < cfg.train.steps  # --stop-at
        after = ("; no checkpoint or weights (train.save_checkpoints=false)" if not cfg.train.save_checkpoints
                 else "; --resume continues it" if unfinished else "")
        print(f"wrote {args.out}: step {result['step']}{f' of {cfg.train.steps} (--stop-at)' if unfinished else ''}, "
              f"loss {result['last'].get('loss', float('nan')):.4f}{after}")


def parse_labels(text: str | None, num: int, num_classes: int):
    import torch

    if num_classes == 0:
        if text:
            raise InputError("--labels: this checkpoint takes no class labels")
        return None
    if text is None:
        return torch.arange(num) % num_classes
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"--labels {text!r}: expected comma-separated integers like 0,3,7") from None
    bad = [v for v in values if not 0 <= v < num_classes]
    if not values or bad:
        raise InputError(f"--labels {text!r}: class ids must lie in 0..{num_classes - 1}")
    return torch.tensor(values)[torch.arange(num) % len(values)]


def _sample_config(config: dict, args):
    from lfm_fast.generate import checkpoint_sample_config
    from lfm_fast.choices import NFE_PER_STEP
    from lfm_fast.sampling import time_grid

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
        scfg.cfg_lo, scfg.cfg_hi = _parse_interval(args.cfg_interval)
    backend = getattr(args, "backend", "eager")
    if backend in ("eager", "compile") or _engine_meta(args).get("graph") == "velocity":  # a sampler graph's own recipe:
        _check_flags_apply(args, scfg)  # checked by _graph_runner
    if scfg.grid == "calibrated" and scfg.solver in NFE_PER_STEP:
        from lfm_fast.calibrate import load_times

        scfg.times = load_times(args.ckpt, scfg)
    if scfg.solver in NFE_PER_STEP:
        try:
            time_grid(scfg.steps, scfg.grid, scfg.shift, scfg.times)
        except ValueError as e:
            raise InputError(f"--grid {scfg.grid}: {e}") from None
    return scfg


def _check_flags_apply(args, scfg):
    """Flags given on the command line that the chosen solver or grid would ignore are refused, not ignored."""
    from lfm_fast.choices import NFE_PER_STEP, SOLVERS

    given = [n for n in ("steps", "grid", "shift", "atol", "rtol") if getattr(args, n, None) is not None]
    if scfg.solver not in NFE_PER_STEP:
        for name in ("steps", "grid", "shift"):
            if name in given:
                raise InputError(f"{_flag(name)} {getattr(args, name)}: {scfg.solver} is adaptive (its steps follow --atol/"
                                 f"--rtol) and takes no {'steps' if name == 'steps' else 'time grid'}; pass a fixed-step solver")
        return
    for name in ("atol", "rtol"):
        if name in given:
            adaptive = ", ".join(s for s in SOLVERS if s not in NFE_PER_STEP)
            raise InputError(f"{_flag(name)} {getattr(args, name)}: {scfg.solver} is a fixed-step solver; tolerances are for "
                             f"the adaptive ones ({adaptive})")
    if "shift" in given and scfg.grid in ("uniform", "calibrated"):
        raise InputError(f"--shift {args.shift}: the {scfg.grid} grid takes no shift; pass --grid shifted or --grid power")
    if "grid" in given and scfg.grid in ("shifted", "power") and scfg.shift == 1.0:
        warnings.warn(f"--grid {scfg.grid} with shift 1 is the uniform grid; pass --shift (e.g. 3 for shifted, 2 for power)")


def _parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--cfg-interval {text}: expected LO:HI, two numbers in [0, 1] (e.g. 0.1:0.7)") from None
    if not 0 <= lo <= hi <= 1:
        raise InputError(f"--cfg-interval {text}: expected 0 ≤ LO ≤ HI ≤ 1")
    return lo, hi


def _sigma_min(config: dict) -> float:
    from lfm_fast.generate import checkpoint_sigma_min

    return checkpoint_sigma_min(config)


def _autoencoder_spec(config: dict, args) -> str:
    from lfm_fast.generate import checkpoint_autoencoder

    spec = args.ae or checkpoint_autoencoder(config, args.ckpt)
    if not spec:
        raise InputError(f"checkpoint {args.ckpt} records no autoencoder; pass --ae")
    return spec


def _engine_meta(args) -> dict:
    """The metadata of --engine (an ONNX graph's own, or a TensorRT engine's record), read once."""
    if not args.engine:
        raise InputError(f"--backend {args.backend} needs --engine FILE (made by `lfm-fast export`)")
    if not hasattr(args, "_engine_meta"):
        if args.backend == "onnxruntime":
            from lfm_fast.export.onnx import read_metadata

            args._engine_meta = read_metadata(args.engine)
        else:
            from lfm_fast.export.tensorrt import read_engine_record

            if args.engine.endswith(".onnx") and not os.path.isfile(args.engine + ".json"):
                raise InputError(f"--engine {args.engine}: an ONNX graph; run it with --backend onnxruntime, or build a "
                                 f"TensorRT engine from the checkpoint with `lfm-fast export --format tensorrt`")
            args._engine_meta = read_engine_record(args.engine)["onnx"]
    return args._engine_meta


def _graph_runner(args, scfg, model, total: int):
    """The onnxruntime / tensorrt backends, checked against the checkpoint and the flags: (run_batch, NFE,
    outputs_are_images) for a sampler graph, or a network the solvers drive (`GraphNet`) for a velocity graph."""
    import json

    import torch

    from lfm_fast.export.onnx import weights_digest

    meta = _engine_meta(args)
    c = model.config
    if json.loads(meta["latent_shape"]) != [c.in_channels, c.input_size, c.input_size]:
        raise InputError(f"--engine {args.engine}: its latent shape {meta['latent_shape']} does not match checkpoint {args.ckpt}")
    graph = (meta.get("condition", "none"), int(meta.get("num_classes", 0)), json.loads(meta.get("cond_shape", "[]")))
    if graph != (c.condition, c.num_classes, list(c.cond_shape)):
        raise InputError(f"--engine {args.engine} was exported from a model {_trained_for(*graph[:2])}, checkpoint "
                         f"{args.ckpt} is one {_trained_for(c.condition, c.num_classes)}: export this checkpoint")
    if meta.get("weights_sha256") != weights_digest(model):
        raise InputError(f"--engine {args.engine} was exported from other weights than checkpoint {args.ckpt}'s: export "
                         f"this checkpoint")
    velocity = meta.get("graph") == "velocity"
    if not velocity:
        for tolerance in ("atol", "rtol"):
            if getattr(args, tolerance) is not None:
                raise InputError(f"--{tolerance} {getattr(args, tolerance)}: the graph {args.engine} unrolls "
                                 f"{meta['solver']}, a fixed-step solver; tolerances are for the adaptive ones")
        interval = lambda text: tuple(float(v) for v in text.split(":"))  # noqa: E731
        for name, kind in (("solver", str), ("steps", int), ("cfg", float), ("grid", str), ("shift", float),
                           ("cfg_interval", interval)):
            asked = getattr(args, name)
            if asked is not None and kind(asked) != kind(meta[name]):
                raise InputError(f"{_flag(name)} {asked}: the graph {args.engine} was exported with "
                                 f"{name}={meta[name]} (export --graph velocity to choose the recipe when sampling)")
            if name == "cfg_interval":
                scfg.cfg_lo, scfg.cfg_hi = kind(meta[name])
            else:
                setattr(scfg, name, kind(meta[name]))
        scfg.times = tuple(json.loads(meta["times"]))
    per = 2 if velocity and scfg.cfg != 1.0 else 1  # network rows an image: both CFG halves go through a velocity graph
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
    if velocity:
        from lfm_fast.export.ort import velocity_net

        return velocity_net(runner, c)

    def run(noise, y, cond=None):
        y = torch.zeros(noise.shape[0], dtype=torch.long) if y is None else y
        return runner.run({"noise": noise, "labels": y, "cond": cond}).cpu()

    return run, int(meta["nfe"]), meta["with_decoder"] == "true"


def _trained_for(condition: str, num_classes: int) -> str:
    if condition != "none":
        return {"inpaint": "for inpainting", "semantic": "for semantic maps"}.get(condition, f"for {condition}")
    return f"of {num_classes} classes" if num_classes else "without conditions"


def _cmd_sample(args):
    import numpy as np
    import torch

    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.dist import init_distributed
    from lfm_fast.generate import (NfeCount, generate, generate_latents, inference_model, latents_to_images, rank_indices,
                                   save_samples)
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    _check_sampler_flags(args)
    for name in ("num", "batch_size"):
        _check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    check_out_dir(args.out, args.overwrite, "sample")
    config = read_checkpoint_config(args.ckpt)
    task = _check_task(args, config)
    d = init_distributed()
    model = DiT.from_pretrained(args.ckpt, **_backend_overrides(args))
    # the network in the sampling dtype; a graph checks the weights it was exported from, which stay fp32 here
    model = inference_model(model, d.device, args.dtype if args.backend in ("eager", "compile") else "fp32")
    c = model.config
    ae = load_autoencoder(_autoencoder_spec(config, args), device=d.device) if task == "inpaint" else None
    conds, source, task_inputs = _task_conditions(args, task, model, ae)
    total = args.num if source is None else len(source)
    all_labels = parse_labels(args.labels, total, c.num_classes)
    scfg = _sample_config(config, args)
    mine = rank_indices(total, args.batch_size, d.rank, d.world_size)  # this rank's whole batches
    seeds = [args.seed + i for i in mine]
    labels = None if all_labels is None else all_labels[mine]
    conds = None if conds is None else conds[mine]
    shape = (c.in_channels, c.input_size, c.input_size)
    images, progress = None, d.is_main
    if not mine:  # more ranks than batches: this rank has nothing to draw and only joins the collective write
        images, nfe = np.zeros((0, 1, 1, 3), np.uint8), 0
    elif args.backend == "eager":
        latents, nfe = generate_latents(model, labels, seeds, scfg, args.batch_size, progress=progress, conds=conds,
                                        sigma_min=_sigma_min(config))
    elif args.backend == "compile":
        from lfm_fast.export.sampler import compile_sampler

        sampler, nfe = compile_sampler(model, scfg, sigma_min=_sigma_min(config))
        run = (lambda n, y, cond=None: sampler(n, torch.zeros(n.shape[0], dtype=torch.long, device=n.device) if y is None
                                               else y, cond))
        latents = generate(run, labels, seeds, shape, args.batch_size, d.device, progress=progress, conds=conds)
    elif isinstance(graph := _graph_runner(args, scfg, model, total), tuple):
        run, nfe, gives_images = graph
        out = generate(run, labels, seeds, shape, args.batch_size, progress=progress, conds=conds)
        images, latents = (out.numpy(), None) if gives_images else (None, out)
    else:  # a velocity graph, driven by the solvers as the eager network is
        latents, nfe = generate_latents(graph, labels, seeds, scfg, args.batch_size, progress=progress, conds=conds,
                                        sigma_min=_sigma_min(config))
    if images is None:
        ae = ae or load_autoencoder(_autoencoder_spec(config, args), device=d.device)
        images = latents_to_images(ae, latents.float())
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


def _check_task(args, config: dict) -> str:
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


def _task_conditions(args, task: str, model, ae):
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


def _cmd_export(args):
    import time

    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.export.onnx import export_onnx
    from lfm_fast.choices import FIXED_SOLVERS
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    _check_sampler_flags(args)
    if os.path.isdir(args.out) or (os.path.lexists(args.out) and not args.overwrite):
        raise InputError(f"--out {args.out} exists{' and is a folder' if os.path.isdir(args.out) else ''}; name a new "
                         f"file{'' if os.path.isdir(args.out) else ', or pass --overwrite to replace it'}")
    if args.graph == "velocity":  # no recipe in the graph: a flag for one would be ignored
        for name in ("solver", "steps", "cfg", "cfg_interval", "grid", "shift"):
            if getattr(args, name) is not None:
                raise InputError(f"{_flag(name)} {getattr(args, name)}: a velocity graph holds the network "
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
    scfg = _sample_config(config, args)
    if args.graph == "sampler" and scfg.solver not in FIXED_SOLVERS:
        raise InputError(f"--solver {scfg.solver}{' (the checkpoint default)' if args.solver is None else ''}: the exported "
                         f"sampler unrolls the steps of {', '.join(FIXED_SOLVERS)}; pass one of them")
    ae = load_autoencoder(_autoencoder_spec(config, args), device="cpu") if args.with_decoder else None
    dtype = "float16" if args.fp16 else "bfloat16" if args.bf16 else "float32"
    start = time.perf_counter()
    what = f"{args.graph} graph, network {dtype}"
    if args.format == "onnx":
        meta = export_onnx(model, args.out, scfg, ae, dtype, args.graph, _sigma_min(config))
    else:
        import tempfile

        from lfm_fast.export.tensorrt import build_engine

        with tempfile.TemporaryDirectory(prefix="lfm-fast-export-") as tmp:  # the intermediate graph, never beside --out
            onnx_path = os.path.join(tmp, "graph.onnx")
            meta = export_onnx(model, onnx_path, scfg, ae, dtype, args.graph, _sigma_min(config))
            record = build_engine(onnx_path, args.out, batch_range)
        what += f", TensorRT {record['tensorrt_version']} on {record['gpu']}, batch {':'.join(map(str, batch_range))}"
    recipe = "" if args.graph == "velocity" else f", {scfg.describe()}, NFE {meta['nfe']}"
    print(f"wrote {args.out} ({what}{recipe}) in {time.perf_counter() - start:.1f} s")


def _cmd_calibrate(args):
    from lfm_fast.calibrate import GRIDS_FILE, calibrate
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    _check_positive("--nfe", args.nfe)
    _check_positive("--num", args.num)
    _check_positive("--iters", args.iters)
    if args.cfg is not None:
        _check_positive("--cfg", args.cfg, allow_zero=True)
    config = read_checkpoint_config(args.ckpt)
    args.grid = "uniform"  # the fit's own starting grids; a stored calibrated grid is replaced, not read
    scfg = _sample_config(config, args)
    model = DiT.from_pretrained(args.ckpt).eval()
    r = calibrate(model, args.ckpt, scfg, args.num, args.iters, _sigma_min(config), overwrite=args.overwrite)
    interval = "" if (scfg.cfg_lo, scfg.cfg_hi) == (0.0, 1.0) else f" --cfg-interval {scfg.cfg_lo:g}:{scfg.cfg_hi:g}"
    print(f"wrote {os.path.join(args.ckpt, GRIDS_FILE)}: {scfg.solver} × {scfg.steps} steps ({args.nfe} NFE), cfg "
          f"{float(scfg.cfg):g}{interval.replace(' --cfg-interval', ', interval')}: relative error {r['error']:.4f} on "
          f"{args.num} calibration images (start: {r['start']} grid, {r['start_error']:.4f}); use it with `--grid "
          f"calibrated --solver {scfg.solver} --ode-steps {scfg.steps} --cfg {float(scfg.cfg):g}{interval}`")
    return 0


def _cmd_convert(args):
    from lfm_fast.convert import diffusers_meta, read_diffusers, read_lfm, time_table_effect, write_diffusers
    from lfm_fast.fileio import atomic_dir, portable_path, resolve_path
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    out = args.out or args.out_pos
    if not out or (args.out and args.out_pos):
        raise InputError("convert: --out OUT is required (once): the new folder to write")
    if args.from_ != "lfm" and (args.arch or args.num_classes is not None or args.weights != "auto"):
        raise InputError("--arch, --num-classes and --weights are for --from lfm")
    if args.to:
        if args.ae:
            raise InputError("--ae: the folder carries the checkpoint's own autoencoder (for the way back)")
        model = DiT.from_pretrained(args.src)
        meta = dict(read_checkpoint_config(args.src).get("meta", {}))
        if meta.get("autoencoder"):
            meta["autoencoder"] = portable_path(resolve_path(meta["autoencoder"], args.src), out)
        with atomic_dir(out, "convert", args.overwrite) as tmp:
            write_diffusers(model, tmp, meta)
        shift = model.config.time_freq_shift
        if shift == 1:
            note = "exact"
        else:
            worst, rel = time_table_effect(model)
            note = (f"not exact: diffusers' timestep frequency table (shift 1) is not this model's (time_freq_shift="
                    f"{shift:g}, DiT's): on 8 test inputs the velocity moves by up to {worst:.3g} ({100 * rel:.2g} % of "
                    f"its RMS) under diffusers' table; `--from diffusers` of the folder gives a shift-1 model, which computes what diffusers does")
        print(f"wrote {out} (diffusers DiTTransformer2DModel; pass timestep = t · {model.config.time_scale:g}): {note}")
        return 0
    meta = {"converted_from": os.path.abspath(args.src)}
    if args.from_ == "lfm":
        model, notes, lfm_args = read_lfm(args.src, args.arch, args.num_classes, args.weights)
        meta["autoencoder"] = args.ae or lfm_args.get("pretrained_autoencoder_ckpt") or "stabilityai/sd-vae-ft-mse"
        if lfm_args.get("scale_factor") not in (None, 0.18215):
            notes.append(f"LFM's scale_factor was {lfm_args['scale_factor']:g}: the autoencoder's config must say the same")
    else:
        model, notes = read_diffusers(args.src), ["time_freq_shift 1"]
        meta = {**diffusers_meta(args.src), **meta}
        if args.ae:
            meta["autoencoder"] = args.ae
    if meta.get("autoencoder"):
        meta["autoencoder"] = portable_path(meta["autoencoder"], out)
    with atomic_dir(out, "convert", args.overwrite) as tmp:
        model.save_pretrained(tmp, meta=meta)
    c = model.config
    classes = f"{c.num_classes} classes" if c.num_classes else "unconditional"
    ae = f"autoencoder {meta['autoencoder']}" if "autoencoder" in meta else "it records no autoencoder: pass --ae to sample"
    print(f"wrote {out} (DiT {c.hidden_size}×{c.depth}, patch {c.patch_size}, {c.input_size}×{c.input_size}×{c.in_channels} "
          f"latents, {classes}, time_scale {c.time_scale:g}; {'; '.join(notes)}); {ae}")
    return 0


def _cmd_presets(args):
    import json

    from lfm_fast.config import PRESETS, get_preset, to_dict

    if args.name is not None:
        print(json.dumps(to_dict(get_preset(args.name)), indent=2))
        return
    width = max(map(len, PRESETS))
    for name, cfg in PRESETS.items():
        m = cfg.model
        size = f"{m.input_size}×{m.input_size}×{m.in_channels} latents"
        classes = "classes from the data" if m.num_classes < 0 else f"{m.num_classes} classes"
        cond = f", condition {m.condition}" if m.condition != "none" else (f", {classes}" if m.num_classes else "")
        print(f"{name:<{width}}  {cfg.data.dataset}: {size}, width {m.hidden_size} × depth {m.depth}, patch {m.patch_size}{cond}, "
              f"{cfg.train.steps} steps of {cfg.train.batch_size}")


def _cmd_eval(args):
    import json

    from lfm_fast.eval.run import evaluate
    from lfm_fast.fileio import write_json

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate(args.samples, args.ref, metrics, args.inception, args.ae, args.batch_size, args.save_stats)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result))


COMMANDS = {"demo": _cmd_demo, "train-ae": _cmd_train_ae, "prepare": _cmd_prepare, "train": _cmd_train, "sample": _cmd_sample,
            "export": _cmd_export, "calibrate": _cmd_calibrate, "eval": _cmd_eval,
            "presets": _cmd_presets, "convert": _cmd_convert}


def _relaunch(argv: list[str], nproc: int) -> int:
    """`--nproc N` outside torchrun: run the same command under torchrun on N local processes. SIGTERM, SIGUSR1 and
    SIGINT are passed on to the workers (torchrun's children), which finish their step, checkpoint and exit 0, so torchrun
    ends normally; we wait for it, leaving no orphans. (Signalled itself, torchrun would pass the signal on too, but
    end with a SignalException traceback and exit 1 after workers that stopped cleanly.) Before the workers exist,
    torchrun gets the signal."""
    import signal
    import subprocess

    from lfm_fast.dist import torchrun_command

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    # its own session: a terminal's Ctrl-C (a SIGINT to the foreground process group) reaches us alone, and the workers
    # get it once, from us (torchrun would also pass it on: a second SIGINT, a KeyboardInterrupt mid-step)
    child = subprocess.Popen(torchrun_command(nproc, rest), start_new_session=True)

    def pass_on(signum, frame):
        for pid in _child_pids(child.pid) or [child.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    forward = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = child.wait()
        if -code in STOPPED:  # torchrun itself stopped by a signal, before it had workers to pass it on to
            report(STOPPED[-code])
        return shell_code(code)
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)


def _child_pids(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; [] where that is unavailable)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (which names an error file), through torch.distributed.elastic's `record`: a crash's traceback
    goes to the file torchrun reads, so its failure summary shows the failing rank's traceback."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return _main(argv)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def entry() -> None:
    """The `lfm-fast` command and `python -m lfm_fast`: `main`, ending through `exit_now`. A reader that closed the
    pipe early (`lfm-fast presets | head -1`) ends the output quietly (exit 1, no traceback)."""
    try:
        code = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
        code = 1
    exit_now(code)


# the line a command stopped by Ctrl-C or SIGTERM ends with (its exit code: 128 + the signal's number, as a shell's)
STOPPED = {signal.SIGINT: "lfm-fast: interrupted", signal.SIGTERM: "lfm-fast: terminated (SIGTERM); nothing half-written is left"}


def shell_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for one killed by signal N (subprocess gives -N)."""
    return 128 - returncode if returncode < 0 else returncode


def report(line: str) -> None:
    """The one line a command ends with when it fails or is stopped (`lfm-fast: error: …`, `… interrupted`,
    `… terminated`). Every rank meets it; the user sees it once. Under torchrun each rank also writes it to its error
    file (torchrun's failure summary reads it). Under `--nproc` (`lfm_fast.launch`) no worker prints: the launcher
    prints one line from the error files, since a rank that printed itself could be stopped by torchrun (after
    another rank's exit) before it did. Elsewhere rank 0 prints it."""
    import json
    import time

    from lfm_fast.dist import is_main_process

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the command is ending: torchrun's SIGTERM must not cut the line
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # in the layout of torch.distributed.elastic's `record`; whole or not at all (torchrun parses it)
        with open(error_file + ".tmp", "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        os.replace(error_file + ".tmp", error_file)
        if os.environ.get("LFM_FAST_LAUNCH"):
            return
    if is_main_process():
        print(line, file=sys.stderr)


def exit_now(code: int) -> None:
    """End the process as Python's own exit would, without its teardown of the modules: once torch is imported, that
    teardown (garbage collection over every module's objects) took 0.8–2.5 s here at the end of each command and of
    each torchrun worker (which torchrun waits for). What an exit owes still happens, in Python's order: threading's
    exit hooks (which shut down thread pools left open) and the join of non-daemon threads, the atexit handlers
    (logging, tqdm, temporary folders), the flush of stdout, stderr and C's stdio. As with Python's exit, stdout that
    cannot be written (a full disk) turns a success into exit 120; a closed pipe does not. Files left open without a
    close are not flushed (lfm-fast writes every file in a `with` block). Only a normal return comes here: an
    exception still unwinds and prints as usual."""
    import atexit
    import ctypes
    import errno

    threading._shutdown()  # what Python's exit runs first: threading's atexit hooks, then the non-daemon joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except ValueError:  # closed: nothing more can be written to it
            pass
        except OSError as e:
            if e.errno != errno.EPIPE and stream is sys.stdout and code == 0:
                code = 120
    try:
        ctypes.CDLL(None).fflush(None)  # output of C libraries (NCCL, gloo) still in their stdio buffers
    except (OSError, AttributeError):
        pass
    os._exit(code)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one line, like our errors; other packages' as Python prints them."""
    if f"{os.sep}lfm_fast{os.sep}" in filename:
        return f"lfm-fast: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


class Terminated(BaseException):
    """SIGTERM outside training (which checkpoints on it): unwinds like Ctrl-C, so every half-written output (the
    temporary folders of `fileio.atomic_dir`) is removed on the way out."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (torchrun stopping the other ranks) must not
    raise Terminated()                                # cut short the removal of what is half-written


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _format_warning
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's one-line error
        return int(e.code or 0)
    from lfm_fast.dist import launched_by_torchrun, shutdown

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"lfm-fast: error: --nproc {nproc}: expected a positive count", file=sys.stderr)
        return 2
    if nproc and not launched_by_torchrun():
        return _relaunch(argv, nproc)
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        COMMANDS[args.command](args)
    except InputError as e:
        report(f"lfm-fast: error: {e}")
        return 2
    except RunError as e:
        report(f"lfm-fast: error: {e}")
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        stop = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        report(STOPPED[stop])
        return shell_code(-stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown()
    return 0


if __name__ == "__main__":
    entry()
