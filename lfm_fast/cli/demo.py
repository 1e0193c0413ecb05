"""`lfm-fast demo`: end to end on the embedded shapes data: AE → latents → DiT → samples → report."""

from __future__ import annotations

from lfm_fast.cli.common import add_overwrite_flag


def add_parser(sub) -> None:
    d = sub.add_parser("demo", help="end to end on the embedded shapes data: AE → latents → DiT → samples → report")
    d.add_argument("--task", choices=("label", "inpaint", "semantic"), default="label",
                   help="label: class-conditional generation with CFG; inpaint: fill a hole over the shape (known pixels "
                        "kept exactly); semantic: draw an image from a semantic map")
    d.add_argument("--out", default=None, help="output folder, new or empty; see --overwrite (default: runs/demo, or "
                   "runs/demo-TASK for --task inpaint|semantic)")
    add_overwrite_flag(d)
    length = d.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a ≤2-minute run with tiny budgets (what the tests use)")
    length.add_argument("--long", action="store_true", help="the DiT trains 20,000 steps (instead of 6,000; 8,000 "
                        "for --task inpaint): ≤ 30 minutes")
    d.add_argument("--train-ae", action="store_true", help="train the autoencoder here (≈ 20 minutes more on 2 cores) instead of "
                   "using the pretrained builtin:shapes one")
    d.add_argument("--seed", type=int, default=0, help="seed of every stage (data, training, sampling)")


def run(args):
    from lfm_fast.demo import run_demo

    budget = "quick" if args.quick else "long" if args.long else "full"
    out = args.out or ("runs/demo" if args.task == "label" else f"runs/demo-{args.task}")
    r = run_demo(out, task=args.task, budget=budget, seed=args.seed, train_ae=args.train_ae, overwrite=args.overwrite)
    if args.task == "label":
        headline = (f"shape_accuracy={r['shape_accuracy']:.3f} class_accuracy={r['class_accuracy']:.3f} ae_shape_accuracy="
                    f"{r['ae_shape_accuracy']:.3f} shape_fd={r['shape_fd']:.2f} (real-vs-real {r['shape_fd_real_vs_real']:.2f})")
    elif args.task == "inpaint":
        headline = (f"hole_label_consistency={r['hole_label_consistency']:.3f} (mean-colour fill "
                    f"{r['hole_label_consistency_mean_fill']:.3f}) fd_hole={r['fd_hole']:.2f} "
                    f"known_region_max_abs_err={r['known_region_max_abs_err']}")
    else:
        headline = f"miou={r['miou']:.3f} (real images {r['miou_real']:.3f}, AE reconstructions {r['miou_ae_reconstruction']:.3f})"
    print(f"wrote {out}/report.json, report.md, samples.png: {headline} nfe={r['nfe']} seconds_total={r['seconds_total']:.0f}")
