"""`lfm-fast eval`: FID, precision/recall and latent FD of samples against a reference."""

from __future__ import annotations

import os

from lfm_fast.errors import InputError


def add_parser(sub) -> None:
    v = sub.add_parser("eval", help="FID, precision/recall and latent FD of samples against a reference")
    v.add_argument("--samples", required=True, help="samples.npz (arr_0: N×H×W×3 uint8) or a folder of images")
    v.add_argument("--ref", required=True, help="reference: stats .npz (mu, sigma), images .npz (arr_0), a folder, or a "
                   "data SPEC of `prepare` (lmdb:PATH, celebamask:PATH, …?limit=N), resized to the samples' size")
    v.add_argument("--metrics", default="fid", help="comma-separated: fid, pr, latent_fd")
    v.add_argument("--inception", default=None, help="pt_inception-2015-12-05-6726825d.pth (or $LFM_FAST_INCEPTION)")
    v.add_argument("--ae", default=None, help="autoencoder folder, for latent_fd")
    v.add_argument("--batch-size", type=int, default=50, help="images per Inception batch")
    v.add_argument("--save-stats", default=None, help="also write the samples' Inception mu/sigma to this .npz")
    v.add_argument("--out", default=None, help="write the metrics JSON to this file (it is printed either way); see "
                   "--overwrite")
    v.add_argument("--overwrite", action="store_true", help="replace an existing --out or --save-stats file")


def run(args):
    import json

    from lfm_fast.eval.run import evaluate
    from lfm_fast.fileio import write_json

    for flag, path in (("--out", args.out), ("--save-stats", args.save_stats)):
        if path and (os.path.isdir(path) or (os.path.lexists(path) and not args.overwrite)):
            raise InputError(f"{flag} {path} exists{' and is a folder' if os.path.isdir(path) else ''}; name a new "
                             f"file{'' if os.path.isdir(path) else ', or pass --overwrite to replace it'}")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    result = evaluate(args.samples, args.ref, metrics, args.inception, args.ae, args.batch_size, args.save_stats)
    if args.out:
        write_json(args.out, result)
    print(json.dumps(result))
