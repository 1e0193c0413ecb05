import json

import numpy as np
import pytest
import torch

from lfm_fast.autoencoder import decode, load_autoencoder
from lfm_fast.cli import main
from lfm_fast.data.images import to_uint8
from lfm_fast.errors import InputError
from lfm_fast.export.onnx import export_onnx, read_metadata
from lfm_fast.export.ort import OrtSampler
from lfm_fast.export.sampler import UnrolledSampler, compile_sampler
from lfm_fast.models.dit import DiT, DiTConfig
from lfm_fast.choices import FIXED_SOLVERS
from lfm_fast.sampling import SampleConfig, per_image_noise, sample, sample_with
from tests.conftest import CONDITIONED, a_condition, perturbed

import onnxruntime  # noqa: E402,F401 (a hard dependency of the export extra: a broken import fails)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=6)))


@pytest.fixture(scope="module")
def heun2(model, tmp_path_factory):
    """The fp32 Heun-2 sampler graph of `model` (CFG 2), exported once for the tests that read it: (path, metadata)."""
    path = str(tmp_path_factory.mktemp("heun2") / "s2.onnx")
    return path, export_onnx(model, path, SampleConfig("heun", 2, 2.0))


def inputs(b, size=8):
    return per_image_noise(list(range(b)), (4, size, size)), torch.arange(b) % 6


def test_unrolled_sampler_is_the_eager_sampler(model):
    noise, y = inputs(3)
    for solver in FIXED_SOLVERS:
        for grid, shift in (("shifted", 2.0), ("power", 1.5)):
            cfg = SampleConfig(solver=solver, steps=4, cfg=2.0, grid=grid, shift=shift, cfg_lo=0.2, cfg_hi=0.8)
            ref = sample_with(model, noise, y, cfg)
            unrolled = UnrolledSampler(model, cfg)
            torch.testing.assert_close(unrolled(noise, y), ref.latents, rtol=1e-6, atol=1e-6)
            assert unrolled.nfe == ref.nfe


@pytest.mark.parametrize("solver", ["dpm++2m", "abm3"])
def test_onnx_multistep_sampler_on_a_calibrated_grid_matches_eager(model, tmp_path, solver):
    """The multistep weights of an uneven grid are constants of the graph (computed in float64 at export)."""
    times = (1.0, 0.85, 0.5, 0.2, 0.0)
    cfg = SampleConfig(solver=solver, steps=4, cfg=2.0, grid="calibrated", times=times)
    meta = export_onnx(model, str(tmp_path / "m.onnx"), cfg)
    assert meta.recipe.times == times and meta.nfe == 4 and json.loads(meta.props()["times"]) == list(times)
    noise, y = inputs(4)
    out = OrtSampler(str(tmp_path / "m.onnx"), threads=1)(noise, y)
    assert (out - sample_with(model, noise, y, cfg).latents).abs().max() <= 1e-4


def test_onnx_sampler_matches_eager_fp32_and_fp16_with_dynamic_batch(model, heun2, tmp_path):
    path, meta = heun2
    assert read_metadata(path) == meta  # typed, through ONNX's string properties and back
    r = meta.recipe
    assert (r.solver, r.steps, r.cfg, meta.nfe, meta.latent_shape, meta.with_decoder) == ("heun", 2, 2.0, 4, (4, 8, 8), False)
    assert meta.props()["steps"] == "2" and meta.props()["cfg_interval"] == "0.0:1.0"  # the graphs' stored layout
    runner = OrtSampler(path, threads=1)
    for b in (1, 7):
        noise, y = inputs(b)
        ref = sample(model, noise, y, solver="heun", steps=2, cfg=2.0).latents
        assert (runner(noise, y) - ref).abs().max() <= 1e-6
    export_onnx(model, str(tmp_path / "h.onnx"), SampleConfig("heun", 2, 2.0), dtype="float16")
    noise, y = inputs(7)
    runner = OrtSampler(str(tmp_path / "h.onnx"))
    out = runner(noise, y)
    # an fp16 network, the ODE state and the time grid fp32: fp32 in, fp32 out, as eager with an fp16 network
    import copy

    ref = sample(copy.deepcopy(model).half(), noise, y, solver="heun", steps=2, cfg=2.0).latents  # (a `.half()` and
    # `.float()` of the module fixture itself would round its weights for every later test: seen as a 3e-4 mismatch)
    assert runner.inputs["noise"].type == "tensor(float)" and out.dtype == torch.float32
    assert (out - ref).abs().max() <= 2e-3
    import onnx

    proto = onnx.load(str(tmp_path / "h.onnx"))
    to = [a.i for n in proto.graph.node if n.op_type == "Cast" for a in n.attribute if a.name == "to"]
    solver = [a.i for n in proto.graph.node if n.op_type == "Cast" and not n.name.startswith("e") for a in n.attribute
              if a.name == "to"]
    assert onnx.TensorProto.FLOAT16 in to and onnx.TensorProto.FLOAT16 not in solver  # only the network casts to fp16


