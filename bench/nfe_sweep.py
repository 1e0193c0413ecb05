"""NFE against accuracy on a trained shapes checkpoint (default: the demo's), with CFG.

For each solver setting: the exact NFE, the relative RMS error of the final latents against a reference
solution from the same noise (dopri5, atol = rtol = 1e-7, float64), and the class accuracy and latent
FD of the decoded samples. The paper's default (dopri5, atol = rtol = 1e-5) is one of the rows.
Usage: python bench/nfe_sweep.py [--ckpt runs/demo/dit] [--per-class 50] [--out bench/results/cpu/nfe_sweep.json]
"""

import argparse
import copy
import json
import time

import torch

from lfm_fast.autoencoder import encode, load_autoencoder
from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset, to_tensor
from lfm_fast.eval.domain import classify, train_classifier
from lfm_fast.eval.frechet import latent_fd
from lfm_fast.fileio import resolve_path, write_json
from lfm_fast.generate import latents_to_images
from lfm_fast.models.dit import DiT, read_checkpoint_config
from lfm_fast.sampling import per_image_noise, sample

SETTINGS = (
    [("euler", dict(steps=s)) for s in (4, 8, 16, 32, 64)]
    + [(solver, dict(steps=s)) for solver in ("midpoint", "heun") for s in (2, 4, 8, 16, 32)]
    + [("heun", dict(steps=s, grid="shifted", shift=sh)) for sh in (0.5, 2.0) for s in (4, 8, 16)]
    + [("rk4", dict(steps=s)) for s in (1, 2, 4, 8, 16)]
    + [(solver, dict(atol=tol, rtol=tol)) for solver in ("dopri5", "bosh3") for tol in (1e-2, 1e-3, 1e-4, 1e-5)]
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="runs/demo/dit")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--out", default="bench/results/cpu/nfe_sweep.json")
    a = p.parse_args()
    model = DiT.from_pretrained(a.ckpt).eval()
    ae = load_autoencoder(resolve_path(read_checkpoint_config(a.ckpt)["meta"]["autoencoder"], a.ckpt), device="cpu")
    train_set, test_set = ShapesDataset(6000, 32, 0), ShapesDataset(600, 32, 1)
    clf = train_classifier(train_set.images, train_set.labels, len(SHAPE_CLASSES), 300, progress=False)
    real = encode(ae, test_set.images).numpy()
    k = model.config.num_classes
    labels = torch.arange(a.per_class * k) % k
    c = model.config
    noise = per_image_noise(list(range(len(labels))), (c.in_channels, c.input_size, c.input_size))
    ref = sample(copy.deepcopy(model).double(), noise.double(), labels, solver="dopri5", cfg=a.cfg, atol=1e-7, rtol=1e-7)
    ref_latents = ref.latents.float()

    def score(latents):
        pred = classify(clf, to_tensor(latents_to_images(ae, latents)))
        return float((pred == labels).float().mean()), latent_fd(real[:len(latents)], latents.numpy())

    rows = []
    acc, fd = score(ref_latents)
    rows.append({"solver": "dopri5", "atol": 1e-7, "dtype": "float64", "reference": True, "nfe": ref.nfe,
                 "rel_rms_error": 0.0, "class_accuracy": acc, "latent_fd": fd})
    for solver, kw in SETTINGS:
        start = time.time()
        res = sample(model, noise, labels, solver=solver, cfg=a.cfg, **kw)
        err = float((res.latents - ref_latents).pow(2).mean().sqrt() / ref_latents.pow(2).mean().sqrt())
        acc, fd = score(res.latents)
        rows.append({"solver": solver, **kw, "nfe": res.nfe, "rel_rms_error": err, "class_accuracy": acc,
                     "latent_fd": fd, "seconds": time.time() - start})
        print(json.dumps(rows[-1]), flush=True)
    needed = {}
    for target in (1e-2, 1e-3):
        for solver in ("euler", "midpoint", "heun", "rk4", "dopri5", "bosh3"):
            ok = [r["nfe"] for r in rows[1:] if r["solver"] == solver and r["rel_rms_error"] <= target and "grid" not in r]
            needed[f"{solver}@{target:g}"] = min(ok) if ok else None
    write_json(a.out, {"ckpt": a.ckpt, "cfg": a.cfg, "num_samples": len(labels), "rows": rows, "min_nfe_for_error": needed})
    print(json.dumps(needed))


if __name__ == "__main__":
    main()
