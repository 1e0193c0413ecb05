"""How long a command takes to end: one small training command run alternately ending through `exit_now` (what
`lfm-fast` does) and through Python's own exit (SystemExit after `main`), side by side in one run. Prints the median
time from `main`'s return to the process's end, and of the whole command.

Usage: python bench/exit_time.py [--runs 4]   (≈ 10 s a run on 2 CPU cores; writes only under a temporary folder)
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ENDINGS = {"exit_now": "exit_now(code)", "python exit": "raise SystemExit(code)"}
SCRIPT = """import sys, time
from lfm_fast.cli.app import exit_now, main
code = main(sys.argv[2:])
open(sys.argv[1], "w").write(repr(time.time()))
{ending}
"""
TRAIN = ["train", "--steps", "4", "--preset", "small-data", "model.hidden_size=32", "model.depth=2", "model.num_heads=2",
         "model.num_classes=3", "train.batch_size=8", "train.ckpt_every=4"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=4, help="runs of each ending, alternating (default: %(default)s)")
    a = p.parse_args()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tests.conftest import write_random_latents

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    times = {k: [] for k in ENDINGS}
    with tempfile.TemporaryDirectory() as tmp:
        write_random_latents(os.path.join(tmp, "latents"), num_classes=3)
        for i in range(a.runs):
            for name, ending in ENDINGS.items():
                out, stamp = os.path.join(tmp, f"run-{name}-{i}"), os.path.join(tmp, "returned")
                t0 = time.time()
                subprocess.run([sys.executable, "-c", SCRIPT.format(ending=ending), stamp, *TRAIN, "--latents",
                                os.path.join(tmp, "latents"), "--out", out], env=env, check=True, capture_output=True)
                t1 = time.time()
                times[name].append((t1 - t0, t1 - float(open(stamp).read())))
    for name, runs in times.items():
        print(f"{name:12s} main's return to the process's end {statistics.median(b for _, b in runs):.2f} s, "
              f"whole command {statistics.median(a for a, _ in runs):.2f} s (median of {len(runs)})")


if __name__ == "__main__":
    main()
