"""Run an exported graph with ONNX Runtime: CPU, CUDA (IO binding on the device) or TensorRT (engine cache, fp16,
explicit profile shapes), on torch tensors.

`OrtGraph` binds inputs and a preallocated output by pointer, on the CPU or on the GPU, so results stay
where the session computed them. `OrtSampler` runs a sampler graph; `velocity_net` wraps a velocity graph
as a `GraphNet` that the solvers of `lfm_fast.sampling` drive (any steps, solver, grid and CFG scale).
"""

from __future__ import annotations

import os

import numpy as np
import torch

from lfm_fast import fileio
from lfm_fast.errors import InputError
from lfm_fast.export.onnx import GraphMeta, read_metadata
from lfm_fast.export.sampler import GraphNet

_TYPES = {"tensor(float)": (np.float32, torch.float32), "tensor(float16)": (np.float16, torch.float16),
          "tensor(int64)": (np.int64, torch.int64), "tensor(uint8)": (np.uint8, torch.uint8)}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_threads() -> int:
    """Intra-op threads: the cores shared out among the local ranks (ONNX Runtime's 0 gives each rank all of them)."""
    return max(1, (os.cpu_count() or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))


def device_index() -> int:
    """The GPU of this rank: the sessions' providers run there and `OrtGraph` binds its buffers there."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def provider_options(meta: GraphMeta, providers: list[str], batch_range=(1, 16, 64), cache_dir: str | None = None) -> list:
    """ONNX Runtime providers with their options. TensorRT: an engine cache (so a process reuses the engine an
    earlier one built), fp16 kernels for an fp16 graph, and explicit profile shapes over `batch_range` for every
    input (no rebuild when the batch changes); CUDA: the device of this rank."""
    device = device_index()
    out = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            shapes = [[f"{name}:{'x'.join(str(d) for d in (b, *rest))}" for name, rest in meta.input_shapes()] for b in batch_range]
            out.append((p, {"device_id": device, "trt_engine_cache_enable": True, "trt_timing_cache_enable": True,
                            "trt_engine_cache_path": cache_dir or fileio.cache_dir("ort-trt"),
                            "trt_fp16_enable": meta.dtype == "float16",
                            "trt_profile_min_shapes": ",".join(shapes[0]), "trt_profile_opt_shapes": ",".join(shapes[1]),
                            "trt_profile_max_shapes": ",".join(shapes[2])}))
        elif p == "CUDAExecutionProvider":
            out.append((p, {"device_id": device}))
        else:
            out.append(p)
    return out


class OrtGraph:
    """An ONNX Runtime session of an exported graph, run on torch tensors by IO binding (inputs and output by pointer,
    on `device`: "cpu", or this rank's GPU with the CUDA / TensorRT providers). With the TensorRT provider, every
    batch must lie in the profile `batch_range` (`check_batch`)."""

    def __init__(self, path: str, providers: list[str] | None = None, threads: int | None = None,
                 batch_range=(1, 16, 64)):
        import onnxruntime as ort

        self.meta = read_metadata(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = default_threads() if threads is None else threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if providers is None:
            preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
            providers = [p for p in preferred if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(path, so, providers=provider_options(self.meta, providers, batch_range))
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            hint = ("; a bf16 graph needs a runtime with bf16 kernels (TensorRT): export --fp16 for ONNX Runtime"
                    if self.meta.dtype == "bfloat16" else "")
            raise InputError(f"--engine {path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]}){hint}") from None
        used = self.session.get_providers()
        self.device = torch.device("cpu") if used[0] == "CPUExecutionProvider" else torch.device("cuda", device_index())
        # TensorRT's engine has a fixed profile; the CUDA and CPU providers take any batch
        self.batch_range = tuple(batch_range) if "TensorrtExecutionProvider" in used else None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        out = self.session.get_outputs()[0]
        self.output, self.out_dtype = out.name, _TYPES[out.type][1]
        self.out_shape = self.meta.output_shape

    def check_batch(self, rows: int, what: str = "--batch-size"):
        if self.batch_range is None:
            return
        lo, _, hi = self.batch_range
        if not lo <= rows <= hi:
            raise InputError(f"{what}: a batch of {rows} rows, outside the ONNX Runtime TensorRT provider's profile "
                             f"{lo}..{hi} (sample in smaller batches)")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name in self.inputs:
            if feeds.get(name) is None:
                raise InputError(f"this graph needs a {name!r} input")
        self.check_batch(feeds[next(iter(self.inputs))].shape[0], "batch")  # before anything reaches the device
        binding = self.session.io_binding()
        kind, index = self.device.type, self.device.index or 0
        keep = []
        for name, arg in self.inputs.items():
            want = _TYPES[arg.type]
            value = feeds[name].to(self.device, want[1]).contiguous()
            expected = tuple(arg.shape[1:])
            if tuple(value.shape[1:]) != expected:
                raise InputError(f"{name} of shape {tuple(value.shape)} does not fit the graph's (B, {', '.join(map(str, expected))})")
            keep.append(value)
            binding.bind_input(name, kind, index, want[0], tuple(value.shape), value.data_ptr())
        out = torch.empty((keep[0].shape[0], *self.out_shape), dtype=self.out_dtype, device=self.device)
        binding.bind_output(self.output, kind, index, _np_dtype(self.out_dtype), tuple(out.shape), out.data_ptr())
        self.session.run_with_iobinding(binding)
        return out


def _np_dtype(dtype: torch.dtype):
    return next(v[0] for v in _TYPES.values() if v[1] == dtype)


class OrtSampler(OrtGraph):
    """A sampler graph: (noise, labels[, cond]) → latents or uint8 images."""

    @property
    def nfe(self) -> int:
        return self.meta.nfe

    def __call__(self, noise, labels, condition=None) -> torch.Tensor:
        if self.meta.graph == "velocity":
            raise InputError("a velocity graph is one network evaluation: drive it with velocity_net(), not as a sampler")
        return self.run({"noise": torch.as_tensor(noise), "labels": torch.as_tensor(labels),
                         **({} if "cond" not in self.inputs else {"cond": None if condition is None else torch.as_tensor(condition)})})


def velocity_net(runner, config) -> GraphNet:
    """A velocity graph (ONNX Runtime or TensorRT runner) as a network the solvers drive: fp32 in and out."""
    def velocity(x, t, labels, cond=None):
        feeds = {"x": x, "t": t, "labels": labels}
        if cond is not None:
            feeds["cond"] = cond
        return runner.run(feeds).to(x.device)

    return GraphNet(config, velocity, runner.device)
