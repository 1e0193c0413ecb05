"""What the demos' quality metrics read when the network ignores its condition: the floor a test's quality bar must
stand well above (issue 29). Runs the demo of a task at one budget and seed, then evaluates its trained network
again as the demo does, but given the null label / null condition at every sampling call (the model a broken
conditioning path would give). Prints one JSON object: the metrics the tests bound, for both.

Usage: python bench/condition_floor.py --task label|inpaint|semantic [--budget quick] [--seed 0] [--out FILE]
"""

import argparse
import json
import tempfile

from lfm_fast.autoencoder import BUILTIN_SHAPES_AE, load_autoencoder
from lfm_fast.config import get_preset
from lfm_fast.data.shapes import ShapesDataset
from lfm_fast.demo import BUDGETS, PRESETS, _inpaint_demo, _label_demo, _semantic_demo, run_demo
from lfm_fast.models.cond import null_condition
from lfm_fast.models.dit import DiT

METRICS = {"label": ("class_accuracy", "shape_accuracy", "shape_fd", "shape_fd_real_vs_real"),
           "inpaint": ("hole_label_consistency", "class_accuracy", "hole_label_consistency_mean_fill",
                       "context_class_accuracy", "fd_hole", "fd_hole_mean_fill", "fd_hole_real_vs_real"),
           "semantic": ("miou", "miou_other_map", "shape_accuracy")}


def ignoring_the_condition():
    """DiT.forward with the null label and the null condition in eval mode (sampling), training untouched."""
    forward = DiT.forward

    def blind(self, x, t, y=None, cond=None):
        if not self.training:
            y = None
            cond = None if cond is None else null_condition(self.config.condition, cond)
        return forward(self, x, t, y, cond)
    return blind


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=tuple(METRICS), required=True)
    ap.add_argument("--budget", default="quick", choices=tuple(BUDGETS["label"]))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    result = {"task": args.task, "budget": args.budget, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(f"{tmp}/demo", task=args.task, budget=args.budget, seed=args.seed, progress=False)
        result["trained"] = {k: report[k] for k in METRICS[args.task]}
        b = BUDGETS[args.task][args.budget]
        model = DiT.from_pretrained(f"{tmp}/demo/dit").eval()
        DiT.forward = ignoring_the_condition()
        evaluate = {"label": _label_demo, "inpaint": _inpaint_demo, "semantic": _semantic_demo}[args.task]
        metrics, _, _ = evaluate(model, load_autoencoder(BUILTIN_SHAPES_AE), get_preset(PRESETS[args.task]).sample,
                                 ShapesDataset(b.train_images, 32, args.seed), ShapesDataset(b.test_images, 32, args.seed + 1),
                                 b, args.seed, False, lambda name: None)
        result["condition_ignored"] = {k: metrics[k] for k in METRICS[args.task]}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
