"""`lfm-fast calibrate`: fit the time grid of a fixed-step solver to a checkpoint (for --grid calibrated)."""

from __future__ import annotations

import os

from lfm_fast.choices import FIXED_SOLVERS
from lfm_fast.cli.common import add_num_images, check_positive
from lfm_fast.cli.recipe import sample_config, sampler


def add_parser(sub) -> None:
    k = sub.add_parser("calibrate", help="fit the time grid of a fixed-step solver to a checkpoint (for --grid calibrated)",
                       description="Fit the N-step time grid that minimises the solver's error against per-image "
                       "dopri5 (1e-7, float64) on a calibration batch, by gradient descent on the grid, and store it in "
                       "the checkpoint folder (calibrated_grids.json), where `sample/export --grid calibrated` find it.")
    k.add_argument("--ckpt", required=True, help="folder with config.json + model.safetensors (the grid is stored here)")
    k.add_argument("--nfe", type=int, required=True, help="network evaluations of the grid: steps × the solver's NFE per step")
    k.add_argument("--solver", choices=FIXED_SOLVERS, default="ab3", help="the fixed-step solver")
    k.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    k.add_argument("--cfg-interval", default=None, metavar="LO:HI", help="guidance interval (default: the checkpoint's)")
    add_num_images(k, 64, "calibration images (seeds 10⁶, 10⁶ + 1, …)")
    k.add_argument("--iters", type=int, default=60, help="gradient steps on the grid")
    k.add_argument("--overwrite", action="store_true", help="replace a grid already stored for the same solver, steps, "
                   "cfg and interval")


def run(args):
    from lfm_fast.calibrate import GRIDS_FILE, calibrate
    from lfm_fast.models.dit import DiT, read_checkpoint_config

    check_positive("--nfe", args.nfe)
    check_positive("--num-images", args.num)
    check_positive("--iters", args.iters)
    if args.cfg is not None:
        check_positive("--cfg", args.cfg, allow_zero=True)
    config = read_checkpoint_config(args.ckpt)
    args.grid = "uniform"  # the fit's own starting grids; a stored calibrated grid is replaced, not read
    model = DiT.from_pretrained(args.ckpt).eval()
    s = sampler(args, model, config)
    scfg = sample_config(s, args)
    r = calibrate(model, args.ckpt, scfg, args.num, args.iters, s.sigma_min, overwrite=args.overwrite)
    interval = "" if (scfg.cfg_lo, scfg.cfg_hi) == (0.0, 1.0) else f" --cfg-interval {scfg.cfg_lo:g}:{scfg.cfg_hi:g}"
    print(f"wrote {os.path.join(args.ckpt, GRIDS_FILE)}: {scfg.solver} × {scfg.steps} steps ({args.nfe} NFE), cfg "
          f"{float(scfg.cfg):g}{interval.replace(' --cfg-interval', ', interval')}: relative error {r['error']:.4f} on "
          f"{args.num} calibration images (start: {r['start']} grid, {r['start_error']:.4f}); use it with `--grid "
          f"calibrated --solver {scfg.solver} --ode-steps {scfg.steps} --cfg {float(scfg.cfg):g}{interval}`")
    return 0
