"""The embedded end-to-end demos: shapes → the pretrained built-in AE (or one trained here) → cached latents → a
DiT for one task → samples → report. Tasks: `label` (class-conditional, CFG on the label), `inpaint` (the hole
filled, every known pixel kept) and `semantic` (an image drawn from a semantic map).

Two judges, shipped with the package like FID's Inception weights (`lfm_fast.eval.domain`), read the
samples: a classifier trained on real shapes (`class_accuracy`; it may read hue, since each class has
its own colour) and a colour-blind shape judge trained on shapes of random colours with shuffled
channels, from a seed the generator never sees (`shape_accuracy`, `hole_label_consistency`; only the outline
tells it the class). A semantic map is recovered from a generated image by an exact colour rule.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from lfm_fast.autoencoder import (BUILTIN_SHAPES_AE, SHAPES_AE_RECIPE, decode, downsample_factor, encode, load_autoencoder,
                                  train_autoencoder)
from lfm_fast.config import get_preset
from lfm_fast.data.images import to_tensor, to_uint8
from lfm_fast.data.prepare import prepare_latents
from lfm_fast.data.shapes import NUM_SEMANTIC, SEMANTIC_PALETTE, SHAPE_CLASSES, ShapesDataset
from lfm_fast.errors import RunError
from lfm_fast.eval.domain import (classify, embed, load_judges, mean_colour_fill, mean_iou, semantic_from_colours,
                                  shape_centred_holes)
from lfm_fast.eval.frechet import latent_fd
from lfm_fast.fileio import atomic_dir, check_out_dir, image_grid, save_png, write_json
from lfm_fast.generate import generate_latents, latents_to_images
from lfm_fast.models.dit import DiT
from lfm_fast.tasks import composite, inpaint_condition, semantic_condition, task_grid
from lfm_fast.train.loop import train

HOLE_RANGE = (0.3, 0.5)  # the inpainting demo's test holes: this share of the image, centred on the shape,
HOLE_KINDS = ("strokes", "mixed")  # LaMa-style brush strokes (reported), and strokes mixed with boxes (beside them)
TRAIN_HOLE_RANGE = (0.3, 0.7)  # the masks the inpainting demo trains with (`prepare --hole-range`)


@dataclass
class DemoBudget:
    train_images: int
    test_images: int
    ae_steps: int  # only with train_ae=True; else the shipped AE is used
    dit_steps: int
    samples_per_class: int = 0  # label: samples of each class
    inpaint_masks: int = 0  # inpaint: masks stored per training image (`prepare --inpaint-masks`)


BUDGETS = {
    "label": {
        # 334 per class: the ≥ 2,000 samples a classifier-feature FD needs to tell samplers apart (bench/nfe_sweep.py)
        "full": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=6000, samples_per_class=334),  # ≈ 5 min (2 AVX2 cores)
        "quick": DemoBudget(train_images=1500, test_images=300, ae_steps=120, dit_steps=150, samples_per_class=10),  # tests
        "long": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=20000, samples_per_class=334),  # ≤ 30 min
    },
    "inpaint": {
        "full": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=8000, inpaint_masks=2),
        "quick": DemoBudget(train_images=600, test_images=120, ae_steps=120, dit_steps=150, inpaint_masks=2),
        "long": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=20000, inpaint_masks=2),
    },
    "semantic": {
        "full": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=6000),
        "quick": DemoBudget(train_images=600, test_images=120, ae_steps=120, dit_steps=150),
        "long": DemoBudget(train_images=6000, test_images=600, ae_steps=2500, dit_steps=20000),
    },
}
TASK_PRESET = {"label": "small-data", "inpaint": "shapes-inpaint", "semantic": "shapes-semantic"}  # names in config.PRESETS
GRID_INPUTS, GRID_SAMPLES = 8, 6  # the task demos' samples.png: 8 inputs, 6 samples of each


def accuracy(predicted: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted == labels).float().mean())


def run_demo(out: str, task: str = "label", budget: str = "full", seed: int = 0, train_ae: bool = False,
             progress: bool = True, overwrite: bool = False) -> dict:
    """Shapes → AE → latents → DiT (for `task`: label, inpaint or semantic) → samples → report.json, report.md and
    samples.png in `out`. Returns the report."""
    check_out_dir(out, overwrite, "demo")
    b = BUDGETS[task][budget]
    torch.manual_seed(seed)
    start, seconds = time.time(), {}

    def lap(name):  # the time since the last lap, added to stage `name`
        seconds[name] = round(seconds.get(name, 0) + time.time() - start - sum(seconds.values()), 1)

    with atomic_dir(out, "demo", overwrite) as tmp:
        train_set, test_set = demo_sets(b, seed)
        lap("data")
        lat_dir, dit_dir = os.path.join(tmp, "latents"), os.path.join(tmp, "dit")
        if train_ae:
            ae_spec = os.path.join(tmp, "ae")
            recipe = {**SHAPES_AE_RECIPE, "steps": b.ae_steps}
            train_autoencoder(train_set.images, ae_spec, seed=seed, progress=progress, **recipe)
            lap("train_ae")
        else:
            ae_spec = BUILTIN_SHAPES_AE
        cfg = get_preset(TASK_PRESET[task])
        prepare_latents(ae_spec, "shapes", lat_dir, 32, b.train_images, seed=seed, progress=progress,
                        inpaint_masks=b.inpaint_masks, hole_range=TRAIN_HOLE_RANGE, flip=cfg.data.flip)
        lap("prepare")

        cfg.train.steps, cfg.train.seed = b.dit_steps, seed
        cfg.train.ckpt_every = max(cfg.train.ckpt_every, b.dit_steps)
        stopped = train(cfg, lat_dir, dit_dir, progress=progress).get("stopped_by")  # SIGTERM, SIGUSR1, SIGINT
        if stopped == "SIGINT":
            raise KeyboardInterrupt  # Ctrl-C: `lfm-fast: interrupted`, exit 130, as anywhere else
        if stopped:
            raise RunError("the demo was stopped by a signal while training; nothing of it is left")
        lap("train_dit")

        model = DiT.from_pretrained(dit_dir).eval()
        ae = load_autoencoder(ae_spec)
        metrics, grid, row_labels = EVALUATE[task](model, ae, cfg.sample, train_set, test_set, b, seed, progress, lap)
        save_png(os.path.join(tmp, "samples.png"), grid, upscale=2, row_labels=row_labels)

        report = {
            "task": task,
            **metrics,
            "seconds_total": round(time.time() - start, 1),
            "seconds": seconds,
            "sampler": {"solver": cfg.sample.solver, "steps": cfg.sample.steps, "cfg": cfg.sample.cfg},
            "autoencoder": {"spec": "trained here" if train_ae else BUILTIN_SHAPES_AE,
                            "scaling_factor": float(ae.config.scaling_factor)},
            "dit": {"preset": cfg.name, "steps": b.dit_steps, "params": sum(p.numel() for p in model.parameters()),
                    "hidden_size": cfg.model.hidden_size, "depth": cfg.model.depth, "patch_size": cfg.model.patch_size},
            "budget": budget,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        write_json(os.path.join(tmp, "report.json"), report)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_report_markdown(report))
    return report


def demo_sets(b: DemoBudget, seed: int) -> tuple[ShapesDataset, ShapesDataset]:
    """The demo's training and held-out shapes (independent seeds)."""
    return ShapesDataset(b.train_images, 32, seed), ShapesDataset(b.test_images, 32, seed + 1)


