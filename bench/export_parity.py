"""Parity of the exported sampler with eager PyTorch on a trained checkpoint (default: the demo's):
8-step Heun, CFG 2, batch 1 and 7, fp32 and fp16 latents, and uint8 images with the decoder.
Usage: python bench/export_parity.py [--ckpt runs/demo/dit] [--out bench/results/cpu/export_parity.json]"""

import argparse
import json
import os
import tempfile

import numpy as np

from lfm_fast.autoencoder import decode, load_autoencoder
from lfm_fast.data.shapes import to_uint8
from lfm_fast.export.onnx import export_onnx
from lfm_fast.export.ort import OrtSampler
from lfm_fast.fileio import resolve_path, write_json
from lfm_fast.models.dit import DiT, read_checkpoint_config
from lfm_fast.sampling import SampleConfig, per_image_noise, sample

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", default="runs/demo/dit")
    p.add_argument("--out", default="bench/results/cpu/export_parity.json")
    a = p.parse_args()
    model = DiT.from_pretrained(a.ckpt).eval()
    ae = load_autoencoder(resolve_path(read_checkpoint_config(a.ckpt)["meta"]["autoencoder"], a.ckpt), device="cpu")
    c = model.config
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("fp32", "fp16", "fp32+decoder"):
            path = os.path.join(tmp, f"{variant}.onnx")
            export_onnx(model, path, SampleConfig("heun", 8, 2.0), ae=ae if "decoder" in variant else None, fp16=variant == "fp16")
            runner = OrtSampler(path)
            for batch in (1, 7):
                noise = per_image_noise(list(range(batch)), (c.in_channels, c.input_size, c.input_size))
                y = np.arange(batch) % c.num_classes
                ref = sample(model, noise, __import__("torch").as_tensor(y), solver="heun", steps=8, cfg=2.0).latents
                out = runner(noise.numpy(), y)
                if "decoder" in variant:
                    diff = np.abs(out.astype(int) - to_uint8(decode(ae, ref)).astype(int))
                    rows.append({"variant": variant, "batch": batch, "max_abs_uint8": int(diff.max()),
                                 "fraction_within_1_255": float((diff <= 1).mean()), "fraction_equal": float((diff == 0).mean())})
                else:
                    err = np.abs(out.astype(np.float32) - ref.numpy())
                    rows.append({"variant": variant, "batch": batch, "max_abs_latent_error": float(err.max()),
                                 "latent_std": float(ref.std())})
                print(json.dumps(rows[-1]), flush=True)
    write_json(a.out, {"ckpt": a.ckpt, "solver": "heun", "steps": 8, "cfg": 2.0, "rows": rows})
