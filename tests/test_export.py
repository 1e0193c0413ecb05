import json

import numpy as np
import pytest
import torch

from lfm_fast.autoencoder import decode, load_autoencoder
from lfm_fast.cli import main
from lfm_fast.data.shapes import to_uint8
from lfm_fast.errors import InputError
from lfm_fast.export.onnx import export_onnx, read_metadata
from lfm_fast.export.ort import OrtSampler
from lfm_fast.export.sampler import UnrolledSampler, compile_sampler
from lfm_fast.models.dit import DiT, DiTConfig
from lfm_fast.sampling import FIXED_SOLVERS, SampleConfig, per_image_noise, sample, sample_with
from tests.conftest import CONDITIONED, a_condition, perturbed

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, num_classes=6)))


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
    assert json.loads(meta["times"]) == list(times) and meta["nfe"] == "4"
    noise, y = inputs(4)
    out = OrtSampler(str(tmp_path / "m.onnx"), intra_op_threads=1)(noise.numpy(), y.numpy())
    assert np.abs(out - sample_with(model, noise, y, cfg).latents.numpy()).max() <= 1e-4


def test_onnx_sampler_matches_eager_fp32_and_fp16_with_dynamic_batch(model, tmp_path):
    path = str(tmp_path / "s.onnx")
    meta = export_onnx(model, path, SampleConfig("heun", 2, 2.0))
    assert read_metadata(path) == meta
    assert (meta["solver"], meta["steps"], meta["cfg"], meta["nfe"], meta["latent_shape"]) == ("heun", "2", "2.0", "4", "[4, 8, 8]")
    runner = OrtSampler(path, intra_op_threads=1)
    for b in (1, 7):
        noise, y = inputs(b)
        ref = sample(model, noise, y, solver="heun", steps=2, cfg=2.0).latents
        assert np.abs(runner(noise.numpy(), y.numpy()) - ref.numpy()).max() <= 1e-4
    export_onnx(model, str(tmp_path / "h.onnx"), SampleConfig("heun", 2, 2.0), fp16=True)
    noise, y = inputs(7)
    runner = OrtSampler(str(tmp_path / "h.onnx"))
    out = runner(noise.numpy(), y.numpy())
    ref = sample(model, noise, y, solver="heun", steps=2, cfg=2.0).latents
    # an fp16 network, the ODE state and the time grid fp32: fp32 in, fp32 out
    assert runner.dtype == np.float32 and out.dtype == np.float32 and np.abs(out - ref.numpy()).max() <= 1e-2


def test_onnx_velocity_network_alone(model, tmp_path):
    path = str(tmp_path / "v.onnx")
    export_onnx(model, path, SampleConfig("euler", 1, 1.5), net_only=True)
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x, y = inputs(5)
    t = torch.linspace(0.1, 0.9, 5)
    out = sess.run(None, {"x": x.numpy(), "t": t.numpy(), "labels": y.numpy()})[0]
    ref = model.forward_with_cfg(x, t, y, 1.5)
    assert np.abs(out - ref.detach().numpy()).max() <= 1e-4


@pytest.mark.parametrize("kind", ["inpaint", "semantic"])
def test_onnx_sampler_takes_the_condition_as_an_input_and_matches_eager(kind, tmp_path):
    """A conditional checkpoint's graph has a `cond` input (inpaint: masked latent + mask; semantic: the one-hot
    map, through the rescaler inside the graph), with CFG against the null condition, at any batch size."""
    torch.manual_seed(0)
    net = perturbed(DiT(DiTConfig(input_size=8, hidden_size=32, depth=2, num_heads=2, **CONDITIONED[kind])))
    path = str(tmp_path / "c.onnx")
    meta = export_onnx(net, path, SampleConfig("euler", 2, 2.0))
    assert meta["condition"] == kind and json.loads(meta["cond_shape"]) == list(net.config.cond_shape)
    runner = OrtSampler(path, intra_op_threads=1)
    for b in (1, 3):
        noise, cond = per_image_noise(list(range(b)), (4, 8, 8)), a_condition(kind, b)
        ref = sample(net, noise, None, solver="euler", steps=2, cfg=2.0, cond=cond).latents
        assert np.abs(runner(noise.numpy(), np.zeros(b, np.int64), cond.numpy()) - ref.numpy()).max() <= 1e-4
    with pytest.raises(InputError, match="needs a condition"):
        runner(noise.numpy(), np.zeros(3, np.int64))


def test_onnx_with_decoder_gives_the_same_images(tiny_pipeline, tmp_path):
    model = DiT.from_pretrained(str(tiny_pipeline / "dit")).eval()
    ae = load_autoencoder(str(tiny_pipeline / "ae"), device="cpu")
    path = str(tmp_path / "d.onnx")
    export_onnx(model, path, SampleConfig("euler", 2, 2.0), ae=ae)
    noise, y = inputs(7, model.config.input_size)
    out = OrtSampler(path)(noise.numpy(), y.numpy())
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
                         (["--backend", "onnxruntime", "--engine", str(tmp_path / "none.onnx")], "no such file")]:
        assert main(common + extra + ["--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("lfm-fast: error:") and words in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()
    assert main(["export", "--ckpt", dit, "--solver", "dopri5", "--out", str(tmp_path / "x.onnx")]) == 2


@pytest.mark.gpu
def test_tensorrt_engine_matches_onnxruntime(tiny_pipeline, tmp_path):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lfm_fast.export.tensorrt import TensorRTSampler, build_engine

    model = DiT.from_pretrained(str(tiny_pipeline / "dit")).eval()
    onnx_path, engine = str(tmp_path / "s.onnx"), str(tmp_path / "s.plan")
    export_onnx(model, onnx_path, SampleConfig("heun", 4, 2.0))
    build_engine(onnx_path, engine, fp16=False, batch_range=(1, 4, 8), timing_cache=str(tmp_path / "cache"))
    noise, y = inputs(3, model.config.input_size)
    ref = OrtSampler(onnx_path)(noise.numpy(), y.numpy())
    for graph in (False, True):
        out = TensorRTSampler(engine, cuda_graph=graph)(noise.cuda(), y.cuda())
        assert np.abs(out.cpu().numpy() - ref).max() <= 1e-3
