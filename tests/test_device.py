"""The meta-device harness: every path a GPU runs, run here with the model, its inputs and its buffers on the `meta`
device, so that a tensor made on the CPU in the middle of the path raises ("Tensor on device meta is not on the
expected device cpu"), as it would on CUDA. `HostSyncs` counts what would make the host wait for the device: reading
a value (`.item()`, `bool()`, `float()`, `.tolist()`), copying to the host, a blocking copy to the device, and ops
whose output size depends on values (nonzero, boolean masks). Meta tensors have no values, so it answers those with
stand-ins (reads: True, 0 or 1.0; copies to the host: zeros; masks and nonzero: select nothing) and the path runs on.

What each path is allowed, stated here: fixed-step sampling (every solver, CFG, guidance intervals, calibrated grids,
the conditional tasks, the export sampler) and the training step read nothing from the device; logging reads two
things per interval; a checkpoint's finiteness check one; calibration's solve reads the grid it fits once; the
adaptive solvers read their accept/finish decisions every step; sampling that returns images to the host copies one
batch at a time.
"""

import os
from collections import Counter

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT, DiTConfig

aten = torch.ops.aten
META = torch.device("meta")
FIXED = ("euler", "midpoint", "heun", "rk4", "ab2", "ab3", "abm3", "dpm++2m")
ADAPTIVE = ("dopri5", "bosh3", "adaptive_heun")


def _off_host(t) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type != "cpu"


class HostSyncs(TorchDispatchMode):
    """Counts host syncs by kind (`self.kinds`), answering them with stand-ins on the meta device."""

    def __init__(self):
        super().__init__()
        self.kinds = Counter()

    @property
    def total(self) -> int:
        return sum(self.kinds.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and _off_host(args[0]):
            self.kinds["read"] += 1
            if args[0].is_meta:
                return True if args[0].dtype == torch.bool else 1.0 if args[0].is_floating_point() else 0
        if func is aten._to_copy.default:
            src, to = args[0], torch.device(kwargs.get("device") or args[0].device)
            if _off_host(src) and to.type == "cpu":
                self.kinds["copy to host"] += 1
                if src.is_meta:
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
            elif src.device.type == "cpu" and to.type != "cpu" and src.dim() and not kwargs.get("non_blocking"):
                self.kinds["blocking copy to device"] += 1
        if func is aten.copy_.default and _off_host(args[1]) and args[0].device.type == "cpu":
            self.kinds["copy to host"] += 1
            return args[0]
        if func is aten.nonzero.default and _off_host(args[0]):
            self.kinds["nonzero"] += 1
            return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
        if func in (aten.index.Tensor, aten.index_put_.default, aten.index_put.default):
            indices = list(args[1])
            if any(i is not None and i.dtype == torch.bool and _off_host(i) for i in indices):
                self.kinds["boolean mask"] += 1
                indices = [torch.empty(0, dtype=torch.long, device=i.device) if i is not None and i.dtype == torch.bool
                           else i for i in indices]
                return func(args[0], indices, *args[2:], **kwargs)
        return func(*args, **kwargs)


def meta_dit(condition="none", num_classes=3, **kw) -> DiT:
    extra = {"none": {}, "inpaint": dict(condition="inpaint", cond_channels=5),
             "semantic": dict(condition="semantic", cond_channels=3, semantic_classes=5, cond_stages=1)}[condition]
    cfg = DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=num_classes,
                    time_scale=1.0, **extra, **kw)
    with torch.device("meta"):
        return DiT(cfg).eval()


def meta_condition(model: DiT, n: int):
    c = model.config
    return None if c.condition == "none" else torch.zeros((n, *c.cond_shape), device=META)


@pytest.mark.parametrize("solver", FIXED)
@pytest.mark.parametrize("condition", ["none", "inpaint", "semantic"])
def test_fixed_step_sampling_runs_on_the_device_with_no_host_sync(solver, condition):
    """Every fixed-step and multistep solver, with CFG on a guidance interval, on a uniform and a calibrated grid,
    for the three tasks: no tensor from the host, nothing read back."""
    from lfm_fast.sampling import sample

    model = meta_dit(condition)
    noise, y = torch.zeros(3, 4, 8, 8, device=META), torch.zeros(3, dtype=torch.long, device=META)
    times = (1.0, 0.7, 0.35, 0.0)
    with HostSyncs() as syncs:
        for grid in ("uniform", "calibrated"):
            out = sample(model, noise, y, solver, 3, cfg=2.0, cond=meta_condition(model, 3), grid=grid, times=times,
                         cfg_interval=(0.2, 0.8))
    assert out.latents.device == META and out.latents.shape == noise.shape
    assert syncs.total == 0, syncs.kinds


