"""Calibrated time grids (`lfm-fast calibrate`): the N-step grid of a fixed-step solver that minimises its error
against a high-accuracy solution on a small calibration batch, stored beside the checkpoint it was fitted for.

How: gradient descent on the grid. The N step lengths are a softmax of N free logits (so the grid always falls
from 1 to 0, strictly), the loss is the relative RMS error of the final latents against per-image dopri5
(atol = rtol = 1e-7, float64) from the same noise, and its gradient flows through the unrolled solver into the
network's time input (the DiT is differentiable in t). Adam starts from the best of the analytic grids
(uniform, shifted, power); the best grid seen is kept, so the fit is never worse than its start. The
calibration noise uses its own seeds, far from those `sample` and the benchmarks draw.
"""

from __future__ import annotations

import copy
import json
import os
import time

import torch
from tqdm.auto import tqdm

from lfm_fast.errors import InputError
from lfm_fast.fileio import write_json
from lfm_fast.choices import NFE_PER_STEP
from lfm_fast.sampling import Field, SampleConfig, per_image_noise, sample, time_grid
from lfm_fast.solvers import integrate_fixed

GRIDS_FILE = "calibrated_grids.json"
CALIBRATION_SEED = 1_000_000  # calibration images: seeds 10⁶, 10⁶ + 1, …
START_GRIDS = (("uniform", 1.0), ("shifted", 0.5), ("shifted", 2.0), ("shifted", 3.0), ("power", 1.5), ("power", 2.0))


def grid_key(cfg: SampleConfig) -> str:
    """What a calibrated grid depends on: solver, steps, guidance scale and interval."""
    return f"{cfg.solver}/{cfg.steps}/cfg{float(cfg.cfg):g}/{float(cfg.cfg_lo):g}:{float(cfg.cfg_hi):g}"


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    return (x - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt()


def reference_solution(model, noise, y, cfg: SampleConfig, tol: float = 1e-7, sigma_min: float = 1e-5) -> torch.Tensor:
    """Per-image dopri5 at atol = rtol = `tol` in float64 (the model copied to float64)."""
    ref = sample(copy.deepcopy(model).double(), noise.double(), y, "dopri5", cfg=cfg.cfg, atol=tol, rtol=tol,
                 cfg_interval=(cfg.cfg_lo, cfg.cfg_hi), sigma_min=sigma_min)
    return ref.latents.float()


def fit_grid(model, noise, y, ref, cfg: SampleConfig, sigma_min: float = 1e-5, iters: int = 60, lr: float = 0.05,
             progress: bool = True) -> dict:
    """Fit cfg.steps + 1 times for cfg.solver. Returns {times, error, start, start_error, iters}."""
    if cfg.solver not in NFE_PER_STEP:
        raise InputError(f"--solver {cfg.solver}: calibration fits the grid of a fixed-step solver")
    flags, training = [p.requires_grad for p in model.parameters()], model.training
    model.eval().requires_grad_(False)  # gradients flow to the grid alone; the caller's flags come back at the end
    try:
        return _fit(model, noise, y, ref, cfg, sigma_min, iters, lr, progress)
    finally:
        model.train(training)
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)


def grid_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The grid the fit moves: steps of softmax(logits) from 1, ending exactly at 0; on the logits' device."""
    times = 1 - torch.softmax(logits, 0).cumsum(0)
    return torch.cat([torch.ones_like(times[:1]), times[:-1], torch.zeros_like(times[:1])])


def _fit(model, noise, y, ref, cfg, sigma_min, iters, lr, progress) -> dict:
    def error(times) -> torch.Tensor:
        field = Field(model, len(noise), y, None, cfg.cfg, (cfg.cfg_lo, cfg.cfg_hi))
        return rel_error(integrate_fixed(field, noise.float(), times, cfg.solver, sigma_min), ref)

    with torch.no_grad():
        starts = {(g, s): float(error(time_grid(cfg.steps, g, s))) for g, s in START_GRIDS}
    start = min(starts, key=starts.get)
    # the grid's parameters live on the batch's device: the solver meets no host tensor (and copies none) per step
    t0 = torch.tensor(time_grid(cfg.steps, *start), dtype=torch.float64).to(noise.device)
    logits = torch.log(t0[:-1] - t0[1:]).requires_grad_(True)
    best = (starts[start], t0, logits.detach().clone())
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in tqdm(range(iters), desc="calibrate", disable=not progress, mininterval=1):
        loss = error(grid_from_logits(logits))
        if loss.item() <= best[0]:
            best = (loss.item(), grid_from_logits(logits).detach(), logits.detach().clone())
        elif opt.param_groups[0]["lr"] > 1e-4:  # worse: back to the best grid with half the step (and fresh moments)
            lr = opt.param_groups[0]["lr"] / 2
            with torch.no_grad():
                logits.copy_(best[2])
            opt = torch.optim.Adam([logits], lr=lr)
            continue
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = best[1].tolist()
        err = float(error(time_grid(cfg.steps, "calibrated", times=final)))
    return {"times": final, "error": err, "start": f"{start[0]}:{start[1]:g}", "start_error": starts[start],
            "start_errors": {f"{g}:{s:g}": e for (g, s), e in starts.items()}, "iters": iters}


