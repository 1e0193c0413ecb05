"""`lfm-fast train`: train a DiT velocity network on latent shards."""

from __future__ import annotations

import os
import sys

from lfm_fast.cli.common import add_backend_flags, add_nproc_flag, backend_overrides, check_positive
from lfm_fast.errors import InputError


def add_parser(sub) -> None:
    t = sub.add_parser("train", help="train a DiT velocity network on latent shards",
                       usage="lfm-fast train --preset NAME --latents DIR --out DIR [options] [key=value ...]\n"
                             "       lfm-fast train --resume --out DIR [options] [key=value ...]\n"
                             "       lfm-fast train --dry-run --preset NAME [key=value ...]")
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
    add_nproc_flag(t)
    add_backend_flags(t)
    t.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=1e-4 model.qk_norm=true")


def run(args):
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
    for name, value in backend_overrides(args).items():
        setattr(cfg.model, name, value)
    if args.dry_run:
        from lfm_fast.train.dryrun import dry_run, format_dry_run

        if args.resume or args.latents or args.out:
            raise InputError("--dry-run runs on random latents and writes nothing: drop --resume, --latents and --out")
        check_positive("--dry-run-batch", args.dry_run_batch)
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