@pytest.mark.parametrize("solver", ADAPTIVE)
def test_adaptive_solvers_run_on_the_device_reading_only_their_step_decisions(solver):
    """Each image's accept / finish decisions are read every step (per-image step sizes need them): the kinds are
    reads, nonzero and boolean masks, never a copy of a tensor to the host."""
    from lfm_fast.sampling import sample

    model = meta_dit()
    with HostSyncs() as syncs:
        out = sample(model, torch.zeros(2, 4, 8, 8, device=META), torch.zeros(2, dtype=torch.long, device=META), solver,
                     cfg=2.0, cfg_interval=(0.2, 0.8))
    assert out.latents.device == META
    assert set(syncs.kinds) <= {"read", "nonzero", "boolean mask", "copy to host"} and syncs.kinds["read"] > 0
    assert syncs.kinds["copy to host"] <= out.nfe  # the per-image NFE count: one small index copy per evaluation


def test_the_export_sampler_runs_on_the_device_with_no_host_sync():
    from lfm_fast.export.sampler import UnrolledSampler
    from lfm_fast.sampling import SampleConfig

    model = meta_dit("inpaint")
    for solver in ("heun", "dpm++2m"):
        sampler = UnrolledSampler(model, SampleConfig(solver=solver, steps=3, cfg=1.5, cfg_lo=0.1, cfg_hi=0.9))
        with HostSyncs() as syncs, torch.no_grad():
            out = sampler(torch.zeros(2, 4, 8, 8, device=META), torch.zeros(2, dtype=torch.long, device=META),
                          meta_condition(model, 2))
        assert out.device == META and syncs.total == 0, syncs.kinds


def test_calibrations_unrolled_solver_fits_on_the_device():
    """The grid being fitted lives on the batch's device: its solve and the gradient to the grid touch no host tensor;
    each solve reads the grid once (its times decide where guidance applies)."""
    from lfm_fast.calibrate import grid_from_logits, rel_error
    from lfm_fast.sampling import Field
    from lfm_fast.solvers import integrate_fixed

    model = meta_dit().requires_grad_(False)
    noise, y = torch.zeros(2, 4, 8, 8, device=META), torch.zeros(2, dtype=torch.long, device=META)
    logits = torch.zeros(4, dtype=torch.float64, device=META, requires_grad=True)
    with HostSyncs() as syncs:
        for solver in ("ab3", "heun", "dpm++2m"):
            times = grid_from_logits(logits)
            rel_error(integrate_fixed(Field(model, 2, y, None, 2.0, (0.1, 0.9)), noise, times, solver), noise).backward()
    assert times.shape == (5,) and logits.grad.device == META
    assert syncs.kinds == {"copy to host": 3}, syncs.kinds


def test_generate_and_the_training_previews_copy_one_batch_to_the_host_at_a_time():
    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.generate import generate_latents
    from lfm_fast.sampling import SampleConfig
    from lfm_fast.train.monitor import draw_preview

    model = meta_dit()
    with HostSyncs() as syncs:
        lat, nfe = generate_latents(model, torch.arange(5) % 3, list(range(5)), SampleConfig(solver="heun", steps=2, cfg=2.0),
                                    batch_size=2, progress=False)
    assert lat.shape == (5, 4, 8, 8) and nfe.per_batch == 4
    assert syncs.kinds == {"copy to host": 3}  # the three batches' latents, nothing else
    ae = load_autoencoder("builtin:shapes", device=META)
    net = DiT.from_state_dict(model.config, {k: torch.zeros(v.shape) for k, v in model.state_dict().items()})  # on the host,
    with HostSyncs() as syncs:  # as the EMA weights gathered to rank 0 are
        images = draw_preview(net, ae, torch.arange(8) % 3, None, SampleConfig(solver="dopri5", cfg=2.0), META)
    assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
    # the weights go to the device once, the latents and the images come back once (previews use fixed steps)
    assert syncs.kinds == {"blocking copy to device": len(net.state_dict()), "copy to host": 2}, syncs.kinds


def test_the_pipeline_samples_on_the_device(tmp_path):
    from lfm_fast import LFMPipeline
    from tests.conftest import perturbed

    cpu = perturbed(DiT(DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=3)))
    cpu.save_pretrained(str(tmp_path / "dit"), meta={"autoencoder": "builtin:shapes"})
    pipe = LFMPipeline.from_pretrained(str(tmp_path / "dit"), device=META)
    assert pipe.model.x_embedder.weight.device == META
    with HostSyncs() as syncs:
        out = pipe(class_labels=[0, 2], num_inference_steps=3, guidance_scale=2.0, solver="ab3", seed=0, output_type="np")
    assert out.images.shape == (2, 32, 32, 3) and syncs.kinds == {"copy to host": 2}, syncs.kinds


