"""`lfm-fast prepare`: encode a dataset once into latent shards (safetensors)."""

from __future__ import annotations

from lfm_fast.cli.common import add_nproc_flag, add_overwrite_flag, check_positive
from lfm_fast.errors import InputError


def add_parser(sub) -> None:
    r = sub.add_parser("prepare", help="encode a dataset once into latent shards (safetensors)",
                       usage="lfm-fast prepare (--preset NAME | --ae AE --data SPEC) --out DIR [options]")
    r.add_argument("--preset", default=None, metavar="NAME", help="take --data, --ae, --image-size, --num-images and "
                   "the mirror images from a preset's data section (`lfm-fast presets NAME`); a flag given as well wins")
    r.add_argument("--ae", default=None, help="builtin:shapes (shipped, pretrained on shapes), an AutoencoderKL folder, "
                   "or a hub id such as stabilityai/sd-vae-ft-mse")
    r.add_argument("--data", default=None, metavar="SPEC", help="shapes | PATH (an image folder, recursive; class "
                   "sub-folders become labels, as ImageNet's synset folders) | lmdb:PATH[?split=validation] (LSUN's LMDB, "
                   "or LFM's CelebA-HQ/FFHQ layout with train.lmdb) | celebamask:PATH[?split=train|validation|all] "
                   "(CelebAMask-HQ, with its 19-class maps); any of them takes ?limit=N (the first N items)")
    r.add_argument("--out", required=True, help="folder for the latent shards (new or empty; an unfinished prepare "
                   "there, killed or stopped, is continued when rerun with the same settings)")
    add_overwrite_flag(r)
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
    r.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="do not also encode each image's mirror image "
                   "(default: encoded, so training can flip as LFM does (data.flip); twice the encoding time; an image's latents "
                   "with their stds take 3× the disk of its mean alone, 1.5× without the mirror image)")
    r.add_argument("--shard-size", type=int, default=4096, metavar="N", help="source items per shard (the unit of "
                   "resuming and of the work split over --nproc ranks)")
    r.add_argument("--workers", type=int, default=None, metavar="N", help="DataLoader workers decoding images "
                   "(default: min(4, CPUs); 0 for shapes)")
    r.add_argument("--strict", action="store_true", help="stop at the first unreadable image, naming it (default: skip "
                   "it and list it in prepare_report.json)")
    add_nproc_flag(r)


def from_preset(args) -> None:
    """The flags not given, from --preset's data section; --data and --ae required without one."""
    if args.preset is not None:
        from lfm_fast.config import get_preset

        data = get_preset(args.preset).data
        if args.data is None and data.dataset == "shapes" and args.num_images is None:
            args.num_images = data.num_images
        args.data = data.dataset if args.data is None else args.data
        args.ae = (data.autoencoder or None) if args.ae is None else args.ae
        args.image_size = data.image_size if args.image_size is None else args.image_size
        args.flip = data.flip if args.flip is None else args.flip
    for flag in ("data", "ae"):
        if getattr(args, flag) is None:
            why = f" (preset {args.preset} names no {flag})" if args.preset else " (or --preset NAME)"
            raise InputError(f"prepare: --{flag} is required{why}")
    args.flip = True if args.flip is None else args.flip


def run(args):
    from lfm_fast.data import parse_spec
    from lfm_fast.data.prepare import prepare_latents

    from_preset(args)
    for name in ("batch_size", "shard_size", "num_images", "image_size"):
        if getattr(args, name) is not None:
            check_positive(f"--{name.replace('_', '-')}", getattr(args, name))
    scheme, path, _ = parse_spec(args.data)
    if args.num_images is not None and (scheme or path != "shapes"):
        raise InputError(f"--num-images is for --data shapes; to read the first N items of {args.data}, add ?limit=N")
    args.num_images = args.num_images or 6000
    check_positive("--inpaint-masks", args.inpaint_masks, allow_zero=True)
    if args.workers is not None:
        check_positive("--workers", args.workers, allow_zero=True)
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
