"""Sampling latency per backend: 8-step Heun with CFG (16 NFE), batch 1 and 32.

- demo model (small-data preset, 4×8×8 latents) and DiT-S/2 at 4×32×32: eager; compile (demo only) and
  onnxruntime run the whole unrolled sampler (one compiled module / one graph for all 16 evaluations);
  onnxruntime-velocity runs the velocity graph (the network alone, CFG rows batched through it), driven by
  the project's own Heun in Python: the design that changes steps, solver and CFG without a new export.

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


def onnx_runner(name, graph, tmp_dir):
    """ONNX Runtime (CPU): the unrolled sampler graph, or the velocity graph driven by the project's Heun."""
    key = ("onnx", name, graph)
    if key not in _cache:
        from lfm_fast.export.onnx import export_onnx
        from lfm_fast.export.ort import OrtSampler, velocity_net

        model = model_for(name)
        path = str(tmp_dir / f"{graph}.onnx")
        export_onnx(model, path, SampleConfig("heun", STEPS, CFG), graph=graph)
        runner = OrtSampler(path)
        if graph == "sampler":
            _cache[key] = runner
        else:
            net = velocity_net(runner, model.config)
            _cache[key] = lambda noise, y: sample(net, noise, y, solver="heun", steps=STEPS, cfg=CFG).latents
    return _cache[key]


@pytest.mark.parametrize("batch", [1, 32])
@pytest.mark.parametrize("backend", ["eager", "compile", "onnxruntime", "onnxruntime-velocity"])
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
        graph = "velocity" if backend.endswith("velocity") else "sampler"
        run = onnx_runner(name, graph, tmp_path_factory.mktemp("onnx"))
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
