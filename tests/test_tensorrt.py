"""The TensorRT path without a GPU: a stand-in `tensorrt` module that runs the engine's ONNX graph with ONNX Runtime
through the tensor addresses it is given, records every TensorRT name the code uses, and can fail any call the way
TensorRT does (a False / None return). The names are then checked against the real bindings of TensorRT 10 and 11.

`import tensorrt` cannot work here: the bindings wheel (tensorrt-cuXX-bindings, 1 MB) loads libnvinfer from
tensorrt-cuXX-libs, which on PyPI is a stub that downloads the libraries from pypi.nvidia.com at install time
(unreachable from these machines). The bindings' pybind11 module is still a file: every class, method, enum
member and property name it defines is a string in it, which is what the surface test reads.
"""

import ctypes
import glob
import json
import os
import re
import sys
import zipfile

import numpy as np
import pytest
import torch

from lfm_fast.cli import main
from lfm_fast.errors import InputError
from lfm_fast.export import tensorrt as trt_module
from lfm_fast.export.onnx import export_onnx
from lfm_fast.export.ort import OrtSampler
from lfm_fast.models.dit import DiT
from lfm_fast.sampling import SampleConfig, per_image_noise

import onnxruntime  # noqa: E402,F401 (a hard dependency of the export extra: a broken import fails)
USED: set[str] = set()


class Recorded:
    """Records the public attributes read from it: the TensorRT API surface the code uses."""

    def __getattribute__(self, name):
        if not name.startswith("_") and sys._getframe(1).f_globals.get("__name__") == trt_module.__name__:
            USED.add(name)  # read by lfm_fast.export.tensorrt, not by the stand-in itself
        return object.__getattribute__(self, name)


class Enum(Recorded):
    def __init__(self, **members):
        for k, v in members.items():
            object.__setattr__(self, k, v)


class Tensor(Recorded):
    def __init__(self, name, shape):
        self.name, self.shape = name, shape


