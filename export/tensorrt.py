"""TensorRT: build an engine from an exported sampler graph and run it on torch CUDA tensors.

Written against the TensorRT 10 Python API (OnnxParser, IBuilderConfig with an optimization profile
over the batch and a timing cache, build_serialized_network, IExecutionContext.execute_async_v3 with
tensor addresses). Needs `tensorrt` and a CUDA GPU; its tests are marked `gpu` and skip elsewhere.
"""

from __future__ import annotations

import os

import torch

from lfm_fast.errors import InputError
from lfm_fast.export.onnx import read_metadata
from lfm_fast.fileio import atomic_path


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError("TensorRT is not installed: pip install 'lfm-fast[tensorrt]' (needs an NVIDIA GPU)") from None
    if not torch.cuda.is_available():
        raise InputError("TensorRT needs a CUDA GPU; none is visible")
    return trt


def parse_batch_range(text: str) -> tuple[int, int, int]:
    """'1:64' → (min 1, opt 64, max 64); '1:8:64' → (1, 8, 64)."""
    try:
        parts = [int(p) for p in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) == 2:
        parts = [parts[0], parts[1], parts[1]]
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise InputError(f"--batch-range {text!r}: expected MIN:MAX or MIN:OPT:MAX with 1 ≤ MIN ≤ OPT ≤ MAX")
    return tuple(parts)


def build_engine(onnx_path: str, engine_path: str, fp16: bool = True, bf16: bool = False,
                 batch_range: tuple[int, int, int] = (1, 16, 64), timing_cache: str | None = None,
                 workspace_gib: float = 8.0) -> str:
    trt = require_tensorrt()
    read_metadata(onnx_path)  # a clear error for files that are not our graphs
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise InputError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    if bf16:
        config.set_flag(trt.BuilderFlag.BF16)
    profile = builder.create_optimization_profile()
    lo, opt, hi = batch_range
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
    config.add_optimization_profile(profile)
    cache_bytes = open(timing_cache, "rb").read() if timing_cache and os.path.isfile(timing_cache) else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    with atomic_path(engine_path) as tmp, open(tmp, "wb") as f:
        f.write(serialized)
    if timing_cache:
        with atomic_path(timing_cache) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    return engine_path


class TensorRTSampler:
    """Runs a serialized engine on torch CUDA tensors (execute_async_v3 on the current stream)."""

    def __init__(self, engine_path: str, cuda_graph: bool = False):
        trt = require_tensorrt()
        if not os.path.isfile(engine_path):
            raise InputError(f"--engine {engine_path}: no such file")
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise InputError(f"--engine {engine_path}: not a TensorRT engine for this TensorRT version and GPU")
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64,
                        trt.DataType.INT32: torch.int32, trt.DataType.UINT8: torch.uint8}
        self.cuda_graph = cuda_graph
        self._graphs: dict[tuple, tuple] = {}

    def _bind(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name in self.inputs:
            t = feeds[name]
            self.context.set_input_shape(name, tuple(t.shape))
            self.context.set_tensor_address(name, t.data_ptr())
        name = self.outputs[0]
        out = torch.empty(tuple(self.context.get_tensor_shape(name)), device="cuda",
                          dtype=self._dtypes[self.engine.get_tensor_dtype(name)])
        self.context.set_tensor_address(name, out.data_ptr())
        return out

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        want = self._dtypes[self.engine.get_tensor_dtype("noise")]
        feeds = {"noise": noise.to("cuda", want).contiguous(), "labels": labels.to("cuda", torch.int64).contiguous()}
        if "cond" in self.inputs:
            if condition is None:
                raise InputError("this engine needs a condition input")
            feeds["cond"] = condition.to("cuda", want).contiguous()
        if not self.cuda_graph:
            out = self._bind(feeds)
            self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
            return out
        # CUDA graph per input shape (batch-1 latency): static buffers captured once, refilled per call
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        if key not in self._graphs:
            static = {n: t.clone() for n, t in feeds.items()}
            out = self._bind(static)
            stream = torch.cuda.Stream()
            with torch.cuda.stream(stream):
                self.context.execute_async_v3(stream.cuda_stream)  # warm-up outside capture
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    self.context.execute_async_v3(stream.cuda_stream)
            self._graphs[key] = (graph, static, out)
        graph, static, out = self._graphs[key]
        for n, t in feeds.items():
            static[n].copy_(t)
        graph.replay()
        return out
