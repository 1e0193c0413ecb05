"""`lfm-fast` command line: demo | train-ae | prepare | train | sample.

A bad input ends with one line `lfm-fast: error: …` on stderr, exit code 2, and no partial output.
"""

from __future__ import annotations

import argparse
import os
import sys

from lfm_fast.errors import InputError

EXAMPLES = """examples:
  lfm-fast demo --out runs/demo
  lfm-fast train-ae --data shapes --out runs/ae
  lfm-fast prepare --ae runs/ae --data shapes --out runs/latents
  lfm-fast train --latents runs/latents --preset shapes-tiny --out runs/dit --steps 2000 train.lr=5e-4
  lfm-fast sample --ckpt runs/dit --num 64 --labels 0,3 --solver heun --steps 16 --cfg 2 --seed 0 --out runs/samples
"""


def _parser() -> argparse.ArgumentParser:
    from lfm_fast.config import PRESETS
    from lfm_fast.sampling import GRIDS, SOLVERS

    p = argparse.ArgumentParser(prog="lfm-fast", description="Latent flow matching: train and sample DiT velocity networks "
                                "in an autoencoder's latent space.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    d = sub.add_parser("demo", help="end to end on the embedded shapes data: AE → latents → DiT → samples → report")
    d.add_argument("--out", default="runs/demo", help="output folder (replaced when the demo completes)")
    d.add_argument("--quick", action="store_true", help="a ≤2-minute run with tiny budgets (what the tests use)")
    d.add_argument("--seed", type=int, default=0)

    a = sub.add_parser("train-ae", help="train the small built-in AutoencoderKL (for data without a pretrained AE)")
    a.add_argument("--data", required=True, help="'shapes' or an image folder")
    a.add_argument("--out", required=True, help="folder for the diffusers AutoencoderKL (config.json + weights)")
    a.add_argument("--steps", type=int, default=800)
    a.add_argument("--batch-size", type=int, default=16)
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--image-size", type=int, default=32)
    a.add_argument("--num-images", type=int, default=6000, help="shapes only: how many images to draw")
    a.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("prepare", help="encode a dataset once into latent shards (safetensors)")
    r.add_argument("--ae", required=True, help="AutoencoderKL folder, or a hub id such as stabilityai/sd-vae-ft-mse")
    r.add_argument("--data", required=True, help="'shapes' or an image folder (class sub-folders become labels)")
    r.add_argument("--out", required=True)
    r.add_argument("--image-size", type=int, default=None, help="default: the AE's sample_size")
    r.add_argument("--num-images", type=int, default=6000, help="shapes only")
    r.add_argument("--batch-size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train a DiT velocity network on latent shards")
    t.add_argument("--latents", required=True, help="folder written by `lfm-fast prepare`")
    t.add_argument("--preset", required=True, help=f"one of: {', '.join(PRESETS)}")
    t.add_argument("--out", required=True, help="run folder: checkpoint.pt, metrics.jsonl, grids, and the final "
                   "config.json + model.safetensors (EMA weights)")
    t.add_argument("--steps", type=int, default=None, help="override train.steps")
    t.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    _add_backend_flags(t)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4 model.qk_norm=true")

    s = sub.add_parser("sample", help="generate images from a trained checkpoint")
    s.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors")
    s.add_argument("--num", type=int, default=64)
    s.add_argument("--labels", default=None, help="comma-separated class ids, repeated to --num (default: all classes in turn)")
    s.add_argument("--solver", choices=SOLVERS, default=None, help="default: the checkpoint's preset")
    s.add_argument("--steps", type=int, default=None, help="fixed-step solvers: number of steps")
    s.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--grid", choices=GRIDS, default=None, help="time grid of fixed-step solvers")
    s.add_argument("--shift", type=float, default=None, help="shift of the 'shifted' grid")
    s.add_argument("--atol", type=float, default=None, help="adaptive solvers")
    s.add_argument("--rtol", type=float, default=None, help="adaptive solvers")
    s.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--ae", default=None, help="autoencoder to decode with (default: the one recorded in the checkpoint)")
    s.add_argument("--out", required=True)
    _add_backend_flags(s)
    return p


def _add_backend_flags(p):
    from lfm_fast.ops import ATTENTION_BACKENDS, NORM_BACKENDS

    p.add_argument("--attn-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="attention kernels (default: the config's, 'auto' = Triton on CUDA, SDPA on CPU)")
    p.add_argument("--kernels", choices=NORM_BACKENDS, default=None,
                   help="adaLN modulate / gated residual kernels (default: the config's, 'auto' = Triton on CUDA)")


def _backend_overrides(args) -> dict:
    return {k: v for k, v in (("attn_backend", args.attn_backend), ("norm_backend", args.kernels)) if v is not None}


def _cmd_demo(args):
    from lfm_fast.demo import run_demo

    report = run_demo(args.out, quick=args.quick, seed=args.seed)
    print(f"wrote {args.out}/report.json, report.md, samples.png: class_accuracy={report['class_accuracy']:.3f} "
          f"classifier_accuracy={report['classifier_accuracy']:.3f} latent_fd={report['latent_fd']:.4f} "
          f"nfe={report['nfe']} seconds_total={report['seconds_total']:.0f}")


def _cmd_train_ae(args):
    from lfm_fast.autoencoder import train_autoencoder
    from lfm_fast.data import open_image_dataset

    ds, _ = open_image_dataset(args.data, args.image_size, args.num_images, args.seed)
    import torch

    images = torch.stack([ds[i][0] for i in range(len(ds))])
    summary = train_autoencoder(images, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    print(f"wrote {args.out}: recon_mse={summary['recon_mse']:.4f} scaling_factor={summary['scaling_factor']:.4f}")


def _cmd_prepare(args):
    from lfm_fast.data.latents import prepare_latents

    meta = prepare_latents(args.ae, args.data, args.out, args.image_size, args.num_images, args.batch_size, args.seed)
    print(f"wrote {args.out}: {meta['num_samples']} latents of shape {meta['latent_shape']}, {meta['num_classes']} classes")


def _cmd_train(args):
    from lfm_fast.config import apply_overrides, get_preset
    from lfm_fast.train.loop import train

    cfg = apply_overrides(get_preset(args.preset), args.overrides)
    if args.steps is not None:
        cfg.train.steps = args.steps
    for name, value in _backend_overrides(args).items():
        setattr(cfg.model, name, value)
    if not os.path.isdir(args.latents):
        raise InputError(f"--latents {args.latents}: no such folder")
    result = train(cfg, args.latents, args.out, resume=args.resume)
    print(f"wrote {args.out}: step {result['step']}, loss {result['last'].get('loss', float('nan')):.4f}")


def parse_labels(text: str | None, num: int, num_classes: int):
    import torch

    if num_classes == 0:
        if text:
            raise InputError("--labels: this checkpoint is unconditional (no classes)")
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


def _cmd_sample(args):
    import dataclasses

    from lfm_fast import default_device

    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.fileio import atomic_dir, resolve_path
    from lfm_fast.generate import generate_latents, latents_to_images, write_sample_folder
    from lfm_fast.models.dit import DiT, read_checkpoint_config
    from lfm_fast.sampling import SampleConfig

    if args.num < 1:
        raise InputError(f"--num {args.num}: expected a positive count")
    config = read_checkpoint_config(args.ckpt)
    model = DiT.from_pretrained(args.ckpt, **_backend_overrides(args)).eval().to(default_device())
    labels = parse_labels(args.labels, args.num, model.config.num_classes)
    preset = config.get("meta", {}).get("experiment", {}).get("sample", {})
    scfg = SampleConfig(**{**dataclasses.asdict(SampleConfig()), **preset})
    for name in ("solver", "steps", "cfg", "grid", "shift", "atol", "rtol"):
        if getattr(args, name) is not None:
            setattr(scfg, name, getattr(args, name))
    ae_spec = args.ae or resolve_path(config.get("meta", {}).get("autoencoder", ""), args.ckpt)
    if not ae_spec:
        raise InputError(f"checkpoint {args.ckpt} records no autoencoder; pass --ae")
    ae = load_autoencoder(ae_spec)
    latents, nfe = generate_latents(model, labels, [args.seed + i for i in range(args.num)], scfg, args.batch_size)
    images = latents_to_images(ae, latents)
    with atomic_dir(args.out) as tmp:
        write_sample_folder(tmp, images, None if labels is None else labels.numpy())
    print(f"wrote {args.num} images to {args.out} ({scfg.solver}, NFE {nfe} per batch, cfg {scfg.cfg})")


COMMANDS = {"demo": _cmd_demo, "train-ae": _cmd_train_ae, "prepare": _cmd_prepare, "train": _cmd_train, "sample": _cmd_sample}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except InputError as e:
        print(f"lfm-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lfm-fast: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