def _sample_seeds(seed: int, n: int) -> list[int]:
    return [seed * 100_003 + i for i in range(n)]


def _label_demo(model, ae, sample_cfg, train_set, test_set, b, seed, progress, lap):
    """Every class `samples_per_class` times with CFG; the two judges read them."""
    clf, judge = load_judges()
    k = len(SHAPE_CLASSES)
    labels = torch.arange(b.samples_per_class * k) % k
    gen_latents, nfe = generate_latents(model, labels, _sample_seeds(seed, len(labels)), sample_cfg, batch_size=128,
                                        progress=progress)
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
    fd = feature_fds(clf, judge, generated, seed, train_set)
    metrics = {
        "shape_accuracy": accuracy(shape_predicted, labels),
        "shape_judge_accuracy_real": accuracy(classify(judge, test_set.images), test_set.labels),
        "ae_shape_accuracy": accuracy(classify(judge, reconstructions), test_set.labels),
        "class_accuracy": accuracy(classify(clf, generated), labels),
        "classifier_accuracy": accuracy(classify(clf, test_set.images), test_set.labels),
        **fd,
        "shape_fd": latent_fd(real_features, embed(judge, generated[:n]).numpy()),
        "shape_fd_real_vs_real": latent_fd(real_features, embed(judge, train_set.images[:n]).numpy()),
        "latent_fd": latent_fd(real_latents[:n].numpy(), gen_latents[:n].numpy()),
        "latent_fd_real_vs_real": latent_fd(real_latents[:n].numpy(), encode(ae, train_set.images[:n]).numpy()),
        "ae_recon_mse": float(torch.nn.functional.mse_loss(reconstructions, test_set.images)),
        "nfe": nfe.per_batch,
        "nfe_per_image_mean": nfe.per_image_mean,
        "per_class_shape_accuracy": {name: accuracy(shape_predicted[labels == c], c) for c, name in enumerate(SHAPE_CLASSES)},
        "num_samples": len(labels),
    }
    lap("evaluate")
    # samples.png: one row per class (its name at the row start): a real image, then 9 samples
    real_rows = [to_uint8(test_set.images[test_set.labels == c][:1]) for c in range(k)]
    rows = [np.concatenate([real_rows[c], images[np.nonzero(labels.numpy() == c)[0][:9]]]) for c in range(k)]
    return metrics, image_grid(np.concatenate(rows), nrow=10), list(SHAPE_CLASSES)


