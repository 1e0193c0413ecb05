"""How closely 1 and 2 ranks train the same run: the runs of tests/test_distributed.py (tiny DiT, global
batch 8, 12 steps, torchrun, gloo, one thread per process), reported as numbers instead of asserted.
Usage: python bench/fsdp_parity.py [--out bench/results/cpu/fsdp_parity.json]"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.conftest import write_random_latents  # noqa: E402
from tests.test_distributed import losses, train_run  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="bench/results/cpu/fsdp_parity.json")
    a = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as root:
        latents = os.path.join(root, "latents")
        write_random_latents(latents, n=64, num_classes=3)
        for precision in ("fp32", "bf16"):
            runs = {}
            for nproc, accum in [(1, 1), (2, 1), (2, 2)]:
                runs[nproc, accum] = os.path.join(root, f"{precision}-{nproc}x{accum}")
                train_run(latents, runs[nproc, accum], nproc, f"train.precision={precision}", f"train.grad_accum={accum}")
            base = np.array(list(losses(runs[1, 1]).values()))
            wbase = load_file(os.path.join(runs[1, 1], "model.safetensors"))
            for key in [(2, 1), (2, 2)]:
                other = np.array(list(losses(runs[key]).values()))
                w = load_file(os.path.join(runs[key], "model.safetensors"))
                rows.append({"precision": precision, "ranks": key[0], "grad_accum": key[1],
                             "max_rel_loss_diff_vs_1_rank": float(np.max(np.abs(other - base) / np.abs(base))),
                             "max_abs_weight_diff_vs_1_rank": max(float((w[k] - wbase[k]).abs().max()) for k in w)})
                print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"steps": 12, "global_batch": 8, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