def test_prepares_encoder_runs_on_the_device():
    """`prepare`'s batch: images and their masked copies encoded on the device; each result comes back once."""
    from lfm_fast.autoencoder import load_autoencoder
    from lfm_fast.data.prepare import Item, _Encoder

    ae = load_autoencoder("builtin:shapes", device=META)
    good = [Item(i, torch.zeros(32, 32, 3, dtype=torch.uint8), i % 3, None, None) for i in range(3)]
    parts = {}
    with HostSyncs() as syncs:
        _Encoder(ae, flip=True, inpaint_masks=2, hole_range=(0.2, 0.5), seed=0, size=32, f=4, batch_size=4).encode(parts, good)
    assert parts["latents"][0].shape == (3, 4, 8, 8) and parts["masked_latents"][0].shape == (3, 2, 4, 8, 8)
    assert set(syncs.kinds) == {"copy to host"} and syncs.kinds["blocking copy to device"] == 0, syncs.kinds


@pytest.fixture
def fused_adamw_on_meta(monkeypatch):
    """Fused AdamW has a meta kernel; only its device allow-list leaves meta out."""
    import torch.optim.optimizer as optimizer
    import torch.utils._foreach_utils as foreach

    devices = ["meta", *foreach._get_fused_kernels_supported_devices()]
    monkeypatch.setattr(optimizer, "_get_fused_kernels_supported_devices", lambda: devices)
    monkeypatch.setattr(foreach, "_get_fused_kernels_supported_devices", lambda: devices)


@pytest.mark.parametrize("condition", ["none", "inpaint", "semantic"])
def test_the_training_step_runs_on_the_device_with_no_host_sync(condition, tmp_path, fused_adamw_on_meta):
    """Data and draws copied without blocking, forward, backward, clipping, fused AdamW with its non-finite skip, the
    EMA and the non-finite counters: zero host syncs a step. Logging reads twice per interval (the interval's means,
    the divergence check), a checkpoint's finiteness check once."""
    from lfm_fast.config import get_preset
    from lfm_fast.data.latents import LatentShardDataset
    from lfm_fast.train.ema import create_ema
    from lfm_fast.train.step import (NonfiniteSteps, all_finite, configure_model_for_data, interval_means, make_optimizer,
                                     micro_batches, optimizer_step)
    from tests.conftest import write_random_latents

    write_random_latents(tmp_path / "latents", n=16, shape=(4, 8, 8), conditions=True)
    ds = LatentShardDataset(str(tmp_path / "latents"))
    cfg = get_preset("small-data")
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads, cfg.model.condition = 32, 2, 2, condition
    cfg.model.cond_channels = 3 if condition == "semantic" else 0  # the rescaler's width (inpaint: set from the data)
    cfg.train.batch_size, cfg.train.grad_accum = 8, 2
    configure_model_for_data(cfg, ds)
    with torch.device("meta"):
        model = DiT(cfg.model).train()
    ema, optimizer = create_ema(model), make_optimizer(model, cfg.train)
    health = NonfiniteSteps(META, 0, cfg.train.max_nonfinite_steps)
    losses = []
    with HostSyncs() as syncs:
        for step in range(2):
            batches = micro_batches(ds, cfg, step, list(range(8)), 0, 4, META)
            loss, grad_norm = optimizer_step(model, optimizer, ema, batches, cfg, step, health)
            losses.append(loss)
    assert len(batches) == 2 and batches[0].x0.device == META and loss.device == META
    assert optimizer.state[model.x_embedder.weight]["exp_avg"].device == META
    assert syncs.total == 0, syncs.kinds
    with HostSyncs() as syncs:
        interval_means(losses, grad_norm, health)
        health.check()
    assert syncs.kinds == {"copy to host": 1, "read": 1}
    with HostSyncs() as syncs:
        assert all_finite(model.parameters())
    assert syncs.kinds == {"read": 1}


def test_to_device_pins_and_copies_without_blocking_on_cuda(monkeypatch):
    """The one way host tensors reach the device: pinned memory, then a non-blocking copy (from pageable memory, CUDA
    first waits for the stream). Checked with a stand-in for the CUDA copy (no CUDA here)."""
    from lfm_fast.dist import to_device

    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    real_to = torch.Tensor.to
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k.get("non_blocking"))) or
                        real_to(self, "cpu"))
    to_device(torch.zeros(2), torch.device("cuda", 1))
    assert calls == ["pin", ("cuda:1", True)]
    calls.clear()
    to_device(torch.zeros(2), META)
    assert calls == [("meta", True)]