def test_bf16_graph_is_typed_in_the_graph_with_fp32_inputs_and_outputs(model, tmp_path):
    """A bf16 network in an fp32 graph (opset 22, where ONNX types Conv in bf16): what a strongly typed TensorRT
    build needs. ONNX Runtime's CPU provider has no bf16 Conv, so this graph is checked, not run, here."""
    import onnx

    path = str(tmp_path / "b.onnx")
    meta = export_onnx(model, path, SampleConfig("heun", 2, 2.0), dtype="bfloat16")
    proto = onnx.load(path)
    assert meta.dtype == "bfloat16" and proto.opset_import[0].version == 22
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64]
    assert proto.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    weights = {t.name: t.data_type for t in proto.graph.initializer if t.name.startswith("net/") and t.name.endswith("weight")}
    per_sample = {n for n in weights if "embedder" in n and "x_embedder" not in n or "adaLN" in n}
    assert per_sample and {weights[n] for n in per_sample} == {onnx.TensorProto.FLOAT}  # one vector a sample: fp32
    assert {weights[n] for n in weights if n not in per_sample} == {onnx.TensorProto.BFLOAT16}


def test_unrolled_graph_holds_the_weights_once_and_exports_in_the_same_time_at_any_steps(model, heun2, tmp_path):
    """The network is traced once and spliced into every evaluation: the file grows by nodes, not by weights."""
    import onnx

    sizes = {}
    for steps in (2, 6):
        path = heun2[0] if steps == 2 else tmp_path / f"s{steps}.onnx"
        if steps != 2:
            export_onnx(model, str(path), SampleConfig("heun", steps, 2.0))
        proto = onnx.load(str(path))
        sizes[steps] = [sum(len(t.raw_data) for t in proto.graph.initializer if t.name.startswith("net/")),
                        sum(len(t.raw_data) for t in proto.graph.initializer)]
        assert not any(n.domain == "lfm_fast.graph" for n in proto.graph.node)
        assert sum(n.name.endswith("node_conv2d") for n in proto.graph.node) == 2 * steps  # one patch embedding per NFE
    assert sizes[6][0] == sizes[2][0] and sizes[6][1] - sizes[2][1] < 0.01 * sizes[2][1]  # the grid's constants
    noise, y = inputs(3)
    ref = sample(model, noise, y, solver="heun", steps=6, cfg=2.0).latents
    assert (OrtSampler(str(tmp_path / "s6.onnx"), threads=1)(noise, y) - ref).abs().max() <= 1e-5


def test_velocity_graph_driven_by_the_solvers_matches_eager_at_any_recipe(model, tmp_path):
    """One velocity graph: steps, solver, grid, CFG scale and interval chosen at sampling time, fp32 state."""
    from lfm_fast.export.ort import velocity_net

    path = str(tmp_path / "v.onnx")
    meta = export_onnx(model, path, SampleConfig(), graph="velocity")
    assert meta.graph == "velocity" and meta.recipe is None and "steps" not in meta.props() and "nfe" not in meta.props()
    net = velocity_net(OrtSampler(path, threads=1), model.config)
    noise, y = inputs(3)
    for cfg in (SampleConfig("heun", 3, 2.0), SampleConfig("ab3", 5, 3.0, grid="shifted", shift=2.0, cfg_lo=0.2, cfg_hi=0.7),
                SampleConfig("dopri5", cfg=1.5, atol=1e-3, rtol=1e-3)):
        ref, out = sample_with(model, noise, y, cfg), sample_with(net, noise, y, cfg)
        assert (out.latents - ref.latents).abs().max() <= 5e-5 and out.nfe == ref.nfe and out.net_rows == ref.net_rows
    with pytest.raises(InputError, match="velocity graph is one network evaluation"):
        OrtSampler(path)(noise, y)


