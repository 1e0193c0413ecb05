"""Sampling latency per backend: 8-step Heun with CFG (16 NFE), batch 1 and 32.

- demo model (small-data preset, 4×8×8 latents): eager, compile and onnxruntime run the whole
  unrolled sampler (one graph / one compiled module for all 16 evaluations);
- DiT-S/2 at 4×32×32: eager and onnxruntime; the ONNX graph of 16 unrolled DiT-S/2 evaluations
  takes minutes to export on 2 cores, so this row exports the velocity network alone and loops the
  same Heun steps in Python (marked `graph=velocity` in extra_info).

extra_info holds ms per image, images/s and ms per NFE. Weights are random: latency does not
depend on them.
"""

import dataclasses

import pytest
import torch

from lfm_fast.config import get_preset
from lfm_fast.export.sampler import compile_sampler
from lfm_fast.models.dit import DiT, build_dit
from lfm_fast.sampling import SampleConfig, per_image_noise, sample

STEPS, CFG = 8, 1.5
NFE = 2 * STEPS
_cache = {}


def model_for(name):
    if name not in _cache:
        torch.manual_seed(0)
        if name == "demo":
            m = DiT(dataclasses.replace(get_preset("small-data").model, num_classes=6))
        else:
            m = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
        with torch.no_grad():  # adaLN-Zero init makes v ≡ 0; give the net real work to do
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        _cache[name] = m.eval()
    return _cache[name]


def onnx_runner(name, tmp_dir):
    key = ("onnx", name)
    if key not in _cache:
        from lfm_fast.export.onnx import export_onnx

        model = model_for(name)
        path = str(tmp_dir / f"{name}.onnx")
        if name == "demo":
            export_onnx(model, path, SampleConfig("heun", STEPS, CFG))
            from lfm_fast.export.ort import OrtSampler

            runner = OrtSampler(path)
            _cache[key] = lambda noise, y: runner(noise.numpy(), y.numpy())
        else:
            export_onnx(model, path, SampleConfig("euler", 1, CFG), net_only=True)
            _cache[key] = _velocity_loop(path)
    return _cache[key]


def _velocity_loop(path):
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ts = torch.linspace(1, 0, STEPS + 1).numpy()

    def run(noise, y):
        x, labels = noise.numpy(), y.numpy()

        def v(x_, t):
            return sess.run(None, {"x": x_, "t": np.full(len(x_), t, np.float32), "labels": labels})[0]

        for i in range(STEPS):
            h = ts[i + 1] - ts[i]
            k1 = v(x, ts[i])
            k2 = v(x + h * k1, ts[i + 1])
            x = x + 0.5 * h * (k1 + k2)
        return x

    return run


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("backend", ["eager", "compile", "onnxruntime"])
@pytest.mark.parametrize("name", ["demo", "DiT-S/2"])
def test_sampling_latency(benchmark, tmp_path_factory, name, backend, batch):
    if name != "demo" and batch > 1 and not torch.cuda.is_available():
        pytest.skip("DiT-S/2 at batch 32 is 17 TFLOP per call: minutes each on 2 CPU cores")
    model = model_for(name)
    c = model.config
    noise = per_image_noise(list(range(batch)), (c.in_channels, c.input_size, c.input_size))
    y = torch.arange(batch) % c.num_classes
    graph = "sampler"
    if backend == "eager":
        def run(n, lab):
            return sample(model, n, lab, solver="heun", steps=STEPS, cfg=CFG).latents
    elif backend == "compile":
        if name != "demo":
            pytest.skip("inductor needs minutes for 16 unrolled DiT-S/2 evaluations on 2 cores")
        compiled, _ = compile_sampler(model, SampleConfig(solver="heun", steps=STEPS, cfg=CFG))
        run = compiled
    else:
        run = onnx_runner(name, tmp_path_factory.mktemp("onnx"))
        graph = "sampler" if name == "demo" else "velocity"
    with torch.no_grad():
        run(noise, y)  # warm-up (compiles, allocates)
        benchmark.pedantic(lambda: run(noise, y), rounds=5 if batch == 1 else 3, iterations=1)
    s = benchmark.stats.stats.mean
    benchmark.extra_info.update(model=name, backend=backend, batch=batch, nfe=NFE, graph=graph,
                                ms_per_image=1e3 * s / batch, img_per_s=batch / s, ms_per_nfe=1e3 * s / NFE)


SOLVER_COSTS = [("heun", 8), ("ab3", 16), ("abm3", 16), ("dpm++2m", 16), ("ab2", 16)]


def test_solver_cost_at_16_nfe(benchmark):
    """Eager cost of the solvers at the same NFE (16, CFG), demo model, batch 32: a multistep step is one network
    evaluation plus a few axpys, so ab3, abm3, dpm++2m and ab2 × 16 should cost what Heun × 8 costs (the grid, a
    calibrated one too, is constants: the cost does not depend on it). One benchmark round runs every solver once,
    in an order that rotates from round to round, so the machine's drift over the run falls on all of them alike
    (run one after another, whichever ran first looked 15–40 % faster)."""
    import time

    model = model_for("demo")
    c = model.config
    noise = per_image_noise(list(range(32)), (c.in_channels, c.input_size, c.input_size))
    y = torch.arange(32) % c.num_classes
    times = {f"{s} × {n}": [] for s, n in SOLVER_COSTS}
    for s, n in SOLVER_COSTS:
        assert sample(model, noise, y, solver=s, steps=n, cfg=CFG).nfe == 16
    turn = iter(range(10**9))

    def one_round():
        k = next(turn)
        for s, n in SOLVER_COSTS[k % len(SOLVER_COSTS):] + SOLVER_COSTS[:k % len(SOLVER_COSTS)]:
            start = time.perf_counter()
            sample(model, noise, y, solver=s, steps=n, cfg=CFG)
            times[f"{s} × {n}"].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=10, iterations=1)
    benchmark.extra_info.update(nfe=16, batch=32, solver_cost={
        name: {"ms_per_image_median": 1e3 * sorted(v)[len(v) // 2] / 32, "ms_per_image_min": 1e3 * min(v) / 32}
        for name, v in times.items()})
