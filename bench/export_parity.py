"""Exported graphs against fp32 eager PyTorch on a trained checkpoint (default: the demo's), Heun with CFG 2.

Rows: network dtype (fp32 / fp16 / bf16) × design (unrolled sampler graph / velocity graph driven by the
project's Heun) × 8 / 32 / 128 steps, max abs error on the latents of 8 images vs fp32 eager, on ONNX Runtime
(CPU). ONNX Runtime's CPU provider has no bf16 kernels (Conv, MatMul), so bf16 rows run the same math eagerly
(the token path in bf16, the per-sample path, state, times and solver fp32: `cast_token_path`), beside an
`fp16 state and grid (old)` row, the design before this one (every weight, the ODE state and the time grid
fp16), and the floor fp16 weights set: fp16-rounded token-path weights with everything computed in fp32. Then export time and graph size of the fp16 sampler graph against steps, and the
uint8 images of a graph with the decoder.
Usage: python bench/export_parity.py [--ckpt runs/demo/dit] [--out bench/results/cpu/export_parity.json]"""

import argparse
import copy
import json
import os
import tempfile
import time

import numpy as np
import torch

from lfm_fast.autoencoder import decode, load_autoencoder
from lfm_fast.data.images import to_uint8
from lfm_fast.export.onnx import export_onnx
from lfm_fast.export.ort import OrtSampler, velocity_net
from lfm_fast.fileio import resolve_path, write_json
from lfm_fast.generate import cast_token_path
from lfm_fast.models.dit import DiT, read_checkpoint_config
from lfm_fast.sampling import SampleConfig, per_image_noise, sample_with

CFG, BATCH = 2.0, 8


def graph_size(path: str) -> int:
    return sum(os.path.getsize(p) for p in (path, path + ".data") if os.path.exists(p))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="runs/demo/dit")
    p.add_argument("--out", default="bench/results/cpu/export_parity.json")
    p.add_argument("--steps", default="8,32,128")
    a = p.parse_args()
    model = DiT.from_pretrained(a.ckpt).eval()
    c = model.config
    noise = per_image_noise(list(range(BATCH)), (c.in_channels, c.input_size, c.input_size))
    y = torch.arange(BATCH) % c.num_classes
    rows, timing = [], []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        velocity = {}
        for dtype in ("float32", "float16"):
            path = os.path.join(tmp, f"velocity-{dtype}.onnx")
            export_onnx(model, path, SampleConfig(), dtype=dtype, graph="velocity")
            velocity[dtype] = velocity_net(OrtSampler(path), c)
        for steps in [int(s) for s in a.steps.split(",")]:
            cfg = SampleConfig("heun", steps, CFG)
            ref = sample_with(model, noise, y, cfg).latents

            def row(dtype, design, backend, out, **extra):
                rows.append({"dtype": dtype, "design": design, "backend": backend, "steps": steps, "nfe": 2 * steps,
                             "max_abs_latent_error": float((out.float() - ref).abs().max()), "latent_std": float(ref.std()), **extra})
                print(json.dumps(rows[-1]), flush=True)

            for dtype in ("float32", "float16"):
                path = os.path.join(tmp, f"sampler-{dtype}-{steps}.onnx")
                start = time.perf_counter()
                export_onnx(model, path, cfg, dtype=dtype)
                seconds = time.perf_counter() - start
                row(dtype, "sampler", "onnxruntime", OrtSampler(path)(noise, y), export_seconds=round(seconds, 2),
                    graph_bytes=graph_size(path))
                os.remove(path)
                row(dtype, "velocity", "onnxruntime", sample_with(velocity[dtype], noise, y, cfg).latents)
            for dtype in (torch.float16, torch.bfloat16):  # eager: the graphs' math (token path in dtype, fp32 state)
                net = cast_token_path(copy.deepcopy(model), dtype)
                row(str(dtype).split(".")[1], "network only", "eager", sample_with(net, noise, y, cfg).latents)
            old = copy.deepcopy(model).half()  # the old design: every weight fp16, the ODE state and time grid too
            row("float16", "fp16 state and grid (old)", "eager", sample_with(old, noise.half(), y, cfg).latents)
            rounded = copy.deepcopy(model)  # the floor: fp16-rounded token-path weights, everything computed in fp32
            for (name, p), (_, q) in zip(rounded.named_parameters(), cast_token_path(copy.deepcopy(model), torch.float16).named_parameters()):
                p.copy_(q.float())
            row("float16", "fp16-rounded weights, fp32 compute", "eager", sample_with(rounded, noise, y, cfg).latents)
        for steps in (4, 8, 16, 32, 128):
            path = os.path.join(tmp, f"timing-{steps}.onnx")
            start = time.perf_counter()
            export_onnx(model, path, SampleConfig("heun", steps, CFG), dtype="float16")
            timing.append({"steps": steps, "nfe": 2 * steps, "export_seconds": round(time.perf_counter() - start, 2),
                           "graph_bytes": graph_size(path)})
            print(json.dumps(timing[-1]), flush=True)
            os.remove(path)
        path = os.path.join(tmp, "timing-velocity.onnx")
        start = time.perf_counter()
        export_onnx(model, path, SampleConfig(), dtype="float16", graph="velocity")
        velocity_timing = {"export_seconds": round(time.perf_counter() - start, 2), "graph_bytes": graph_size(path)}
        ae = load_autoencoder(resolve_path(read_checkpoint_config(a.ckpt)["meta"]["autoencoder"], a.ckpt), device="cpu")
        path = os.path.join(tmp, "decoder.onnx")
        cfg = SampleConfig("heun", 8, CFG)
        export_onnx(model, path, cfg, ae=ae)
        diff = np.abs(OrtSampler(path)(noise, y).numpy().astype(int) - to_uint8(decode(ae, sample_with(model, noise, y, cfg).latents)).astype(int))
        images = {"steps": 8, "max_abs_uint8": int(diff.max()), "fraction_within_1_255": float((diff <= 1).mean()),
                  "fraction_equal": float((diff == 0).mean())}
        print(json.dumps(images), flush=True)
    write_json(a.out, {"ckpt": a.ckpt, "solver": "heun", "cfg": CFG, "batch": BATCH, "rows": rows,
                       "export_time_fp16_sampler": timing, "export_time_fp16_velocity": velocity_timing,
                       "with_decoder_fp32": images})
