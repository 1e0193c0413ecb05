"""Run an exported sampler graph with ONNX Runtime (CPU by default; CUDA / TensorRT providers when present).

IO binding keeps inputs and outputs in place: on CPU the numpy buffers are bound directly, on CUDA
the output stays on the device until copied once at the end.
"""

from __future__ import annotations

import numpy as np

from lfm_fast.errors import InputError
from lfm_fast.export.onnx import read_metadata


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


class OrtSampler:
    def __init__(self, path: str, providers: list[str] | None = None, intra_op_threads: int = 0, inter_op_threads: int = 0):
        import onnxruntime as ort

        self.meta = read_metadata(path)
        so = ort.SessionOptions()
        so.intra_op_num_threads = intra_op_threads  # 0 = ONNX Runtime's default (all cores)
        so.inter_op_num_threads = inter_op_threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if providers is None:
            preferred = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
            providers = [p for p in preferred if p in ort.get_available_providers()]
        try:
            self.session = ort.InferenceSession(path, so, providers=providers)
        except Exception as e:  # ORT raises its own exception types for invalid graphs
            raise InputError(f"--engine {path}: ONNX Runtime cannot load it ({str(e).splitlines()[0][:200]})") from None
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output = self.session.get_outputs()[0].name
        # the graph's own input type (its first input: the noise, or x in a velocity-only graph): fp32 state in graphs
        # of this version, the network's dtype in older fp16 ones
        first = self.session.get_inputs()[0]
        self.dtype = np.float16 if first.type == "tensor(float16)" else np.float32

    @property
    def nfe(self) -> int:
        return int(self.meta["nfe"])

    def __call__(self, noise, labels, condition=None) -> np.ndarray:
        feeds = {"noise": np.ascontiguousarray(np.asarray(noise, dtype=self.dtype)),
                 "labels": np.ascontiguousarray(np.asarray(labels, dtype=np.int64))}
        if "cond" in self.inputs:
            if condition is None:
                raise InputError("this graph needs a condition input")
            feeds["cond"] = np.ascontiguousarray(np.asarray(condition, dtype=self.dtype))
        expected = tuple(self.inputs["noise"].shape[1:])
        if tuple(feeds["noise"].shape[1:]) != expected:
            raise InputError(f"noise of shape {tuple(feeds['noise'].shape)} does not fit the graph's (B, {', '.join(map(str, expected))})")
        binding = self.session.io_binding()
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.bind_output(self.output)
        self.session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]
