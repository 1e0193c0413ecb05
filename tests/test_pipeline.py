"""`LFMPipeline`: the Python API gives what `lfm-fast sample` writes, in every output type, with seeds or generators, and
every backend of the Sampler they share gives what eager gives."""

import numpy as np
import pytest
import torch

from lfm_fast import LFMPipeline
from lfm_fast.cli import main
from lfm_fast.errors import InputError


@pytest.fixture(scope="module")
def pipe(tiny_pipeline):
    return LFMPipeline.from_pretrained(str(tiny_pipeline / "dit"), device="cpu")


def test_the_pipeline_gives_what_sample_writes(pipe, tiny_pipeline, tmp_path):
    assert main(["sample", "--ckpt", str(tiny_pipeline / "dit"), "--num", "4", "--labels", "0,3,5,1", "--solver", "heun",
                 "--steps", "3", "--cfg", "2", "--seed", "7", "--out", str(tmp_path / "s")]) == 0
    out = pipe(class_labels=[0, 3, 5, 1], num_inference_steps=3, guidance_scale=2.0, solver="heun", seed=7,
               output_type="np")
    assert np.array_equal(out.images, np.load(tmp_path / "s" / "samples.npz")["arr_0"])
    assert (out.nfe.per_batch, out.nfe.rows_per_image) == (6, 12)  # heun × 3, both CFG halves


def test_output_types_and_noise_sources(pipe):
    kw = dict(class_labels=[2, 4], num_inference_steps=2, solver="euler")
    lat = pipe(**kw, seed=0, output_type="latent").images
    c = pipe.model.config
    assert lat.shape == (2, c.in_channels, c.input_size, c.input_size) and lat.dtype == torch.float32
    pil = pipe(**kw, seed=0).images
    assert [im.size for im in pil] == [(32, 32)] * 2
    assert np.array_equal(np.stack([np.array(im) for im in pil]), pipe(**kw, seed=0, output_type="np").images)
    a = pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="latent").images
    b = pipe(**kw, generator=torch.Generator().manual_seed(1), output_type="latent").images
    c = pipe(**kw, generator=[torch.Generator().manual_seed(s) for s in (1, 2)], output_type="latent").images
    assert torch.equal(a, b) and not torch.equal(a, lat) and not torch.equal(a[1], c[1])
    adaptive = pipe(class_labels=[0], solver="dopri5", atol=1e-4, rtol=1e-4, seed=0, output_type="latent")
    assert adaptive.nfe.per_image_mean > 6


def test_bad_calls_are_one_line_input_errors(pipe):
    for kwargs, msg in ((dict(class_labels=[6]), "0..5"), (dict(output_type="pt"), "output_type"),
                        (dict(image=np.zeros((32, 32, 3), np.uint8)), "class-conditional generation"),
                        (dict(schedule="x"), "unknown sampling option"), (dict(steps=4), "num_inference_steps"),
                        (dict(class_labels=[0, 1], generator=[torch.Generator()]), "1 generators for 2 images"),
                        (dict(num_images=0), "num_images=0"), (dict(num_images=-1), "num_images=-1"),
                        (dict(class_labels=[]), "empty"), (dict(class_labels=[1.5]), "1.5"),
                        (dict(class_labels=["no-such-class"]), "one of"), (dict(num_inference_steps=2.5), "num_inference_steps=2.5"),
                        (dict(num_inference_steps=0), "num_inference_steps=0"), (dict(batch_size=0), "batch_size=0"),
                        (dict(solver="rk45"), "solver"), (dict(seed=0, generator=torch.Generator()), "pass one")):
        with pytest.raises(InputError, match=msg):
            pipe(**kwargs)
    names = pipe.class_names  # class names work as labels
    by_name = pipe(class_labels=[names[2]], num_inference_steps=1, solver="euler", seed=0, output_type="latent").images
    by_id = pipe(class_labels=[2], num_inference_steps=1, solver="euler", seed=0, output_type="latent").images
    assert torch.equal(by_name, by_id)