def test_block_0_gets_a_contiguous_input_like_every_block():
    """The patch embedding's transpose must not reach block 0 (a second compiled graph, copies in the fused ops)."""
    model = DiT(DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2))
    seen = []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda m, args: seen.append(args[0].is_contiguous()))
    model(torch.randn(2, 4, 8, 8), torch.rand(2))
    assert seen == [True, True]


def test_sampling_dtype_is_bf16_on_cuda_with_an_fp32_per_sample_path(tmp_path):
    """auto: bf16 on CUDA, fp32 on the CPU; below fp32 the token path alone is cast (as in exported graphs)."""
    from lfm_fast import LFMPipeline
    from lfm_fast.generate import inference_dtype, inference_model

    assert inference_dtype("auto", "cuda") is torch.bfloat16 and inference_dtype("auto", "cpu") is torch.float32
    assert inference_dtype(None, torch.device("cuda", 1)) is torch.bfloat16 and inference_dtype("fp16", "cpu") is torch.float16
    for bad in (torch.int8, torch.float64, "int8"):
        with pytest.raises(InputError, match="expected one of auto, fp32, bf16, fp16"):
            inference_dtype(bad, "cpu")
    model = inference_model(meta_dit(), META, "bf16")
    assert model.blocks[0].attn.qkv.weight.dtype == torch.bfloat16
    assert model.t_embedder.mlp[0].weight.dtype == model.blocks[0].adaLN_modulation[1].weight.dtype == torch.float32
    DiT(DiTConfig(input_size=8, in_channels=4, hidden_size=32, depth=2, num_heads=2)).save_pretrained(
        str(tmp_path / "dit"), meta={"autoencoder": "builtin:shapes"})
    pipe = LFMPipeline.from_pretrained(str(tmp_path / "dit"), device="cpu", dtype=torch.bfloat16)
    assert pipe.model.x_embedder.weight.dtype == torch.bfloat16 and pipe.model.y_embedder is None
    assert pipe.model.t_embedder.mlp[2].weight.dtype == torch.float32


def test_auto_backends_follow_the_gpu_measurements(monkeypatch):
    """On CUDA tensors (stand-ins: the decisions read the device and dtype only) `auto` attention is SDPA at every dtype
    (the Triton kernel only by name), and `auto` norms are the Triton kernels in eager but the PyTorch expression while
    torch.compile traces (inductor fuses it: 1.86x the Triton ops' training step on an H200, bench/REPORT.md)."""
    from types import SimpleNamespace

    from lfm_fast import ops

    cuda = lambda dtype: SimpleNamespace(is_cuda=True, dtype=dtype)  # noqa: E731
    dtypes = (torch.bfloat16, torch.float16, torch.float32)
    assert [ops._use_triton_attention("auto", cuda(dt)) for dt in dtypes] == [False] * 3
    assert all(ops._use_triton_attention("triton", cuda(dt)) for dt in dtypes)  # asked for by name, it runs
    assert not ops._use_triton_attention("auto", torch.zeros(1, dtype=torch.bfloat16))  # on the CPU
    monkeypatch.setattr(ops, "triton_available", lambda: True)  # the CPU machines may lack triton
    assert ops._use_triton("auto", cuda(torch.bfloat16)) and not ops._use_triton("auto", torch.zeros(1))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not ops._use_triton("auto", cuda(torch.bfloat16)) and ops._use_triton("triton", cuda(torch.bfloat16))


def test_sample_dtype_flag(tiny_pipeline, tmp_path, capsys):
    """--dtype bf16 samples with the bf16 token path (close to fp32, not equal); graphs keep their exported dtype."""
    from lfm_fast.cli import main

    common = ["sample", "--ckpt", str(tiny_pipeline / "dit"), "--num", "4", "--solver", "heun", "--ode-steps", "3", "--seed", "1"]
    assert main(common + ["--out", str(tmp_path / "a")]) == 0
    assert main(common + ["--dtype", "bf16", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / n / "samples.npz")["arr_0"].astype(int) for n in ("a", "b"))
    assert 0 < np.abs(a - b).max() and np.abs(a - b).mean() < 8
    capsys.readouterr()
    assert main(common + ["--dtype", "bf16", "--backend", "onnxruntime", "--engine", "x.onnx", "--out", str(tmp_path / "c")]) == 2
    assert "--dtype bf16: a graph runs in the dtype it was exported in" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "c")
