"""What the demos' quality metrics read when the network ignores its condition: the floor a test's quality bar must
stand well above. Runs the demo of a task at one budget and seed, then evaluates its trained network
again as the demo does, but given the null label / null condition at every sampling call (the model a broken
conditioning path would give). Prints one JSON object: the metrics the tests bound, for both. With several seeds
(`--seed 0,1,2`), each seed's run and the range over them: the spread a test's bar (measured at seed 0) must allow.

Usage: python bench/condition_floor.py --task label|inpaint|semantic [--budget quick] [--seed 0[,1,…]] [--out FILE]
"""

import argparse
import json
import tempfile

from lfm_fast.autoencoder import BUILTIN_SHAPES_AE, load_autoencoder
from lfm_fast.config import get_preset
from lfm_fast.demo import BUDGETS, EVALUATE, TASK_PRESET, demo_sets, run_demo
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


def floor(task: str, budget: str, seed: int) -> dict:
    """The demo's metrics at `seed`, trained and with the condition ignored."""
    with tempfile.TemporaryDirectory() as tmp:
        report = run_demo(f"{tmp}/demo", task=task, budget=budget, seed=seed, progress=False)
        b = BUDGETS[task][budget]
        model = DiT.from_pretrained(f"{tmp}/demo/dit").eval()
        forward, DiT.forward = DiT.forward, ignoring_the_condition()
        try:
            metrics, _, _ = EVALUATE[task](model, load_autoencoder(BUILTIN_SHAPES_AE), get_preset(TASK_PRESET[task]).sample,
                                           *demo_sets(b, seed), b, seed, False, lambda name: None)
        finally:
            DiT.forward = forward
    return {"trained": {k: report[k] for k in METRICS[task]}, "condition_ignored": {k: metrics[k] for k in METRICS[task]}}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", choices=tuple(METRICS), required=True, help="which demo: its trained network and the same "
                    "network given the null label or condition are judged as the demo judges them")
    ap.add_argument("--budget", default="quick", choices=tuple(BUDGETS["label"]),
                    help="the demo budget to train (default: %(default)s, what the tests' quick demos use; each seed "
                         "trains one: minutes)")
    ap.add_argument("--seed", default="0", help="a seed, or comma-separated seeds (default: %(default)s)")
    ap.add_argument("--out", help="also write the JSON here")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seed.split(",")]
    result = {"task": args.task, "budget": args.budget}
    if len(seeds) == 1:
        result.update(seed=seeds[0], **floor(args.task, args.budget, seeds[0]))
    else:
        runs = {seed: floor(args.task, args.budget, seed) for seed in seeds}
        result["seeds"] = {str(seed): r for seed, r in runs.items()}
        result["range"] = {kind: {k: [min(r[kind][k] for r in runs.values()), max(r[kind][k] for r in runs.values())]
                                  for k in METRICS[args.task]} for kind in ("trained", "condition_ignored")}
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

if __name__ == "__main__":
    main()