def test_a_bf16_pipeline_runs_its_network_in_bf16_and_gives_what_sample_dtype_bf16_writes(tiny_pipeline, tmp_path):
    """from_pretrained(dtype=torch.bfloat16): the token path in bf16, the per-sample path (time and label embeddings,
    adaLN) kept fp32 (`cast_token_path`); the same images as `sample --dtype bf16`, close to the fp32 ones."""
    bf16 = LFMPipeline.from_pretrained(str(tiny_pipeline / "dit"), device="cpu", dtype=torch.bfloat16)
    dtypes = {n: p.dtype for n, p in bf16.model.named_parameters()}
    assert dtypes["blocks.0.attn.qkv.weight"] == dtypes["final_layer.linear.weight"] == torch.bfloat16
    assert dtypes["t_embedder.mlp.0.weight"] == dtypes["blocks.0.adaLN_modulation.1.weight"] == torch.float32
    kw = dict(class_labels=[0, 3], num_inference_steps=3, guidance_scale=2.0, solver="heun", seed=7)
    out = bf16(**kw, output_type="np").images
    assert main(["sample", "--ckpt", str(tiny_pipeline / "dit"), "--num", "2", "--labels", "0,3", "--solver", "heun",
                 "--steps", "3", "--cfg", "2", "--seed", "7", "--dtype", "bf16", "--out", str(tmp_path / "s")]) == 0
    assert np.array_equal(out, np.load(tmp_path / "s" / "samples.npz")["arr_0"])
    fp32 = LFMPipeline.from_pretrained(str(tiny_pipeline / "dit"), device="cpu")
    lat32, lat16 = (p(**kw, output_type="latent").images for p in (fp32, bf16))
    assert lat16.dtype == torch.float32 and 0 < (lat16 - lat32).abs().max() < 0.05 * lat32.abs().max()


def test_every_backend_gives_eager_images(pipe, tiny_pipeline, tmp_path):
    """The backends of the one Sampler through the Python API, against eager for the same seeds: a sampler graph and a
    velocity graph (ONNX Runtime) and the compile backend; a sampler graph runs its own recipe, and refuses another."""
    from lfm_fast.export.onnx import export_onnx
    from lfm_fast.models.dit import DiT
    from lfm_fast.sampling import SampleConfig

    dit = str(tiny_pipeline / "dit")
    kw = dict(class_labels=[0, 3, 5], num_inference_steps=3, guidance_scale=2.0, solver="heun", seed=7, output_type="latent")
    ref = pipe(**kw).images
    model = DiT.from_pretrained(dit).eval()
    export_onnx(model, str(tmp_path / "s.onnx"), SampleConfig("heun", 3, 2.0))
    export_onnx(model, str(tmp_path / "v.onnx"), SampleConfig(), graph="velocity")
    graph = LFMPipeline.from_pretrained(dit, device="cpu", backend="onnxruntime", engine=str(tmp_path / "s.onnx"))
    torch.testing.assert_close(graph(**kw).images, ref, rtol=1e-4, atol=1e-4)
    assert graph(**{**kw, "num_inference_steps": None}).nfe == 6  # the graph's own recipe
    with pytest.raises(InputError, match="num_inference_steps=4: the graph .* was exported with steps=3"):
        graph(**{**kw, "num_inference_steps": 4})
    velocity = LFMPipeline.from_pretrained(dit, device="cpu", backend="onnxruntime", engine=str(tmp_path / "v.onnx"))
    torch.testing.assert_close(velocity(**kw).images, ref, rtol=1e-4, atol=1e-4)
    compiled = LFMPipeline.from_pretrained(dit, device="cpu", backend="compile")
    torch.testing.assert_close(compiled(**kw).images, ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(InputError, match="backend='onnxruntime' needs engine="):
        LFMPipeline.from_pretrained(dit, device="cpu", backend="onnxruntime")
    with pytest.raises(InputError, match="dtype='bf16': a graph runs in the dtype it was exported in"):
        LFMPipeline.from_pretrained(dit, device="cpu", dtype="bf16", backend="onnxruntime", engine=str(tmp_path / "s.onnx"))
