"""FSDP2 training throughput through the real launcher: `lfm-fast train --nproc N` on random latents, for
1 vs N processes, with and without per-block compile and activation checkpointing, at one global batch.

Figures come from the run's own metrics.jsonl (img/s, TFLOP/s, MFU against the peak the trainer measured
or looked up, peak memory of rank 0), as the median over the steps after the warm-up ones (compile time
is excluded). The steps run inside torchrun subprocesses, so pytest-benchmark cannot time them; the
1-process row is the baseline of the same run. Benchmark runs write no checkpoint and no final weights
(`train.save_checkpoints=false`); the trainer's output streams through to stderr (its errors show where they happen).
Each row prints as it is measured: an --out ending in .jsonl gets it appended (with the machine's fields),
any other --out is the JSON document {machine, rows}, rewritten after each row.

    python bench/fsdp_scaling.py --out bench/results/cpu/fsdp.json                    # CPU: DiT-S/2, bf16
    python bench/fsdp_scaling.py --arch DiT-XL/2 --batch 64 --nproc 1 --configs compile --out fsdp.jsonl  # one GPU
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

CONFIGS = {"eager": [], "compile": ["train.compile=true"], "ac": ["train.activation_checkpointing=full"],
           "compile+ac": ["train.compile=true", "train.activation_checkpointing=full"]}


def write_latents(folder: str, n: int, size: int) -> None:
    from lfm_fast.data.latents import LatentShardWriter

    g = torch.Generator().manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    writer = LatentShardWriter(folder, shard_size=n)
    lat = torch.randn((n, 4, size, size), generator=g)
    std = torch.full_like(lat, 0.05).half()  # the preset flips and samples the posterior
    writer.add(lat, torch.arange(n) % 1000, latents_flip=lat.flip(-1), latents_std=std, latents_flip_std=std)
    writer.close({"latent_shape": [4, size, size], "num_classes": 1000, "autoencoder": "", "scaling_factor": 1.0})


def run(latents, arch, nproc, batch, steps, warmup, extra, precision):
    size = arch_overrides(arch)
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "lfm_fast", "train", "--latents", latents, "--preset", "imagenet256-dit-b2",
               "--out", os.path.join(out, "run"), "--steps", str(steps), "--nproc", str(nproc), *size,
               f"train.batch_size={batch}", f"train.precision={precision}", "train.log_every=1", "train.ckpt_every=0",
               "train.save_checkpoints=false", "train.sample_every=0", "train.warmup_steps=0", *extra]
        print("+", " ".join(cmd), file=sys.stderr, flush=True)
        t0 = time.time()
        rc = subprocess.run(cmd, stdout=sys.stderr).returncode  # its output streams through (stdout: our rows alone)
        wall = time.time() - t0
        if rc:
            sys.exit(f"fsdp_scaling: the trainer exited with {rc} after {wall:.0f} s (its output is above)")
        rows = [json.loads(line) for line in open(os.path.join(out, "run", "metrics.jsonl"))][warmup:]
    med = {k: statistics.median(r[k] for r in rows) for k in ("img_per_s", "tokens_per_s", "tflops", "mfu")}
    return {**med, "mem_gib_rank0": max(r["mem_gib"] for r in rows), "wall_s": wall, "steps_timed": len(rows)}


def arch_overrides(arch: str) -> list[str]:
    from lfm_fast.models.dit import arch_config

    a = arch_config(arch)
    return [f"model.hidden_size={a['hidden_size']}", f"model.depth={a['depth']}", f"model.num_heads={a['num_heads']}",
            f"model.patch_size={a['patch_size']}"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="DiT-S/2")
    p.add_argument("--latent-size", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--nproc", default="1,2", help="comma-separated process counts")
    p.add_argument("--configs", default="eager,compile,ac", help=f"comma-separated from {list(CONFIGS)}")
    p.add_argument("--precision", default="bf16")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    machine = {"host": platform.node(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
               "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        latents = os.path.join(tmp, "latents")
        write_latents(latents, max(64, a.batch * 2), a.latent_size)
        for config in a.configs.split(","):
            for nproc in map(int, a.nproc.split(",")):
                r = {"config": config, "nproc": nproc, "arch": a.arch, "global_batch": a.batch, "precision": a.precision,
                     **run(latents, a.arch, nproc, a.batch, a.steps, a.warmup, CONFIGS[config], a.precision)}
                base = next((x for x in rows if x["config"] == config and x["nproc"] == 1), None)
                r["speedup_vs_1proc"] = r["img_per_s"] / base["img_per_s"] if base else None
                rows.append(r)
                print(json.dumps(r), flush=True)
                if a.out.endswith(".jsonl"):
                    with open(a.out, "a") as f:
                        f.write(json.dumps(r | machine) + "\n")
                else:
                    with open(a.out, "w") as f:
                        json.dump({"machine": machine, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