def feature_fds(clf, judge, generated: torch.Tensor, seed: int, train_set) -> dict:
    """Fréchet distances in the feature spaces of the demo's two judges (their pooled penultimate layers): all
    generated images against as many held-out real ones (seed + 1, as the test set), each with a 95 % bootstrap
    interval, and real-vs-real (training vs held-out) as the floor. The shape judge's FD is the one that moves with
    the sampler's accuracy (bench/nfe_sweep.py: 12.2 at 4 Euler steps, 10.6 at 32 NFE); the colour classifier's
    barely does (it reads hue, which every sampler gets right)."""
    from lfm_fast.eval.frechet import fd_with_interval

    n = len(generated)
    real = ShapesDataset(n, generated.shape[-1], seed + 1).images
    out = {}
    for name, net in (("classifier_fd", clf), ("shape_judge_fd", judge)):
        fd, lo, hi = fd_with_interval(embed(net, real).numpy(), embed(net, generated).numpy())
        out.update({name: fd, f"{name}_ci95": [lo, hi],
                    f"{name}_real_vs_real": latent_fd(embed(net, real).numpy(), embed(net, train_set.images[:n]).numpy())})
    return out


def _task_samples(model, ae, sample_cfg, conds: torch.Tensor, seed: int, progress: bool,
                  grid: bool = True) -> tuple[np.ndarray, np.ndarray | None, int]:
    """One sample of every condition (the measured set) and, with `grid`, GRID_SAMPLES − 1 more of the first
    GRID_INPUTS (for samples.png): (measured uint8 NHWC, extra (GRID_INPUTS, GRID_SAMPLES − 1, H, W, 3), NFE)."""
    n, g = len(conds), min(GRID_INPUTS, len(conds)) if grid else 0
    extra = conds[:g].repeat_interleave(GRID_SAMPLES - 1, 0)
    latents, nfe = generate_latents(model, None, _sample_seeds(seed, n + len(extra)), sample_cfg, batch_size=128,
                                    progress=progress, conds=torch.cat([conds, extra]))
    images = latents_to_images(ae, latents)
    return images[:n], images[n:].reshape(g, GRID_SAMPLES - 1, *images.shape[1:]) if grid else None, nfe.per_batch