class FakeTensorRT(Recorded):
    """The part of the `tensorrt` module that lfm_fast.export.tensorrt uses."""

    def __init__(self, version="10.13.0.35"):
        self.__version__ = version
        self.fail: set[str] = set()  # method names that report failure
        self.Logger = type("Logger", (Recorded,), {"WARNING": 2, "__init__": lambda s, level: None})
        self.NetworkDefinitionCreationFlag = Enum(STRONGLY_TYPED=1)
        self.MemoryPoolType = Enum(WORKSPACE=0)
        self.TensorIOMode = Enum(INPUT="in", OUTPUT="out")
        self.DataType = Enum(FLOAT=np.float32, HALF=np.float16, BF16="bf16", INT64=np.int64, INT32=np.int32, UINT8=np.uint8)
        fake = self

        class Network(Recorded):
            def __init__(self):
                self.inputs, self.path = [], None

            @property
            def num_inputs(self):
                return len(self.inputs)

            def get_input(self, i):
                return self.inputs[i]

        class OnnxParser(Recorded):
            def __init__(self, network, logger):
                self.network, self.num_errors = network, 0

            def parse_from_file(self, path):
                import onnx

                proto = onnx.load(path, load_external_data=False)
                self.network.path = path
                self.network.inputs = [Tensor(i.name, tuple(d.dim_value or -1 for d in i.type.tensor_type.shape.dim))
                                       for i in proto.graph.input]
                return "parse_from_file" not in fake.fail

            def get_error(self, i):
                return ""

        class Profile(Recorded):
            def __init__(self):
                self.shapes = {}

            def set_shape(self, name, lo, opt, hi):
                self.shapes[name] = (lo, opt, hi)

        class Cache(Recorded):
            def serialize(self):
                return b"timing"

        class Config(Recorded):
            def __init__(self):
                self.profiles = []

            def set_memory_pool_limit(self, pool, size):
                pass

            def add_optimization_profile(self, profile):
                self.profiles.append(profile)
                return -1 if "add_optimization_profile" in fake.fail else len(self.profiles) - 1

            def create_timing_cache(self, data):
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                return "set_timing_cache" not in fake.fail

            def get_timing_cache(self):
                return Cache()

        class Builder(Recorded):
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                # 1 << STRONGLY_TYPED (precision from the graph's types); no flags where the enum has no such member
                member = getattr(fake.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
                assert flags == (0 if member is None else 1 << member), flags
                return Network()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                if "build_serialized_network" in fake.fail:
                    return None
                lo, _, hi = (shape[0] for shape in config.profiles[0].shapes[network.inputs[0].name])
                with open(network.path, "rb") as f:  # the engine holds its network, as a real one does
                    return json.dumps({"onnx": f.read().hex(), "batch": [lo, hi]}).encode()

        class Context(Recorded):
            def __init__(self, engine):
                self.engine, self.shapes, self.addresses = engine, {}, {}

            def set_input_shape(self, name, shape):
                lo, hi = self.engine.spec["batch"]
                self.shapes[name] = tuple(shape)
                return "set_input_shape" not in fake.fail and lo <= shape[0] <= hi

            def set_tensor_address(self, name, ptr):
                self.addresses[name] = ptr
                return "set_tensor_address" not in fake.fail

            def get_tensor_shape(self, name):
                b = next(iter(self.shapes.values()))[0]
                return (b, *self.engine.meta.output_shape)

            def execute_async_v3(self, stream):
                """Read the inputs at their addresses, run the graph, write the output at its address."""
                feeds = {}
                for name in self.engine.names[:-1]:
                    dtype = np.dtype(self.engine.dtypes[name])
                    n = int(np.prod(self.shapes[name])) * dtype.itemsize
                    feeds[name] = torch.from_numpy(np.frombuffer((ctypes.c_byte * n).from_address(self.addresses[name]),
                                                                 dtype).reshape(self.shapes[name]).copy())
                out = self.engine.session.run(feeds).numpy()
                ctypes.memmove(self.addresses[self.engine.names[-1]], out.ctypes.data, out.nbytes)
                return "execute_async_v3" not in fake.fail

        class Engine(Recorded):
            def __init__(self, spec):
                import onnx

                self.spec = spec
                path = os.path.join(fake.folder, f"engine-{len(os.listdir(fake.folder))}.onnx")
                with open(path, "wb") as f:
                    f.write(bytes.fromhex(spec["onnx"]))
                self.session = OrtSampler(path, threads=1)
                self.meta = self.session.meta
                proto = onnx.load(path, load_external_data=False)
                kinds = {1: np.float32, 7: np.int64, 2: np.uint8, 10: np.float16}
                self.names = [i.name for i in proto.graph.input] + [proto.graph.output[0].name]
                self.dtypes = {v.name: kinds[v.type.tensor_type.elem_type] for v in list(proto.graph.input) + [proto.graph.output[0]]}

            @property
            def num_io_tensors(self):
                return len(self.names)

            def get_tensor_name(self, i):
                return self.names[i]

            def get_tensor_mode(self, name):
                return "out" if name == self.names[-1] else "in"

            def get_tensor_dtype(self, name):
                return self.dtypes[name]

            def create_execution_context(self):
                return Context(self)

        class Runtime(Recorded):
            def __init__(self, logger):
                pass

            def deserialize_cuda_engine(self, data):
                return Engine(json.loads(data))

        self.Builder, self.OnnxParser, self.Runtime = Builder, OnnxParser, Runtime


@pytest.fixture
def fake_trt(monkeypatch, tmp_path, tmp_path_factory):
    fake = FakeTensorRT()
    fake.folder = str(tmp_path_factory.mktemp("engines"))
    monkeypatch.setattr(trt_module, "require_tensorrt", lambda: fake)
    monkeypatch.setattr(trt_module, "gpu_info", lambda: {"gpu": "NVIDIA H200", "compute_capability": "9.0"})
    monkeypatch.setenv("LFM_FAST_CACHE", str(tmp_path / "cache"))
    return fake


@pytest.fixture(scope="module")
def graphs(tiny_pipeline, tmp_path_factory):
    """The tiny checkpoint's sampler and velocity graphs, exported once for the module."""
    model = DiT.from_pretrained(str(tiny_pipeline / "dit")).eval()
    folder = tmp_path_factory.mktemp("graphs")
    paths = {}
    for kind in ("sampler", "velocity"):
        paths[kind] = str(folder / f"{kind}.onnx")
        export_onnx(model, paths[kind], SampleConfig("heun", 2, 2.0), graph=kind)
    return model, paths


def graph(graphs, kind="sampler"):
    model, paths = graphs
    return model, paths[kind]


def inputs(b, model, shift=0.0):
    c = model.config
    return per_image_noise(list(range(b)), (c.in_channels, c.input_size, c.input_size)) + shift, torch.arange(b) % c.num_classes


def test_engine_runs_on_the_addresses_it_is_given_and_each_call_keeps_its_result(fake_trt, graphs, tmp_path):
    model, path = graph(graphs)
    record = trt_module.build_engine(path, str(tmp_path / "s.plan"), batch_range=(1, 4, 8))
    assert record["batch_range"] == [1, 4, 8] and record["tensorrt_version"] == "10.13.0.35"
    assert record["gpu"] == "NVIDIA H200" and record["onnx"]["graph"] == "sampler" and len(record["onnx_sha256"]) == 64
    assert json.loads((tmp_path / "s.plan.json").read_text()) == record
    runner = trt_module.TensorRTSampler(str(tmp_path / "s.plan"))
    ort = OrtSampler(path, threads=1)
    (n1, y1), (n2, y2) = inputs(3, model), inputs(5, model, 1.0)
    first = runner(n1, y1)
    second = runner(n2, y2)
    assert torch.equal(first, ort(n1, y1)) and torch.equal(second, ort(n2, y2))  # the first result not overwritten
    with pytest.raises(InputError, match=r"a batch of 9 rows, outside the engine's profile 1..8"):
        runner(*inputs(9, model))
    fake_trt.fail = {"build_serialized_network"}  # the same graph, TensorRT, GPU and profile: the cached engine
    trt_module.build_engine(path, str(tmp_path / "again.plan"), batch_range=(1, 4, 8))
    assert (tmp_path / "again.plan").read_bytes() == (tmp_path / "s.plan").read_bytes()


@pytest.mark.parametrize("call", ["parse_from_file", "add_optimization_profile", "set_timing_cache", "build_serialized_network",
                                  "set_input_shape", "set_tensor_address", "execute_async_v3"])
def test_every_failure_tensorrt_reports_by_its_return_value_is_one_line_naming_the_call(fake_trt, graphs, tmp_path, call):
    model, path = graph(graphs)
    building = call in ("parse_from_file", "add_optimization_profile", "set_timing_cache", "build_serialized_network")
    if building:
        fake_trt.fail = {call}
    with pytest.raises((RuntimeError, InputError), match=call if call != "parse_from_file" else "TensorRT cannot parse"):
        trt_module.build_engine(path, str(tmp_path / "s.plan"), batch_range=(1, 4, 8))
        fake_trt.fail = {call}
        trt_module.TensorRTSampler(str(tmp_path / "s.plan"))(*inputs(2, model))
    assert building or (tmp_path / "s.plan").exists()
    assert not building or not (tmp_path / "s.plan").exists()


def test_tensorrt_11_without_the_strongly_typed_flag_builds_a_network_with_no_flags(fake_trt, graphs, tmp_path):
    """TensorRT 11 networks are strongly typed by default; where its flag enum has no STRONGLY_TYPED, no flags."""
    model, path = graph(graphs)
    fake_trt.__version__ = "11.4.0.106"
    fake_trt.NetworkDefinitionCreationFlag = Enum()
    record = trt_module.build_engine(path, str(tmp_path / "s.plan"), batch_range=(1, 4, 8))
    assert record["tensorrt_version"] == "11.4.0.106"
    noise, y = inputs(3, model)
    assert torch.equal(trt_module.TensorRTSampler(str(tmp_path / "s.plan"))(noise, y), OrtSampler(path, threads=1)(noise, y))


def test_engine_built_for_another_tensorrt_or_gpu_is_refused(fake_trt, graphs, tmp_path, monkeypatch):
    _, path = graph(graphs)
    trt_module.build_engine(path, str(tmp_path / "s.plan"), batch_range=(1, 4, 8))
    fake_trt.__version__ = "11.4.0.106"
    with pytest.raises(InputError, match="was built for tensorrt version 10.13.0.35, this machine has 11.4.0.106"):
        trt_module.TensorRTSampler(str(tmp_path / "s.plan"))
    fake_trt.__version__ = "10.13.0.35"
    monkeypatch.setattr(trt_module, "gpu_info", lambda: {"gpu": "NVIDIA A100", "compute_capability": "8.0"})
    with pytest.raises(InputError, match="was built for gpu NVIDIA H200, this machine has NVIDIA A100"):
        trt_module.TensorRTSampler(str(tmp_path / "s.plan"))


def test_cli_tensorrt_export_and_sample_with_their_checks(fake_trt, tiny_pipeline, tmp_path, capsys):
    dit = str(tiny_pipeline / "dit")
    plan, vplan = str(tmp_path / "s.plan"), str(tmp_path / "v.plan")
    assert main(["export", "--ckpt", dit, "--format", "tensorrt", "--solver", "euler", "--steps", "2", "--batch-range", "1:4:8",
                 "--out", plan]) == 0
    assert main(["export", "--ckpt", dit, "--format", "tensorrt", "--graph", "velocity", "--batch-range", "1:8", "--out", vplan]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "s.plan", "s.plan.json", "v.plan", "v.plan.json"]
    common = ["sample", "--ckpt", dit, "--num", "6", "--batch-size", "4", "--seed", "2"]
    assert main(common + ["--backend", "tensorrt", "--engine", plan, "--out", str(tmp_path / "t")]) == 0
    assert main(common + ["--solver", "euler", "--steps", "2", "--out", str(tmp_path / "e")]) == 0
    a, b = np.load(tmp_path / "t" / "samples.npz"), np.load(tmp_path / "e" / "samples.npz")
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    capsys.readouterr()
    for engine, extra, words in [(plan, ["--batch-size", "9"], "--batch-size 9: a batch of 9 rows, outside the engine's profile 1..8"),
                                 (vplan, ["--cfg", "2", "--batch-size", "5"], "a batch of 10 rows, outside the engine's profile 1..8"),
                                 (plan, ["--steps", "3"], "--ode-steps 3: the graph"),
                                 (str(tmp_path / "none.plan"), [], "no such file")]:
        assert main(["sample", "--ckpt", dit, "--backend", "tensorrt", "--engine", engine, *extra, "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "bad").exists()


def bindings_names(version: str) -> set[str] | None:
    """The names the tensorrt bindings module of `version` defines (from the wheel `make install` downloads): its
    NUL-terminated strings and their tails (the linker stores a literal such as "INPUT" as the tail of
    "CONDITIONAL_INPUT": string tail merging), and the identifiers of its Python __init__."""
    folder = os.environ.get("LFM_FAST_TRT_BINDINGS", os.path.join(os.path.dirname(sys.executable), "..", "tensorrt-bindings"))
    wheels = glob.glob(os.path.join(folder, f"tensorrt_cu*_bindings-{version}-*.whl"))
    if not wheels:
        return None
    with zipfile.ZipFile(wheels[0]) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("/tensorrt.so")))
        init = z.read(next(n for n in z.namelist() if n.endswith("tensorrt_bindings/__init__.py"))).decode()
    names = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", init))  # the Python half: classes it patches, __version__
    for entry in data.split(b"\0"):
        if re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]*", entry):
            names.update(entry[i:].decode() for i in range(len(entry) - 2))
    return names