_REFERENCES: dict = {}


def calibrate(model, folder: str, cfg: SampleConfig, num: int = 64, iters: int = 60, sigma_min: float = 1e-5,
              progress: bool = True, overwrite: bool = False) -> dict:
    """Fit the grid of `cfg` for the checkpoint in `folder` and store it in `folder`/calibrated_grids.json (a grid
    stored there for the same solver, steps, CFG and interval is replaced only with `overwrite`)."""
    c = model.config
    if c.condition != "none":
        raise InputError(f"calibrate fits grids of label-conditioned or unconditional checkpoints; {folder} is "
                         f"conditioned on a {c.condition} input, which calibration would need examples of")
    path = os.path.join(folder, GRIDS_FILE)
    grids = read_grids(folder)  # a broken file stops here, before any work
    old = grids.get(grid_key(cfg))
    if old is not None and not overwrite:
        fitted = f" (fitted on {old['num']} images)" if isinstance(old.get("num"), int) else ""
        raise InputError(f"{path} already has a grid for {grid_key(cfg)}{fitted}; pass --overwrite to replace it")
    start = time.time()
    y = torch.arange(num) % c.num_classes if c.num_classes else None
    noise = per_image_noise(list(range(CALIBRATION_SEED, CALIBRATION_SEED + num)), (c.in_channels, c.input_size, c.input_size))
    key = (id(model), float(cfg.cfg), cfg.cfg_lo, cfg.cfg_hi, num, sigma_min)
    if key not in _REFERENCES:  # one reference serves every solver and NFE fitted in this process
        _REFERENCES.clear()
        _REFERENCES[key] = reference_solution(model, noise, y, cfg, sigma_min=sigma_min)
    ref = _REFERENCES[key]
    entry = fit_grid(model, noise, y, ref, cfg, sigma_min, iters, progress=progress)
    entry.update(num=num, reference="dopri5 atol=rtol=1e-7 float64, per image", seconds=round(time.time() - start, 1))
    grids[grid_key(cfg)] = entry
    write_json(path, grids)
    return entry


def read_grids(folder: str) -> dict:
    """`folder`'s grids file: {key: {"times": [floats], …}}, or a one-line error naming the file."""
    path = os.path.join(folder, GRIDS_FILE)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            grids = json.load(f)
        if not isinstance(grids, dict) or not all(isinstance(e, dict) and isinstance(e.get("times"), list)
                                                  and all(isinstance(t, (int, float)) for t in e["times"]) for e in grids.values()):
            raise ValueError("not {key: {times: [numbers]}}")
        return grids
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a calibrated-grids file ({e}); move it away") from None


def load_times(folder: str, cfg: SampleConfig) -> tuple[float, ...]:
    """The calibrated times stored in `folder` for `cfg` (solver, steps, CFG, interval), or a one-line error."""
    grids = read_grids(folder)
    key = grid_key(cfg)
    if key not in grids:
        have = ", ".join(sorted(grids)) or "none"
        raise InputError(f"--grid calibrated: {folder} has no grid for {key} (solver/steps/cfg/interval; it has: {have}); "
                         f"make one with `lfm-fast calibrate --ckpt {folder} --solver {cfg.solver} --nfe "
                         f"{NFE_PER_STEP[cfg.solver] * cfg.steps} --cfg {float(cfg.cfg):g}"
                         + ("" if (cfg.cfg_lo, cfg.cfg_hi) == (0.0, 1.0) else f" --cfg-interval {cfg.cfg_lo:g}:{cfg.cfg_hi:g}") + "`")
    return tuple(grids[key]["times"])