@pytest.mark.parametrize("kind", ["inpaint", "semantic"])
def test_onnx_sampler_takes_the_condition_as_an_input_and_matches_eager(kind, tmp_path):
    """A conditional checkpoint's graph has a `cond` input (inpaint: masked latent + mask; semantic: the one-hot
    map, through the rescaler inside the graph), with CFG against the null condition, at any batch size."""
    torch.manual_seed(0)
    net = perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, **CONDITIONED[kind])))
    path = str(tmp_path / "c.onnx")
    meta = export_onnx(net, path, SampleConfig("euler", 2, 2.0))
    assert meta.condition == kind and meta.cond_shape == tuple(net.config.cond_shape)
    runner = OrtSampler(path, threads=1)
    for b in (1, 3):
        noise, cond = per_image_noise(list(range(b)), (4, 8, 8)), a_condition(kind, b)
        ref = sample(net, noise, None, solver="euler", steps=2, cfg=2.0, cond=cond).latents
        assert (runner(noise, torch.zeros(b, dtype=torch.long), cond) - ref).abs().max() <= 1e-5
    with pytest.raises(InputError, match="needs a 'cond' input"):
        runner(noise, torch.zeros(3, dtype=torch.long))


def test_onnx_with_decoder_gives_the_same_images(tiny_pipeline, tmp_path):
    model = DiT.from_pretrained(str(tiny_pipeline / "dit")).eval()
    ae = load_autoencoder(str(tiny_pipeline / "ae"), device="cpu")
    path = str(tmp_path / "d.onnx")
    export_onnx(model, path, SampleConfig("euler", 2, 2.0), ae=ae)
    noise, y = inputs(7, model.config.input_size)
    out = OrtSampler(path)(noise, y).numpy()
    ref = to_uint8(decode(ae, sample(model, noise, y, solver="euler", steps=2, cfg=2.0).latents))
    assert out.shape == (7, 32, 32, 3) and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - ref.astype(int))
    assert diff.max() <= 2 and (diff <= 1).mean() >= 0.999


def test_compile_backend_matches_eager(model):
    noise, y = inputs(4)
    compiled, nfe = compile_sampler(model, SampleConfig(solver="heun", steps=3, cfg=2.0))
    ref = sample(model, noise, y, solver="heun", steps=3, cfg=2.0)
    torch.testing.assert_close(compiled(noise, y), ref.latents, rtol=1e-4, atol=1e-4)
    assert nfe == ref.nfe == 6


@pytest.mark.parametrize("cfg", [2.0, 1.0])
def test_compile_backend_on_cuda_drives_the_compiled_network(model, monkeypatch, cfg):
    """The CUDA path (the network alone compiled with CUDA graphs, the solvers around it), run on the CPU with a stand-in
    for the compiled call that behaves as a CUDA graph does: it writes every output into the same buffer. Every
    evaluation, CFG's two halves included, goes through the compiled call and starts a new CUDA-graph step, and the
    clone of each output keeps Heun's first velocity intact while the second is computed (at CFG 1 no CFG arithmetic
    copies it): equal to eager."""
    compiled, steps = [], []

    def graphed(net, **options):
        compiled.append(options)
        buffers = {}

        def replay(*args):
            out = net(*args)
            return buffers.setdefault(out.shape, torch.empty_like(out)).copy_(out)
        return replay

    monkeypatch.setattr(torch, "compile", graphed)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(len(steps)))
    noise, y = inputs(4)
    sampler, nfe = compile_sampler(model, SampleConfig(solver="heun", steps=3, cfg=cfg), per_network=True)
    ref = sample(model, noise, y, solver="heun", steps=3, cfg=cfg)
    torch.testing.assert_close(sampler(noise, y), ref.latents, rtol=1e-6, atol=1e-6)
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}] and len(steps) == nfe == ref.nfe == 6