def _task_grid(panels: list[np.ndarray], measured: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """samples.png of a task demo: a row per input, its panels (input, mask or map), then its samples."""
    g = len(extra)
    outputs = np.concatenate([measured[:g, None], extra], 1)
    return task_grid(outputs.reshape(-1, *outputs.shape[2:]), np.repeat(np.arange(g), GRID_SAMPLES),
                     [p[:g] for p in panels], max_per_row=GRID_SAMPLES)


def _inpaint_demo(model, ae, sample_cfg, train_set, test_set, b, seed, progress, lap):
    """Held-out shapes with a hole of 30–50 % of the image centred on the shape (`shape_centred_holes`; brush strokes,
    and beside them strokes mixed with boxes), filled by the model and composited; the colour-blind judge reads the
    result, beside the mean-colour fill (the floor)."""
    clf, judge = load_judges()
    images, labels, shapes = to_uint8(test_set.images), test_set.labels, test_set.semantic.numpy()
    real_features = embed(judge, test_set.images).numpy()
    by_kind, grid = {}, None
    for kind in HOLE_KINDS:
        holes = shape_centred_holes(shapes, seed + 1, HOLE_RANGE, kind)
        conds = inpaint_condition(ae, images, holes, downsample_factor(ae))
        generated, extra, nfe = _task_samples(model, ae, sample_cfg, conds, seed, progress, grid=grid is None)
        filled = composite(generated, images, holes)
        lap("sample")
        floor = mean_colour_fill(images, holes)
        by_kind[kind] = {
            "known_region_max_abs_err": int(np.abs(filled.astype(np.int16) - images)[~holes].max()),
            "hole_label_consistency": accuracy(classify(judge, to_tensor(filled)), labels),
            "hole_label_consistency_mean_fill": accuracy(classify(judge, to_tensor(floor)), labels),
            # how often the context alone gives the class away (by colour): what the model can know
            "context_class_accuracy": accuracy(classify(clf, to_tensor(floor)), labels),
            "class_accuracy": accuracy(classify(clf, to_tensor(filled)), labels),
            "fd_hole": latent_fd(real_features, embed(judge, to_tensor(filled)).numpy()),
            "fd_hole_mean_fill": latent_fd(real_features, embed(judge, to_tensor(floor)).numpy()),
            "hole_ratio_mean": float(holes.mean()),
            "shape_hidden_mean": float((holes & (shapes > 0)).sum() / (shapes > 0).sum()),
        }
        if grid is None:  # samples.png shows the first (reported) kind
            masked = np.where(holes[..., None], np.uint8(128), images)
            grid = _task_grid([images, masked], filled, composite(extra, images[:len(extra), None], holes[:len(extra), None]))
        lap("evaluate")
    metrics = {
        "hole_kind": HOLE_KINDS[0], **by_kind[HOLE_KINDS[0]],
        "by_hole_kind": {k: by_kind[k] for k in HOLE_KINDS[1:]},
        "fd_hole_real_vs_real": latent_fd(real_features, embed(judge, train_set.images[:len(images)]).numpy()),
        "shape_judge_accuracy_real": accuracy(classify(judge, test_set.images), labels),
        "nfe": nfe,
        "num_samples": len(images),
    }
    lap("evaluate")
    return metrics, grid, None


def _semantic_demo(model, ae, sample_cfg, train_set, test_set, b, seed, progress, lap):
    """Images generated from the held-out semantic maps; the map recovered from each by an exact colour rule
    (`semantic_from_colours`) is compared with its input map (mIoU), beside the rule's own mIoU on the real images
    and on the AE's reconstructions of them."""
    _, judge = load_judges()
    maps = test_set.semantic.numpy()
    generated, extra, nfe = _task_samples(model, ae, sample_cfg, semantic_condition(maps, NUM_SEMANTIC), seed, progress)
    lap("sample")

    reconstructions = to_uint8(decode(ae, encode(ae, test_set.images)))
    recovered = semantic_from_colours(generated)
    miou, per_class = mean_iou(recovered, maps, NUM_SEMANTIC)
    metrics = {
        "miou": miou,
        # the floor: each generated image against another input's map (what a generator that ignored its map gets)
        "miou_other_map": mean_iou(recovered, np.roll(maps, 1, axis=0), NUM_SEMANTIC)[0],
        "miou_real": mean_iou(semantic_from_colours(to_uint8(test_set.images)), maps, NUM_SEMANTIC)[0],
        "miou_ae_reconstruction": mean_iou(semantic_from_colours(reconstructions), maps, NUM_SEMANTIC)[0],
        "map_recovery": "exact colour rule semantic_from_colours (a pixel whose brightest channel passes 0.55 is "
                        "shape, of the nearest class colour; the rest is background)",
        "per_class_iou": dict(zip(("background",) + SHAPE_CLASSES, per_class)),
        "shape_accuracy": accuracy(classify(judge, to_tensor(generated)), test_set.labels),
        "nfe": nfe,
        "num_samples": len(generated),
    }
    lap("evaluate")
    return metrics, _task_grid([SEMANTIC_PALETTE[maps], to_uint8(test_set.images)], generated, extra), None


# each task's evaluation of a trained network: (metrics, samples.png's grid, its row labels)
EVALUATE = {"label": _label_demo, "inpaint": _inpaint_demo, "semantic": _semantic_demo}


def _report_markdown(r: dict) -> str:
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in r["seconds"].items())
    budget = f"Budget: {r['budget']}{' (a smoke run: expect samples near chance)' if r['budget'] == 'quick' else ''}."
    head = (f"Shapes (32×32 RGB, 6 classes) → built-in AutoencoderKL ({r['autoencoder']['spec']}; f=4, 4×8×8 latents) → "
            f"DiT `{r['dit']['preset']}` ({r['dit']['params'] / 1e6:.2f} M parameters, {r['dit']['steps']} steps) → "
            f"{r['num_samples']} samples with {r['sampler']['solver']} × {r['sampler']['steps']} steps, CFG "
            f"{r['sampler']['cfg']} ({r['nfe']} NFE). {budget}")
    tail = f"\n\nTime per stage: {stages}; {r['seconds_total']:.0f} s in all. torch {r['torch']}, {r['threads']} threads.\n"
    return f"# lfm-fast demo report: {r['task']}\n\n{head}\n\n" + _TASK_MARKDOWN[r["task"]](r) + tail


