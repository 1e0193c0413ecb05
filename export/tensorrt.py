"""TensorRT: build an engine from an exported graph (sampler or velocity) and run it on torch CUDA tensors.

Written against the TensorRT 10 and 11 Python APIs. Networks are strongly typed (TensorRT 11 knows no other
kind, and 10.12 deprecated the FP16/BF16 builder flags): precision is the ONNX graph's own, an fp16 or bf16
network with an fp32 ODE state, so one code path serves both. Every call that reports failure by its return
value is checked (`_check`) and fails with a line naming it. Beside each engine, `<engine>.json` records what
it was built from and for: the graph's metadata, the ONNX file's sha256, the batch range of its profile, the
TensorRT version and the GPU, which `TensorRTRunner` checks before it runs. Engines are cached by (ONNX sha256,
TensorRT version, GPU, profile) under $LFM_FAST_CACHE (default ~/.cache/lfm-fast)/engines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from lfm_fast.errors import InputError
from lfm_fast.export.onnx import GraphMeta, file_digest, read_metadata
from lfm_fast import fileio
from lfm_fast.fileio import atomic_path, write_json


def require_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError("TensorRT is not installed: pip install 'lfm-fast[tensorrt]' (needs an NVIDIA GPU)") from None
    if not torch.cuda.is_available():
        raise InputError("TensorRT needs a CUDA GPU; none is visible")
    return trt


def gpu_info() -> dict:
    p = torch.cuda.get_device_properties(torch.cuda.current_device())
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


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


def _check(ok, call: str):
    """TensorRT reports many failures by a False / None / negative return, not an exception."""
    if ok is None or ok is False or (isinstance(ok, int) and not isinstance(ok, bool) and ok < 0):
        raise RuntimeError(f"TensorRT: {call} failed (see TensorRT's log above)")
    return ok


def engine_key(onnx_sha256: str, batch_range, trt_version: str, gpu: dict) -> str:
    text = json.dumps([onnx_sha256, list(batch_range), trt_version, gpu["gpu"], gpu["compute_capability"]])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def build_engine(onnx_path: str, engine_path: str, batch_range: tuple[int, int, int] = (1, 16, 64),
                 workspace_gib: float | None = None, cache_dir: str | None = None) -> dict:
    """Build (or take from the cache) the engine of `onnx_path` for a batch (sampler graphs: images; velocity graphs:
    network rows, two per image under CFG) in `batch_range`; write it and `<engine>.json`. Returns the latter."""
    trt = require_tensorrt()
    meta = read_metadata(onnx_path)
    record = {"onnx": meta.props(), "onnx_sha256": file_digest(onnx_path), "batch_range": list(batch_range),
              "tensorrt_version": trt.__version__, **gpu_info()}
    cache_dir = cache_dir or fileio.cache_dir("engines")
    key = engine_key(record["onnx_sha256"], batch_range, record["tensorrt_version"], record)
    cached = os.path.join(cache_dir, f"{key}.plan")
    timing_path = os.path.join(cache_dir, f"timing-{key[:8]}-{trt.__version__}.cache")
    if not os.path.isfile(cached):
        logger = trt.Logger(trt.Logger.WARNING)
        builder = _check(trt.Builder(logger), "Builder()")
        # TensorRT 11 networks are strongly typed by default and its flag enum may no longer name it
        strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
        flags = 0 if strongly_typed is None else 1 << int(strongly_typed)
        network = _check(builder.create_network(flags), "create_network")
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(onnx_path):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise InputError(f"TensorRT cannot parse {onnx_path}: {errors[:300]}")
        config = _check(builder.create_builder_config(), "create_builder_config")
        if workspace_gib:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * 2**30))
        profile = builder.create_optimization_profile()
        lo, opt, hi = batch_range
        for i in range(network.num_inputs):
            tensor = network.get_input(i)
            rest = tuple(tensor.shape)[1:]
            profile.set_shape(tensor.name, (lo, *rest), (opt, *rest), (hi, *rest))
        _check(config.add_optimization_profile(profile), "add_optimization_profile")
        timing = b""
        if os.path.isfile(timing_path):
            with open(timing_path, "rb") as f:
                timing = f.read()
        _check(config.set_timing_cache(_check(config.create_timing_cache(timing), "create_timing_cache"), False),
               "set_timing_cache (a timing cache from another GPU or TensorRT version?)")
        serialized = _check(builder.build_serialized_network(network, config), f"build_serialized_network of {onnx_path}")
        with atomic_path(cached) as tmp, open(tmp, "wb") as f:
            f.write(serialized)
        with atomic_path(timing_path) as tmp, open(tmp, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    with atomic_path(engine_path) as tmp:
        shutil.copyfile(cached, tmp)
    write_json(engine_path + ".json", record)
    return record


def read_engine_record(engine_path: str) -> dict:
    """`<engine>.json`, checked against this machine's TensorRT and GPU (one line if it was built for others)."""
    side = engine_path + ".json"
    if not os.path.isfile(engine_path):
        raise InputError(f"--engine {engine_path}: no such file")
    if not os.path.isfile(side):
        raise InputError(f"--engine {engine_path}: no {side} beside it (written by `lfm-fast export --format tensorrt`)")
    with open(side) as f:
        record = json.load(f)
    return record