def test_bad_graph_files(tmp_path):
    (tmp_path / "x.onnx").write_text("not onnx")
    with pytest.raises(InputError, match="not an ONNX model"):
        read_metadata(str(tmp_path / "x.onnx"))
    with pytest.raises(InputError, match="no such file"):
        OrtSampler(str(tmp_path / "missing.onnx"))


def test_cli_export_then_sample_with_onnxruntime(tiny_pipeline, tmp_path, capsys):
    dit, onnx_path = str(tiny_pipeline / "dit"), str(tmp_path / "s.onnx")
    assert main(["export", "--ckpt", dit, "--solver", "euler", "--steps", "2", "--cfg", "2", "--out", onnx_path]) == 0
    common = ["sample", "--ckpt", dit, "--num", "5", "--labels", "2,3", "--seed", "1"]
    assert main(common + ["--backend", "onnxruntime", "--engine", onnx_path, "--out", str(tmp_path / "ort")]) == 0
    assert main(common + ["--solver", "euler", "--steps", "2", "--cfg", "2", "--out", str(tmp_path / "eager")]) == 0
    a, b = np.load(tmp_path / "ort" / "samples.npz"), np.load(tmp_path / "eager" / "samples.npz")
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1 and a["labels"].tolist() == [2, 3, 2, 3, 2]
    assert (tmp_path / "ort" / "000001_class3.png").exists()
    capsys.readouterr()
    for extra, words in [(["--backend", "onnxruntime"], "needs --engine"),
                         (["--backend", "onnxruntime", "--engine", onnx_path, "--steps", "4"], "exported with steps=2"),
                         (["--backend", "onnxruntime", "--engine", onnx_path, "--grid", "power", "--shift", "2"],
                          "exported with grid=uniform"),
                         (["--backend", "onnxruntime", "--engine", onnx_path, "--cfg-interval", "0.2:0.8"],
                          "exported with cfg_interval=0.0:1.0"),
                         (["--engine", onnx_path], "engines run with --backend onnxruntime or --backend tensorrt"),
                         (["--backend", "onnxruntime", "--engine", onnx_path, "--rtol", "1e-3"], "--rtol 0.001: the graph"),
                         (["--backend", "tensorrt", "--engine", onnx_path], "an ONNX graph; run it with --backend onnxruntime"),
                         (["--backend", "onnxruntime", "--engine", str(tmp_path / "none.onnx")], "no such file")]:
        assert main(common + extra + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lfm-fast: error:") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert main(["export", "--ckpt", dit, "--solver", "dopri5", "--out", str(tmp_path / "x.onnx")]) == 2


def test_cli_velocity_graph_takes_the_recipe_at_sampling_time_and_refuses_mismatches(tiny_pipeline, tmp_path, capsys):
    import shutil

    dit, graph = str(tiny_pipeline / "dit"), str(tmp_path / "v.onnx")
    capsys.readouterr()
    for extra, words in [(["--steps", "4"], "--ode-steps 4: a velocity graph holds the network alone"),
                         (["--with-decoder"], "--with-decoder: a velocity graph"),
                         (["--fp16", "--bf16"], "not allowed with argument")]:
        assert main(["export", "--ckpt", dit, "--graph", "velocity", *extra, "--out", graph]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "v.onnx").exists()
    assert main(["export", "--ckpt", dit, "--graph", "velocity", "--out", graph]) == 0
    common = ["sample", "--ckpt", dit, "--num", "3", "--seed", "4", "--solver", "ab2", "--steps", "3", "--cfg", "1.5"]
    assert main(common + ["--backend", "onnxruntime", "--engine", graph, "--out", str(tmp_path / "ort")]) == 0
    assert main(common + ["--out", str(tmp_path / "eager")]) == 0
    a, b = np.load(tmp_path / "ort" / "samples.npz"), np.load(tmp_path / "eager" / "samples.npz")
    assert np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int)).max() <= 1
    other = tmp_path / "other"  # the same architecture, other weights: refused, not silently sampled
    shutil.copytree(dit, other)
    model = DiT.from_pretrained(str(other))
    with torch.no_grad():
        model.final_layer.linear.bias.add_(0.01)
    model.save_pretrained(str(other), json.loads((other / "config.json").read_text())["meta"])
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(other), "--backend", "onnxruntime", "--engine", graph, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert "was exported from other weights" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    assert main(common + ["--backend", "onnxruntime", "--engine", graph, "--atol", "1e-3", "--out", str(tmp_path / "y")]) == 2
    assert "--atol 0.001: ab2 is a fixed-step solver" in capsys.readouterr().err
    for extra, words in [(["--batch-range", "1:8"], "--batch-range 1:8: for --format tensorrt"),
                         (["--ae", "builtin:shapes"], "--ae builtin:shapes: the autoencoder is for --with-decoder")]:
        assert main(["export", "--ckpt", dit, *extra, "--out", str(tmp_path / "z.onnx")]) == 2
        assert words in capsys.readouterr().err
    assert not (tmp_path / "z.onnx").exists()


