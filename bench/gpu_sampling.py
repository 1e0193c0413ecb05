"""DiT-XL/2 sampling latency on one GPU: 8-step Heun with CFG 1.5 (16 NFE), eager vs the compile backend
(the unrolled sampler under torch.compile, mode="reduce-overhead" = CUDA graphs), batch 1 and 32, bf16."""

import argparse
import json
import time

import torch

from lfm_fast.export.sampler import compile_sampler
from lfm_fast.models.dit import build_dit
from lfm_fast.sampling import SampleConfig, per_image_noise, sample


def timed(fn, reps):
    fn()
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    a = p.parse_args()
    torch.manual_seed(0)
    model = build_dit("DiT-XL/2", input_size=32, in_channels=4, num_classes=1000).cuda().to(torch.bfloat16).eval()
    cfg = SampleConfig(solver="heun", steps=8, cfg=1.5)
    compiled, nfe = compile_sampler(model, cfg)
    rows = []
    for batch in (1, 32):
        noise = per_image_noise(list(range(batch)), (4, 32, 32), device="cuda", dtype=torch.bfloat16)
        y = torch.arange(batch, device="cuda") % 1000
        with torch.no_grad():
            for backend, fn in (("eager", lambda: sample(model, noise, y, solver="heun", steps=8, cfg=1.5)),
                                ("compile", lambda: compiled(noise, y))):
                s = timed(fn, 10)
                rows.append({"backend": backend, "batch": batch, "nfe": nfe, "ms_per_batch": 1e3 * s,
                             "ms_per_image": 1e3 * s / batch, "img_per_s": batch / s, "ms_per_nfe": 1e3 * s / nfe})
                print(json.dumps(rows[-1]), flush=True)
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows}, f, indent=2)