class TensorRTRunner:
    """Runs a serialized engine on torch CUDA tensors: `run(feeds) → output`, enqueued on the runner's own stream
    ordered after the caller's (and the caller's after it). With `cuda_graph`, one CUDA graph per input shape over
    static input and output buffers; every call returns a copy of the output (a later replay overwrites the buffer)."""

    def __init__(self, engine_path: str, cuda_graph: bool = False, device: str | None = None):
        trt = require_tensorrt()
        self.record = read_engine_record(engine_path)
        self.meta = GraphMeta.from_props(self.record["onnx"])
        here = {"tensorrt_version": trt.__version__, **gpu_info()}
        for key, value in here.items():
            if self.record.get(key) != value:
                raise InputError(f"--engine {engine_path} was built for {key.replace('_', ' ')} {self.record.get(key)}, this "
                                 f"machine has {value}: export it again here")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.logger = trt.Logger(trt.Logger.WARNING)
        with open(engine_path, "rb") as f:
            self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(f.read())
        if self.engine is None:
            raise InputError(f"--engine {engine_path}: TensorRT {trt.__version__} cannot load it on this GPU")
        self.context = _check(self.engine.create_execution_context(), "create_execution_context")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.output = next(n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT)
        self._dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                        trt.DataType.BF16: torch.bfloat16, trt.DataType.INT64: torch.int64,
                        trt.DataType.INT32: torch.int32, trt.DataType.UINT8: torch.uint8}
        self.batch_range = tuple(self.record["batch_range"])
        self.cuda_graph = cuda_graph
        self._stream = None
        self._graphs: dict[tuple, tuple] = {}

    @property
    def stream(self):
        """The runner's own CUDA stream (made on first use; none for a runner off CUDA, as in the CPU tests)."""
        if self._stream is None and self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    def check_batch(self, rows: int, what: str = "--batch-size"):
        lo, _, hi = self.batch_range
        if not lo <= rows <= hi:
            raise InputError(f"{what}: a batch of {rows} rows, outside the engine's profile {lo}..{hi} "
                             f"(export it again with --batch-range)")

    def _feeds(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.inputs:
            if feeds.get(name) is None:
                raise InputError(f"this engine needs a {name!r} input")
            out[name] = feeds[name].to(self.device, self._dtypes[self.engine.get_tensor_dtype(name)]).contiguous()
        self.check_batch(next(iter(out.values())).shape[0], "batch")
        return out

    def _bind(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        for name, t in feeds.items():
            _check(self.context.set_input_shape(name, tuple(t.shape)), f"set_input_shape({name}, {tuple(t.shape)})")
            _check(self.context.set_tensor_address(name, t.data_ptr()), f"set_tensor_address({name})")
        shape = tuple(self.context.get_tensor_shape(self.output))
        if any(d < 0 for d in shape):
            raise RuntimeError(f"TensorRT: the output shape {shape} is not determined by the input shapes")
        out = torch.empty(shape, device=self.device, dtype=self._dtypes[self.engine.get_tensor_dtype(self.output)])
        _check(self.context.set_tensor_address(self.output, out.data_ptr()), f"set_tensor_address({self.output})")
        return out

    def _enqueue(self):
        _check(self.context.execute_async_v3(0 if self.stream is None else self.stream.cuda_stream), "execute_async_v3")

    def run(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = self._feeds(feeds)
        if self.stream is None:  # a runner without a CUDA device (tests): enqueue and return
            out = self._bind(feeds)
            self._enqueue()
            return out
        caller = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(caller)  # the inputs were made on the caller's stream
        if self.cuda_graph:
            static = self._replay(feeds)
        else:
            out = self._bind(feeds)  # allocated on the caller's stream, written on the runner's
            self._enqueue()
            out.record_stream(self.stream)
        caller.wait_stream(self.stream)
        for t in feeds.values():
            t.record_stream(self.stream)  # not handed out again by the allocator before the runner's stream is done
        # the static output is overwritten by the next replay, which waits for this copy on the caller's stream
        return static.clone() if self.cuda_graph else out

    def _replay(self, feeds: dict[str, torch.Tensor]) -> torch.Tensor:
        """A CUDA graph per input shape (batch-1 latency), captured once over static buffers, refilled per call;
        returns the static output buffer."""
        key = tuple((n, tuple(t.shape)) for n, t in feeds.items())
        with torch.cuda.stream(self.stream):
            if key not in self._graphs:
                static = {n: t.clone() for n, t in feeds.items()}
                out = self._bind(static)
                self._enqueue()  # warm-up outside the capture (TensorRT allocates on its first run)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=self.stream):
                    self._enqueue()
                self._graphs[key] = (graph, static, out)
            graph, static, out = self._graphs[key]
            for n, t in feeds.items():
                static[n].copy_(t)
            graph.replay()
        return out


class TensorRTSampler(TensorRTRunner):
    """A sampler engine: (noise, labels[, cond]) → latents or uint8 images."""

    def __call__(self, noise: torch.Tensor, labels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.run({"noise": noise, "labels": labels, "cond": condition})