@pytest.mark.parametrize("version", ["10.13.0.35", "11.4.0.106"])
def test_every_tensorrt_name_the_runner_uses_exists_in_the_real_bindings(fake_trt, graphs, tmp_path, version):
    """Build and run through the stand-in (recording every name read from TensorRT's objects), then look each name up
    in the pybind11 module of TensorRT 10.13 and 11.4. FP16, the builder flag 11 dropped, must not be among them."""
    names = bindings_names(version)
    if names is None:
        pytest.skip(f"no tensorrt bindings wheel {version} (make install downloads it)")
    model, path = graph(graphs, "velocity")
    USED.clear()
    trt_module.build_engine(path, str(tmp_path / "v.plan"), batch_range=(1, 4, 8), workspace_gib=1)
    runner = trt_module.TensorRTRunner(str(tmp_path / "v.plan"))
    x, y = inputs(2, model)
    runner.run({"x": x, "t": torch.full((2,), 0.5), "labels": y})
    assert {"create_network", "STRONGLY_TYPED", "set_timing_cache", "execute_async_v3", "set_input_shape"} <= USED
    assert sorted(USED - names) == [] and "FP16" not in USED
    assert ("FP16" in names) == version.startswith("10.")  # the string table does tell the versions apart,
    assert ("EXPLICIT_BATCH" in names) == version.startswith("10.")  # (11 dropped the flag)
    assert not {"execute_async_v2", "get_binding_shape", "max_workspace_size", "build_engine"} & names  # TensorRT 8's
