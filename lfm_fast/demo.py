"""The embedded end-to-end demo: shapes → the pretrained built-in AE (or one trained here) → cached
latents → class-conditional DiT → CFG samples of every class → report.

Two judges, shipped with the package like FID's Inception weights (`lfm_fast.eval.domain`), read the
samples: a classifier trained on real shapes (`class_accuracy`; it may read hue, since each class has
its own colour) and a colour-blind shape judge trained on shapes of random colours with shuffled
channels, from a seed the generator never sees (`shape_accuracy`; only the outline tells it the class).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from lfm_fast.autoencoder import BUILTIN_SHAPES_AE, SHAPES_AE_RECIPE, decode, encode, load_autoencoder, train_autoencoder
from lfm_fast.config import get_preset
from lfm_fast.data.latents import prepare_latents
from lfm_fast.data.shapes import SHAPE_CLASSES, ShapesDataset, to_tensor, to_uint8
from lfm_fast.eval.domain import classify, embed, load_judges
from lfm_fast.eval.frechet import latent_fd
from lfm_fast.fileio import atomic_dir, check_out_dir, image_grid, save_png, write_json
from lfm_fast.generate import generate_latents, latents_to_images
from lfm_fast.models.dit import DiT
from lfm_fast.train.loop import train


@dataclass
class DemoBudget:
    train_images: int
    test_images: int
    ae_steps: int  # only with train_ae=True; else the shipped AE is used
    dit_steps: int
    samples_per_class: int


BUDGETS = {
    "full": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=6000, samples_per_class=100),  # ≈ 8 min
    "quick": DemoBudget(train_images=1500, test_images=300, ae_steps=120, dit_steps=150, samples_per_class=10),  # tests
    "long": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=20000, samples_per_class=100),  # ≤ 30 min
}


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean())


def run_demo(out: str, budget: str = "full", seed: int = 0, train_ae: bool = False, progress: bool = True,
             overwrite: bool = False) -> dict:
    check_out_dir(out, overwrite, "demo")
    b = BUDGETS[budget]
    torch.manual_seed(seed)
    start, seconds = time.time(), {}

    def lap(name):
        seconds[name] = round(time.time() - start - sum(seconds.values()), 1)

    with atomic_dir(out, "demo", overwrite) as tmp:
        train_set = ShapesDataset(b.train_images, 32, seed)
        test_set = ShapesDataset(b.test_images, 32, seed + 1)
        lap("data")
        lat_dir, dit_dir = os.path.join(tmp, "latents"), os.path.join(tmp, "dit")
        if train_ae:
            ae_spec = os.path.join(tmp, "ae")
            recipe = {**SHAPES_AE_RECIPE, "steps": b.ae_steps}
            train_autoencoder(train_set.images, ae_spec, seed=seed, progress=progress, **recipe)
            lap("train_ae")
        else:
            ae_spec = BUILTIN_SHAPES_AE
        prepare_latents(ae_spec, "shapes", lat_dir, 32, b.train_images, seed=seed, progress=progress)
        lap("prepare")

        cfg = get_preset("small-data")
        cfg.train.steps, cfg.train.seed = b.dit_steps, seed
        cfg.train.ckpt_every = max(cfg.train.ckpt_every, b.dit_steps)
        train(cfg, lat_dir, dit_dir, progress=progress)
        lap("train_dit")

        clf, judge = load_judges()
        model = DiT.from_pretrained(dit_dir).eval()
        ae = load_autoencoder(ae_spec)
        k = len(SHAPE_CLASSES)
        labels = torch.arange(b.samples_per_class * k) % k
        gen_latents, nfe = generate_latents(model, labels, [seed * 100_003 + i for i in range(len(labels))], cfg.sample,
                                            batch_size=128, progress=progress)
        images = latents_to_images(ae, gen_latents)
        lap("sample")

        generated = to_tensor(images)
        real_latents = encode(ae, test_set.images)
        reconstructions = decode(ae, real_latents)
        shape_predicted = classify(judge, generated)
        # Fréchet distances are biased by the sample count: compare equal counts, and give the real-vs-real value
        # (held-out vs training images) as the floor that sampling noise alone produces
        n = min(len(test_set), len(generated))
        real_features = embed(judge, test_set.images[:n]).numpy()
        metrics = {
            "shape_accuracy": accuracy(shape_predicted, labels),
            "shape_judge_accuracy_real": accuracy(classify(judge, test_set.images), test_set.labels),
            "ae_shape_accuracy": accuracy(classify(judge, reconstructions), test_set.labels),
            "class_accuracy": accuracy(classify(clf, generated), labels),
            "classifier_accuracy": accuracy(classify(clf, test_set.images), test_set.labels),
            "shape_fd": latent_fd(real_features, embed(judge, generated[:n]).numpy()),
            "shape_fd_real_vs_real": latent_fd(real_features, embed(judge, train_set.images[:n]).numpy()),
            "latent_fd": latent_fd(real_latents[:n].numpy(), gen_latents[:n].numpy()),
            "latent_fd_real_vs_real": latent_fd(real_latents[:n].numpy(), encode(ae, train_set.images[:n]).numpy()),
            "ae_recon_mse": float(torch.nn.functional.mse_loss(reconstructions, test_set.images)),
        }
        lap("evaluate")

        # samples.png: one row per class (its name at the row start): a real image, then 9 samples
        real_rows = [to_uint8(test_set.images[test_set.labels == c][:1]) for c in range(k)]
        rows = [np.concatenate([real_rows[c], images[np.nonzero(labels.numpy() == c)[0][:9]]]) for c in range(k)]
        save_png(os.path.join(tmp, "samples.png"), image_grid(np.concatenate(rows), nrow=10), upscale=2,
                 row_labels=list(SHAPE_CLASSES))

        report = {
            **metrics,
            "nfe": nfe,
            "seconds_total": round(time.time() - start, 1),
            "seconds": seconds,
            "per_class_shape_accuracy": {name: accuracy(shape_predicted[labels == c], c) for c, name in enumerate(SHAPE_CLASSES)},
            "sampler": {"solver": cfg.sample.solver, "steps": cfg.sample.steps, "cfg": cfg.sample.cfg},
            "num_samples": len(labels),
            "autoencoder": {"spec": "trained here" if train_ae else BUILTIN_SHAPES_AE,
                            "scaling_factor": float(ae.config.scaling_factor)},
            "dit": {"steps": b.dit_steps, "params": sum(p.numel() for p in model.parameters()),
                    "hidden_size": cfg.model.hidden_size, "depth": cfg.model.depth, "patch_size": cfg.model.patch_size},
            "budget": budget,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        write_json(os.path.join(tmp, "report.json"), report)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_report_markdown(report))
    return report


def _report_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["per_class_shape_accuracy"].items())
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    return f"""# lfm-fast demo report