def test_large_graphs_keep_their_weights_in_one_data_file_and_leave_no_orphans(model, tmp_path):
    """Past the threshold (1.5 GiB; lowered here) every large weight goes to <out>.data; an inline graph written over
    an external one removes the data file the old graph referenced."""
    import onnx

    from lfm_fast.export.onnx import save_onnx

    path = tmp_path / "big.onnx"
    export_onnx(model, str(path), SampleConfig("heun", 2, 2.0), external_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(len(t.raw_data) < 1024 for t in proto.graph.initializer)
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    noise, y = inputs(2)
    ref = sample(model, noise, y, solver="heun", steps=2, cfg=2.0).latents
    assert (OrtSampler(str(path), threads=1)(noise, y) - ref).abs().max() <= 1e-6
    save_onnx(onnx.load(str(path)), str(path))  # the same graph (its weights read back), inline: the data file goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx"]
    assert (OrtSampler(str(path), threads=1)(noise, y) - ref).abs().max() <= 1e-6


def test_ort_provider_options_cache_engines_and_profile_every_input():
    from lfm_fast.export.ort import default_threads, provider_options

    from lfm_fast.export.onnx import GraphMeta

    meta = GraphMeta("velocity", "float16", "", (4, 8, 8), 0, "inpaint", (5, 8, 8), 1e-5)
    (trt_name, trt), (cuda_name, cuda), cpu = provider_options(
        meta, ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], (1, 8, 32), "/c")
    assert (trt_name, cuda_name, cpu) == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert trt["trt_engine_cache_enable"] and trt["trt_engine_cache_path"] == "/c" and trt["trt_fp16_enable"]
    assert trt["trt_profile_min_shapes"] == "x:1x4x8x8,t:1,labels:1,cond:1x5x8x8"
    assert trt["trt_profile_max_shapes"] == "x:32x4x8x8,t:32,labels:32,cond:32x5x8x8"
    assert default_threads() >= 1


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tiny_pipeline, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lfm_fast.export.tensorrt import TensorRTSampler, build_engine

    model = DiT.from_pretrained(str(tiny_pipeline / "dit")).eval()
    onnx_path, engine = str(tmp_path / "s.onnx"), str(tmp_path / "s.plan")
    export_onnx(model, onnx_path, SampleConfig("heun", 4, 2.0))
    build_engine(onnx_path, engine, batch_range=(1, 4, 8), cache_dir=str(tmp_path / "cache"))
    for graph in (False, True):
        runner = TensorRTSampler(engine, cuda_graph=graph)
        outs = []
        for seed in (0, 1):  # a replay with new inputs, the first result kept: no aliasing of the static output
            noise, y = inputs(3, model.config.input_size)
            noise = noise + seed
            outs.append((runner(noise.cuda(), y.cuda()), OrtSampler(onnx_path)(noise, y)))
        for out, ref in outs:
            assert (out.cpu() - ref).abs().max() <= 1e-3


class StandInSession:
    """An ONNX Runtime session as a GPU machine would make it: it reports the providers it was given, has the real
    graph's inputs and outputs, and records the IO bindings instead of running them."""

    made: list = []  # every session made, newest last

    def __init__(self, path, options, providers, session=None):
        StandInSession.made.append(self)
        self.provider_options = providers
        self.graph = session(path, options, providers=["CPUExecutionProvider"])
        self.bound, self.runs = [], 0

    def get_providers(self):
        return [p if isinstance(p, str) else p[0] for p in self.provider_options]

    def get_inputs(self):
        return self.graph.get_inputs()

    def get_outputs(self):
        return self.graph.get_outputs()

    def io_binding(self):
        bound = self.bound

        class Binding:
            def bind_input(self, name, kind, index, dtype, shape, pointer):
                bound.append((name, kind, index))

            bind_output = bind_input

        return Binding()

    def run_with_iobinding(self, binding):
        self.runs += 1


