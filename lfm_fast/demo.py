"""The embedded end-to-end demo: shapes → built-in AE → cached latents → class-conditional DiT →
CFG samples of every class → report (a classifier trained on real shapes judges the samples)."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from lfm_fast.autoencoder import encode, load_autoencoder, train_autoencoder
from lfm_fast.config import get_preset
from lfm_fast.data.latents import prepare_latents
from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset, to_tensor
from lfm_fast.eval.domain import classify, train_classifier
from lfm_fast.eval.frechet import latent_fd
from lfm_fast.fileio import atomic_dir, image_grid, save_png, write_json
from lfm_fast.generate import generate_latents, latents_to_images
from lfm_fast.models.dit import DiT
from lfm_fast.train.loop import train


@dataclass
class DemoBudget:
    train_images: int
    test_images: int
    ae_steps: int
    dit_steps: int
    classifier_steps: int
    samples_per_class: int


FULL = DemoBudget(train_images=6000, test_images=600, ae_steps=700, dit_steps=2000, classifier_steps=300, samples_per_class=100)
QUICK = DemoBudget(train_images=1500, test_images=300, ae_steps=120, dit_steps=150, classifier_steps=120, samples_per_class=10)


def run_demo(out: str, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    b = QUICK if quick else FULL
    torch.manual_seed(seed)
    start, seconds = time.time(), {}

    def lap(name):
        seconds[name] = round(time.time() - start - sum(seconds.values()), 1)

    with atomic_dir(out) as tmp:
        train_set = ShapesDataset(b.train_images, 32, seed)
        test_set = ShapesDataset(b.test_images, 32, seed + 1)
        lap("data")
        ae_dir, lat_dir, dit_dir = (os.path.join(tmp, n) for n in ("ae", "latents", "dit"))
        ae_summary = train_autoencoder(train_set.images, ae_dir, steps=b.ae_steps, seed=seed, progress=progress)
        lap("train_ae")
        prepare_latents(ae_dir, "shapes", lat_dir, 32, b.train_images, seed=seed, progress=progress)
        lap("prepare")

        cfg = get_preset("shapes-tiny")
        cfg.train.steps, cfg.train.seed = b.dit_steps, seed
        cfg.train.ckpt_every = max(cfg.train.ckpt_every, b.dit_steps)
        train(cfg, lat_dir, dit_dir, progress=progress)
        lap("train_dit")

        clf = train_classifier(train_set.images, train_set.labels, len(SHAPE_CLASSES), b.classifier_steps, seed=seed, progress=progress)
        classifier_accuracy = float((classify(clf, test_set.images) == test_set.labels).float().mean())
        lap("classifier")

        model = DiT.from_pretrained(dit_dir).eval()
        ae = load_autoencoder(ae_dir)
        k = len(SHAPE_CLASSES)
        labels = torch.arange(b.samples_per_class * k) % k
        gen_latents, nfe = generate_latents(model, labels, [seed * 100_003 + i for i in range(len(labels))], cfg.sample,
                                            batch_size=128, progress=progress)
        images = latents_to_images(ae, gen_latents)
        lap("sample")

        predicted = classify(clf, to_tensor(images))
        class_accuracy = float((predicted == labels).float().mean())
        per_class = {name: float((predicted[labels == c] == c).float().mean()) for c, name in enumerate(SHAPE_CLASSES)}
        real_latents = encode(ae, test_set.images).numpy()
        # FD estimates are biased by the sample count: compare equal counts, and give the real-vs-real value
        # (held-out vs training images) as the floor that sampling noise alone produces
        n = min(len(real_latents), len(gen_latents))
        fd = latent_fd(real_latents[:n], gen_latents[:n].numpy())
        fd_floor = latent_fd(real_latents[:n], encode(ae, train_set.images[:n]).numpy())
        lap("evaluate")

        # samples.png: one row per class, generated images with a row of real ones above for reference
        order = np.concatenate([np.nonzero(labels.numpy() == c)[0][:10] for c in range(k)])
        real = ((test_set.images[:10].permute(0, 2, 3, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        save_png(os.path.join(tmp, "samples.png"), image_grid(np.concatenate([real, images[order]]), nrow=10), upscale=2)

        report = {
            "class_accuracy": class_accuracy,
            "classifier_accuracy": classifier_accuracy,
            "latent_fd": fd,
            "latent_fd_real_vs_real": fd_floor,
            "nfe": nfe,
            "seconds_total": round(time.time() - start, 1),
            "seconds": seconds,
            "per_class_accuracy": per_class,
            "sampler": {"solver": cfg.sample.solver, "steps": cfg.sample.steps, "cfg": cfg.sample.cfg},
            "num_samples": len(labels),
            "autoencoder": {"recon_mse": ae_summary["recon_mse"], "scaling_factor": ae_summary["scaling_factor"],
                            "steps": b.ae_steps},
            "dit": {"steps": b.dit_steps, "params": sum(p.numel() for p in model.parameters()),
                    "hidden_size": cfg.model.hidden_size, "depth": cfg.model.depth, "patch_size": cfg.model.patch_size},
            "quick": quick,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        write_json(os.path.join(tmp, "report.json"), report)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_report_markdown(report))
    return report


def _report_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["per_class_accuracy"].items())
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    return f"""# lfm-fast demo report

Shapes (32×32 RGB, 6 classes) → built-in AutoencoderKL (f=4, 4×8×8 latents) → class-conditional DiT
({r['dit']['params'] / 1e6:.2f} M parameters, {r['dit']['steps']} steps) → {r['num_samples']} samples with
{r['sampler']['solver']} × {r['sampler']['steps']} steps, CFG {r['sampler']['cfg']} ({r['nfe']} NFE).

| metric | value |
|---|---|
| class_accuracy (classifier agrees with the requested label) | {r['class_accuracy']:.3f} |
| classifier_accuracy (held-out real images) | {r['classifier_accuracy']:.3f} |
| latent_fd (generated vs held-out real latents) | {r['latent_fd']:.4f} |
| latent_fd between two real sets (noise floor) | {r['latent_fd_real_vs_real']:.4f} |
| AE reconstruction MSE | {r['autoencoder']['recon_mse']:.4f} |
| NFE per sample | {r['nfe']} |
| seconds_total | {r['seconds_total']:.0f} |

Per-class accuracy:

| class | accuracy |
|---|---|
{rows}

Time per stage: {stages}. torch {r['torch']}, {r['threads']} threads.

![samples](samples.png) — top row: real images; then 10 samples for each class in order
({', '.join(SHAPE_CLASSES)}).
"""
