"""`lfm-fast convert`: DiT weights to or from diffusers' DiTTransformer2DModel, or from the LFM paper's .pth."""

from __future__ import annotations

import argparse
import os

from lfm_fast.cli.common import add_overwrite_flag
from lfm_fast.errors import InputError


def add_parser(sub) -> None:
    c = sub.add_parser("convert", usage="lfm-fast convert (--to diffusers | --from {diffusers,lfm}) SRC --out OUT [options]",
                       help="DiT weights to or from diffusers' DiTTransformer2DModel, or from the LFM paper's .pth",
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
    add_overwrite_flag(c)


def run(args):
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