@pytest.fixture
def gpu_providers(monkeypatch, tmp_path):
    """ONNX Runtime with the TensorRT and CUDA providers, as on a GPU machine (sessions are `StandInSession`s)."""
    import functools

    import onnxruntime

    monkeypatch.setattr(onnxruntime, "InferenceSession", functools.partial(StandInSession, session=onnxruntime.InferenceSession))
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setenv("LFM_FAST_CACHE", str(tmp_path / "cache"))
    return monkeypatch


def stub_cuda_buffers(monkeypatch) -> list:
    """Tensors that `OrtGraph.run` puts on a GPU stay on the CPU (this torch build has no CUDA); returns the devices
    asked for. Applied after the test has made its inputs: only `run`'s calls fit the stubs."""
    asked, to, empty = [], torch.Tensor.to, torch.empty

    def moved(tensor, device, dtype):
        asked.append(device)
        return to(tensor, dtype)

    def allocated(shape, dtype, device):
        asked.append(device)
        return empty(shape, dtype=dtype)

    monkeypatch.setattr(torch.Tensor, "to", moved)
    monkeypatch.setattr(torch, "empty", allocated)
    return asked


def test_ort_graph_binds_its_buffers_on_the_gpu_its_session_runs_on(gpu_providers, heun2):
    """On rank 1 the providers get device 1, and so do the inputs, the output and their bindings (not cuda:0)."""
    path = heun2[0]
    gpu_providers.setenv("LOCAL_RANK", "1")
    runner = OrtSampler(path)
    assert [options["device_id"] for _, options in runner.session.provider_options[:2]] == [1, 1]
    noise, y = inputs(3)
    asked = stub_cuda_buffers(gpu_providers)
    runner(noise, y)
    assert runner.session.bound == [("noise", "cuda", 1), ("labels", "cuda", 1), (runner.output, "cuda", 1)]
    assert asked == [torch.device("cuda", 1)] * 3 and runner.device == torch.device("cuda", 1) and runner.session.runs == 1


def test_ort_tensorrt_provider_refuses_a_batch_outside_its_profile_before_running(gpu_providers, heun2):
    path = heun2[0]
    runner = OrtSampler(path, batch_range=(1, 4, 8))
    noise, y = inputs(9)
    asked = stub_cuda_buffers(gpu_providers)
    with pytest.raises(InputError, match=r"^batch: a batch of 9 rows, outside the .* TensorRT provider's profile 1\.\.8"):
        runner(noise, y)
    assert runner.session.runs == 0 and runner.session.bound == [] and asked == []
    runner(noise[:8], y[:8])
    assert runner.session.runs == 1
    gpu_providers.setattr("onnxruntime.get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    OrtSampler(path, batch_range=(1, 4, 8)).check_batch(9)  # the CUDA provider takes any batch


def test_cli_onnxruntime_builds_the_tensorrt_providers_profile_for_the_runs_batches(gpu_providers, tiny_pipeline, tmp_path):
    """A velocity graph under CFG takes two network rows an image: `sample --batch-size 40 --cfg 2` asks ONNX Runtime's
    TensorRT provider for a profile up to 80 rows (its default stops at 64)."""
    from lfm_fast.models.dit import read_checkpoint_config
    from lfm_fast.sampler import Sampler

    dit, graph = str(tiny_pipeline / "dit"), str(tmp_path / "v.onnx")
    export_onnx(DiT.from_pretrained(dit).eval(), graph, SampleConfig(), graph="velocity")
    s = Sampler(DiT.from_pretrained(dit), read_checkpoint_config(dit), dit, "onnxruntime", graph)
    s._runner(SampleConfig(cfg=2.0), 50, 40)
    meta = s.meta
    trt = dict(p for p in StandInSession.made[-1].provider_options if isinstance(p, tuple))["TensorrtExecutionProvider"]
    assert trt["trt_profile_max_shapes"].split(",")[0] .startswith("x:80x") and meta.graph == "velocity"