def _label_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["per_class_shape_accuracy"].items())
    return f"""Chance level of both accuracies: 1/6 = 0.167. Fréchet distances need more samples than feature dimensions
(judge: 64, latents: 256).

| metric | generated | real (reference) |
|---|---|---|
| shape_accuracy: the colour-blind judge sees the requested shape | {r['shape_accuracy']:.3f} | {r['shape_judge_accuracy_real']:.3f} |
| ae_shape_accuracy: the same judge on AE reconstructions of real images | | {r['ae_shape_accuracy']:.3f} |
| class_accuracy: a classifier trained on real shapes (it may read hue) agrees | {r['class_accuracy']:.3f} | {r['classifier_accuracy']:.3f} |
| shape_judge_fd: Fréchet distance of the judge's features, all {r['num_samples']} samples vs as many held-out real (95 % bootstrap interval; floor: real vs real) | {r['shape_judge_fd']:.3f} [{r['shape_judge_fd_ci95'][0]:.3f}, {r['shape_judge_fd_ci95'][1]:.3f}] | {r['shape_judge_fd_real_vs_real']:.3f} |
| classifier_fd: the same with the classifier's features | {r['classifier_fd']:.3f} [{r['classifier_fd_ci95'][0]:.3f}, {r['classifier_fd_ci95'][1]:.3f}] | {r['classifier_fd_real_vs_real']:.3f} |
| shape_fd: the judge's FD on the first 600, vs the 600 held-out test images (floor: real vs real) | {r['shape_fd']:.3f} | {r['shape_fd_real_vs_real']:.3f} |
| latent_fd: generated vs held-out real latents (floor: real vs real) | {r['latent_fd']:.4f} | {r['latent_fd_real_vs_real']:.4f} |
| AE reconstruction MSE (held-out, [-1, 1] scale) | | {r['ae_recon_mse']:.4f} |

Shape accuracy per class:

| class | shape_accuracy |
|---|---|
{rows}

![samples](samples.png) — one row per class: a real image, then 9 samples."""


