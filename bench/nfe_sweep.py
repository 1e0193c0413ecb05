"""NFE against accuracy and sample quality, per solver and time grid, on a trained shapes checkpoint (the demo's).

Every setting samples the same noise (seeds 0…num−1, every class in turn, the checkpoint's CFG). Per row:
- NFE per image (mean, max: LFM's count) and per batch, and network rows per image (FLOPs ∝ rows);
- the relative RMS error of the final latents against per-image dopri5 (atol = rtol = 1e-7, float64) from the
  same noise, on the first `--ref-num` images (the reference is cached under bench/.cache);
- `shape_judge_fd` and `classifier_fd`: the Fréchet distance of the pooled penultimate features of the demo's
  colour-blind shape judge and of its colour classifier, all `--num` samples vs as many held-out real images,
  each with a 95 % bootstrap interval. The judge's is what "equal quality" is judged by: the classifier's barely
  moves between 4 and 206 NFE (it reads hue, which every sampler gets right);
- the class accuracy (demo classifier) and shape accuracy (colour-blind judge) of the decoded samples;
- ms per image, eager, batch `--batch-size`, measured in this run.
Calibrated grids are fitted once (`lfm_fast.calibrate`, stored in the checkpoint folder, as `lfm-fast calibrate`
does) and then read back like `sample --grid calibrated` reads them.

Usage: python bench/nfe_sweep.py [--ckpt runs/demo/dit] [--quick] [--out bench/results/cpu/nfe_sweep.json]
`--quick` (what `make bench` runs, ≤ 3 minutes): 600 samples, 32 reference images, a few settings.
"""

import argparse
import hashlib
import json
import os
import time

import torch

from lfm_fast.autoencoder import load_autoencoder
from lfm_fast.calibrate import calibrate, grid_key, load_times, read_grids, reference_solution, rel_error
from lfm_fast.data.images import to_tensor
from lfm_fast.data.shapes import ShapesDataset
from lfm_fast.eval.domain import classify, embed, load_judges
from lfm_fast.eval.frechet import fd_with_interval, latent_fd
from lfm_fast.fileio import resolve_path, write_json
from lfm_fast.generate import latents_to_images
from lfm_fast.models.dit import DiT, read_checkpoint_config
from lfm_fast.choices import NFE_PER_STEP
from lfm_fast.sampling import SampleConfig, per_image_noise, sample_with

FULL = ([("euler", "uniform", n) for n in (4, 8, 16, 32)]
        + [(s, g, n) for s in ("heun", "ab2", "ab3", "dpm++2m") for g in ("uniform", "shifted:2") for n in (4, 8, 16, 32)]
        + [("abm3", "uniform", n) for n in (4, 8, 16, 32)]
        + [("ab3", "calibrated", n) for n in (4, 8, 16)] + [("dpm++2m", "calibrated", n) for n in (8, 16)]
        + [("abm3", "calibrated", 16)]
        + [("dopri5", tol, None) for tol in (1e-3, 1e-4, 1e-5)] + [("bosh3", 1e-3, None)])
QUICK = [("heun", "uniform", 16), ("ab3", "shifted:2", 16), ("ab3", "calibrated", 8), ("dopri5", 1e-3, None)]