Shapes (32×32 RGB, 6 classes) → built-in AutoencoderKL ({r['autoencoder']['spec']}; f=4, 4×8×8 latents) →
class-conditional DiT ({r['dit']['params'] / 1e6:.2f} M parameters, {r['dit']['steps']} steps) → {r['num_samples']}
samples with {r['sampler']['solver']} × {r['sampler']['steps']} steps, CFG {r['sampler']['cfg']} ({r['nfe']} NFE).
Budget: {r['budget']}{' (a smoke run: expect samples near chance)' if r['budget'] == 'quick' else ''}. Chance level of
both accuracies: 1/6 = 0.167. Fréchet distances need more samples than feature dimensions (judge: 64, latents: 256).

| metric | generated | real (reference) |
|---|---|---|
| shape_accuracy: the colour-blind judge sees the requested shape | {r['shape_accuracy']:.3f} | {r['shape_judge_accuracy_real']:.3f} |
| ae_shape_accuracy: the same judge on AE reconstructions of real images | | {r['ae_shape_accuracy']:.3f} |
| class_accuracy: a classifier trained on real shapes (it may read hue) agrees | {r['class_accuracy']:.3f} | {r['classifier_accuracy']:.3f} |
| shape_fd: Fréchet distance of the judge's features, vs held-out real (floor: real vs real) | {r['shape_fd']:.3f} | {r['shape_fd_real_vs_real']:.3f} |
| latent_fd: generated vs held-out real latents (floor: real vs real) | {r['latent_fd']:.4f} | {r['latent_fd_real_vs_real']:.4f} |
| AE reconstruction MSE (held-out, [-1, 1] scale) | | {r['ae_recon_mse']:.4f} |
| NFE per sample | {r['nfe']} | |
| seconds_total | {r['seconds_total']:.0f} | |

Shape accuracy per class:

| class | shape_accuracy |
|---|---|
{rows}

Time per stage: {stages}. torch {r['torch']}, {r['threads']} threads.

![samples](samples.png) — one row per class: a real image, then 9 samples.
"""