def _inpaint_markdown(r: dict) -> str:
    kinds = {r["hole_kind"]: r, **r["by_hole_kind"]}
    rows = "\n".join(f"| {kind}{' (reported above)' if kind == r['hole_kind'] else ''} | {100 * m['shape_hidden_mean']:.0f} % | "
                      f"{m['hole_label_consistency']:.3f} | {m['hole_label_consistency_mean_fill']:.3f} | "
                      f"{m['context_class_accuracy']:.3f} |" for kind, m in kinds.items())
    return f"""Held-out shapes, each with a hole of {100 * HOLE_RANGE[0]:.0f}–{100 * HOLE_RANGE[1]:.0f} % of the image
(LaMa-style {r['hole_kind']}, shifted so that the hole's centre of mass is the shape's centre; on average
{100 * r['hole_ratio_mean']:.0f} % of the image and {100 * r['shape_hidden_mean']:.0f} % of the shape's pixels hidden).
The model fills the hole; the known pixels are the input's. Chance: 1/6 = 0.167.

| metric | inpainted | mean-colour fill (the floor) |
|---|---|---|
| hole_label_consistency: the colour-blind judge sees the original shape | {r['hole_label_consistency']:.3f} | {r['hole_label_consistency_mean_fill']:.3f} |
| fd_hole: Fréchet distance of the judge's features to the real images | {r['fd_hole']:.3f} | {r['fd_hole_mean_fill']:.3f} |
| class_accuracy: a colour-reading classifier agrees (the shape's colour outside the hole tells it) | {r['class_accuracy']:.3f} | {r['context_class_accuracy']:.3f} |
| known_region_max_abs_err (uint8) | {r['known_region_max_abs_err']} | |

References: the judge on the real images {r['shape_judge_accuracy_real']:.3f}; fd_hole of real vs real images
{r['fd_hole_real_vs_real']:.3f} (the floor sampling noise alone gives).

By hole kind (the same model and images):

| holes | shape hidden | hole_label_consistency | mean-colour fill | context tells the class |
|---|---|---|---|---|
{rows}

![samples](samples.png) — a row per input: the image, the input with its hole grey, then 6 samples."""


def _semantic_markdown(r: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.3f} |" for k, v in r["per_class_iou"].items())
    return f"""Images drawn from held-out semantic maps; the map is recovered from each image by the
{r['map_recovery']}, and compared with the input map.

| metric | generated | real images | AE reconstructions |
|---|---|---|---|
| miou: recovered vs input map | {r['miou']:.3f} | {r['miou_real']:.3f} | {r['miou_ae_reconstruction']:.3f} |
| miou against another input's map (the floor) | {r['miou_other_map']:.3f} | | |
| shape_accuracy: the colour-blind judge sees the map's shape | {r['shape_accuracy']:.3f} | | |

IoU per class:

| class | IoU |
|---|---|
{rows}

![samples](samples.png) — a row per input: the map (each class in its colour, background black), the real image
it came from, then 6 samples."""


_TASK_MARKDOWN = {"label": _label_markdown, "inpaint": _inpaint_markdown, "semantic": _semantic_markdown}