def _config(solver, grid, nfe, cfg_scale) -> SampleConfig:
    if nfe is None:  # adaptive: `grid` holds the tolerance
        return SampleConfig(solver=solver, cfg=cfg_scale, atol=grid, rtol=grid)
    name, _, shift = grid.partition(":")
    return SampleConfig(solver=solver, steps=nfe // NFE_PER_STEP[solver], cfg=cfg_scale, grid=name, shift=float(shift or 1))


def min_nfe_for_error(rows: list[dict]) -> dict:
    """{"SOLVER GRID@TARGET": the fewest NFE (per image) of the rows at or under the target error}."""
    needed = {}
    for target in (1e-2, 3e-2):
        for r in rows:
            name = r["solver"] + ("" if r["grid"] is None else f" {r['grid']}" + (f":{r['shift']:g}" if r["grid"] == "shifted" else ""))
            if r["rel_rms_error"] <= target:
                needed[f"{name}@{target:g}"] = min(needed.get(f"{name}@{target:g}", 1e9), r["nfe"])
    return needed


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default="runs/demo/dit")
    p.add_argument("--quick", action="store_true", help="the reduced sweep of `make bench`")
    p.add_argument("--num", type=int, default=None, help="samples per setting (default 2004; quick 600)")
    p.add_argument("--ref-num", type=int, default=None, help="images with a float64 reference (default 128; quick 32)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the checkpoint's)")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--only", default=None, help="these settings only: SOLVER:GRID:NFE or SOLVER:TOL: (adaptive), comma-separated, "
                   "e.g. ab3:shifted:2:16,dopri5:1e-5:")
    p.add_argument("--out", default=None, help="default bench/results/cpu/nfe_sweep{,_quick}.json")
    a = p.parse_args()
    num = a.num or (600 if a.quick else 2004)
    ref_num = min(num, a.ref_num or (32 if a.quick else 128))
    out = a.out or f"bench/results/cpu/nfe_sweep{'_quick' if a.quick else ''}.json"
    config = read_checkpoint_config(a.ckpt)
    exp = config.get("meta", {}).get("experiment", {})
    cfg_scale = a.cfg if a.cfg is not None else float(exp.get("sample", {}).get("cfg", 1.0))
    sigma_min = float(exp.get("flow", {}).get("sigma_min", 1e-5))
    model = DiT.from_pretrained(a.ckpt).eval()
    ae = load_autoencoder(resolve_path(config["meta"]["autoencoder"], a.ckpt), device="cpu")
    clf, judge = load_judges()
    c = model.config
    k = c.num_classes
    labels = torch.arange(num) % k
    noise = per_image_noise(list(range(num)), (c.in_channels, c.input_size, c.input_size))

    with open(os.path.join(a.ckpt, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache = os.path.join(os.path.dirname(__file__), ".cache", f"nfe_ref-{digest}-cfg{cfg_scale:g}-{ref_num}.pt")
    if os.path.isfile(cache):
        ref = torch.load(cache)
    else:
        start = time.time()
        ref = reference_solution(model, noise[:ref_num], labels[:ref_num], SampleConfig(cfg=cfg_scale), sigma_min=sigma_min)
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        torch.save(ref, cache)
        print(f"reference: {ref_num} images, {time.time() - start:.0f} s", flush=True)

    real, train = ShapesDataset(num, 32, 1).images, ShapesDataset(num, 32, 0).images  # held out; the demo trains on seed 0
    judges = {"shape_judge_fd": judge, "classifier_fd": clf}
    real_features = {name: embed(net, real).numpy() for name, net in judges.items()}
    floors = {name: latent_fd(real_features[name], embed(net, train).numpy()) for name, net in judges.items()}

    rows = []
    settings = QUICK if a.quick else FULL
    if a.only:
        parts = [item.split(":") for item in a.only.split(",")]  # SOLVER:GRID:NFE, or SOLVER:TOL: (adaptive)
        settings = [(p[0], float(p[1]) if p[-1] == "" else ":".join(p[1:-1]), int(p[-1]) if p[-1] else None) for p in parts]
    for solver, grid, nfe in settings:
        scfg = _config(solver, grid, nfe, cfg_scale)
        calib = None
        if scfg.grid == "calibrated":
            stored = grid_key(scfg) in read_grids(a.ckpt)
            calib = None if stored else calibrate(model, a.ckpt, scfg, num=32 if a.quick else 64, iters=30 if a.quick else 60,
                                                  progress=False, sigma_min=sigma_min)
            scfg.times = load_times(a.ckpt, scfg)
        latents, image_nfe, net_rows, calls = [], [], 0, 0
        start = time.time()
        for i in range(0, num, a.batch_size):
            res = sample_with(model, noise[i:i + a.batch_size], labels[i:i + a.batch_size], scfg, sigma_min=sigma_min)
            latents.append(res.latents)
            image_nfe.append(res.image_nfe)
            net_rows, calls = net_rows + res.net_rows, max(calls, res.nfe)
        seconds = time.time() - start
        latents, image_nfe = torch.cat(latents), torch.cat(image_nfe).float()
        images = to_tensor(latents_to_images(ae, latents))
        fds = {}
        for name, net in judges.items():
            fd, lo, hi = fd_with_interval(real_features[name], embed(net, images).numpy())
            fds.update({name: fd, f"{name}_ci95": [lo, hi]})
        row = {"solver": solver, "grid": scfg.grid if nfe else None, "shift": scfg.shift if nfe else None,
               "tol": None if nfe else grid, "nfe": round(float(image_nfe.mean()), 1), "nfe_max": int(image_nfe.max()),
               "nfe_per_batch": calls, "net_rows_per_image": net_rows / num,
               "rel_rms_error": float(rel_error(latents[:ref_num], ref)),
               **fds,
               "class_accuracy": float((classify(clf, images) == labels).float().mean()),
               "shape_accuracy": float((classify(judge, images) == labels).float().mean()),
               "ms_per_image": 1000 * seconds / num}
        if calib is not None:
            row["calibration"] = {key: calib[key] for key in ("error", "start", "start_error", "seconds")}
        rows.append(row)
        print(json.dumps(row), flush=True)

    needed = min_nfe_for_error(rows)
    write_json(out, {"ckpt": a.ckpt, "cfg": cfg_scale, "num_samples": num, "ref_samples": ref_num,
                     "reference": "dopri5 atol=rtol=1e-7 float64, per image",
                     **{f"{name}_real_vs_real": v for name, v in floors.items()},
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows,
                     "min_nfe_for_error": needed})
    print(json.dumps(needed))


if __name__ == "__main__":
    main()
