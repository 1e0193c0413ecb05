import pytest
import torch

from lfm_fast import ops
from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT, DiTConfig, build_dit
from tests.conftest import CONDITIONED, a_condition, perturbed


@pytest.mark.parametrize("name,paper", [("DiT-S/2", 33e6), ("DiT-B/2", 130e6), ("DiT-L/2", 458e6), ("DiT-XL/2", 675e6)])
def test_parameter_counts_match_the_dit_paper(name, paper):
    with torch.device("meta"):
        model = build_dit(name, input_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / paper - 1) < 0.01, count


def test_unknown_architecture_is_an_input_error():
    with pytest.raises(InputError, match="DiT-XL/3"):
        build_dit("DiT-XL/3")


def small(**kw):
    torch.manual_seed(0)
    cfg = dict(input_size=8, in_channels=4, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=5)
    return perturbed(DiT(DiTConfig(**{**cfg, **kw})))


def test_adaln_zero_init_outputs_zero_velocity():
    model = DiT(DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=5))
    v = model(torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 1, 5]))
    assert v.shape == (3, 4, 8, 8) and v.abs().max() == 0


@pytest.mark.parametrize("patch,kind", [(1, "none"), (2, "inpaint"), (4, "semantic")])
def test_output_shape_and_the_condition_reaching_the_output(patch, kind):
    model = small(patch_size=patch, **CONDITIONED[kind])
    x, c = torch.randn(2, 4, 8, 8), a_condition(kind, 2)
    t, y = torch.rand(2), torch.tensor([1, 2])
    v = model(x, t, y, c)
    assert v.shape == x.shape
    if c is None:
        return
    # only the condition changes: each part of it moves every sample's output (inpaint: the masked-image latent
    # and the hole mask separately; semantic: the map)
    parts = [slice(0, 4), slice(4, 5)] if kind == "inpaint" else [slice(None)]
    for part in parts:
        other = c.clone()
        other[:, part] = a_condition(kind, 2)[:, part]
        moved = (model(x, t, y, other) - v).flatten(1).abs().amax(1)
        assert (moved > 1e-3 * v.abs().max()).all(), (part, moved)
    with pytest.raises(ValueError, match="expects a condition"):
        model(x, t, None, None)


def test_condition_configs_are_checked():
    with pytest.raises(InputError, match="expected cond_channels=5"):
        small(condition="inpaint", cond_channels=3)
    with pytest.raises(InputError, match="semantic_classes ≥ 1"):
        small(condition="semantic", cond_channels=3)
    with pytest.raises(InputError, match="condition 'depth'"):
        small(condition="depth")


@pytest.mark.parametrize("kind", ["inpaint", "semantic"])
def test_cfg_on_a_condition_guides_against_the_null_condition(kind):
    """v = v(∅) + s·(v(c) − v(∅)) with ∅ the null label and the null condition (inpaint: all hole, latent 0;
    semantic: no class), in one batch."""
    from lfm_fast.models.cond import null_condition

    model = small(num_classes=0, **CONDITIONED[kind])
    x, t, c = torch.randn(3, 4, 8, 8), torch.rand(3), a_condition(kind, 3)
    null = null_condition(kind, c)
    assert (null[:, -1] == 1).all() and not null[:, :-1].any() if kind == "inpaint" else not null.any()
    v_c, v_u = model(x, t, None, c), model(x, t, None, null)
    assert ((v_c - v_u).flatten(1).abs().amax(1) > 1e-2 * v_c.abs().max()).all()  # else the check below cannot fail
    torch.testing.assert_close(model.forward_with_cfg(x, t, None, 2.5, c), v_u + 2.5 * (v_c - v_u), rtol=1e-5, atol=1e-5)


def test_cfg_scale_one_is_the_conditional_forward_and_scale_s_is_the_guided_combination():
    model = small()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 2, 4])
    v_c = model(x, t, y)
    v_u = model(x, t, torch.full_like(y, 5))
    assert ((v_c - v_u).flatten(1).abs().amax(1) > 1e-2 * v_c.abs().max()).all()  # the label matters to every row
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 1.0), v_c)
    torch.testing.assert_close(model.forward_with_cfg(x, t, y, 3.0), v_u + 3.0 * (v_c - v_u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model(x, t, None), v_u)  # no label = the null class


def test_time_and_label_change_the_output():
    model = small()
    x = torch.randn(2, 4, 8, 8)
    a = model(x, torch.tensor([0.2, 0.2]), torch.tensor([1, 1]))
    assert not torch.allclose(a, model(x, torch.tensor([0.7, 0.7]), torch.tensor([1, 1])), atol=1e-4)
    assert not torch.allclose(a, model(x, torch.tensor([0.2, 0.2]), torch.tensor([3, 3])), atol=1e-4)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = small(qk_norm=True)
    model.save_pretrained(str(tmp_path), meta={"autoencoder": "x"})
    loaded = DiT.from_pretrained(str(tmp_path)).eval()
    assert loaded.config == model.config
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(loaded(x, t, y), model(x, t, y), rtol=0, atol=0)


def test_kernel_backends_are_the_machines_choice_not_the_checkpoints(tmp_path):
    """A model run with the Triton kernels saves no backend into config.json, and a file that has one (0.2 wrote them)
    loads with `auto` unless the reader asks for another: the kernels follow the machine that runs the model."""
    import json

    model = small(attn_backend="triton", norm_backend="triton")
    model.save_pretrained(str(tmp_path))
    saved = json.load(open(tmp_path / "config.json"))
    assert not {"attn_backend", "norm_backend"} & set(saved["model"])
    saved["model"].update(attn_backend="triton", norm_backend="triton")
    json.dump(saved, open(tmp_path / "config.json", "w"))
    assert (DiT.from_pretrained(str(tmp_path)).config.attn_backend, DiT.from_pretrained(str(tmp_path)).config.norm_backend) == ("auto", "auto")
    assert DiT.from_pretrained(str(tmp_path), attn_backend="sdpa").config.attn_backend == "sdpa"


def test_the_reference_norms_are_fp32_and_compile_is_the_expression_in_the_input_dtype():
    """`reference` computes in fp32 and casts back (the definition the kernels are tested against); `compile` is the
    same expression in the input dtype, for inductor: equal in fp32, apart in bf16 by bf16's rounding only."""
    torch.manual_seed(0)
    x, shift, scale, gate, y = torch.randn(2, 5, 64), torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 64), torch.randn(2, 5, 64)
    exact = (ops.adaln_modulate(x.double(), shift.double(), scale.double(), "compile"),
             ops.gated_residual(x.double(), gate.double(), y.double(), "compile"))
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 0.05)):
        args = [t.to(dtype) for t in (x, shift, scale)]
        ref, com = ops.adaln_modulate(*args, backend="reference"), ops.adaln_modulate(*args, backend="compile")
        gref = ops.gated_residual(x.to(dtype), gate.to(dtype), y.to(dtype), "reference")
        assert ref.dtype == com.dtype == gref.dtype == dtype
        torch.testing.assert_close(ref.double(), exact[0], rtol=tol, atol=tol)
        torch.testing.assert_close(gref.double(), exact[1], rtol=tol, atol=tol)
        torch.testing.assert_close(com.double(), exact[0], rtol=4 * tol, atol=4 * tol)
    bf = [t.bfloat16() for t in (x, shift, scale)]
    ref_err = (ops.adaln_modulate(*bf, backend="reference").double() - exact[0]).abs().max()
    com_err = (ops.adaln_modulate(*bf, backend="compile").double() - exact[0]).abs().max()
    assert ref_err < com_err  # bf16 arithmetic in `compile`, one rounding at the end in `reference`


def test_from_pretrained_rejects_a_folder_that_is_not_a_checkpoint(tmp_path):
    with pytest.raises(InputError, match="config.json and model.safetensors"):
        DiT.from_pretrained(str(tmp_path))
    with pytest.raises(InputError, match="no such folder"):
        DiT.from_pretrained(str(tmp_path / "missing"))


def test_reference_backends_match_sdpa_and_each_other():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 32) for _ in range(3))
    torch.testing.assert_close(ops.attention(q, k, v, "reference"), ops.attention(q, k, v, "sdpa"), rtol=1e-5, atol=1e-5)
    a = small(attn_backend="reference")
    b = small(attn_backend="sdpa")
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=1e-5, atol=1e-5)


def test_math_attention_matches_the_reference_with_gradients():
    """fp32 to rounding; bf16 (what `auto` picks on CPU) within bf16's error of SDPA's own bf16 error."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 17, 32, requires_grad=True) for _ in range(3))
    do = torch.randn(2, 3, 17, 32)

    def run(backend, dtype):
        qs, ks, vs = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
        out = ops.attention(qs, ks, vs, backend)
        out.backward(do.to(dtype))
        return [out.float()] + [t.grad.float() for t in (qs, ks, vs)]

    ref = run("reference", torch.float32)
    for got, want in zip(run("math", torch.float32), ref):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, got, sdpa, want in zip("o dq dk dv".split(), run("auto", torch.bfloat16), run("sdpa", torch.bfloat16), ref):
        assert (got - want).abs().max() <= 2 * (sdpa - want).abs().max() + 1e-2, name


def test_adaln_modulate_matches_its_definition():
    x, shift, scale = torch.randn(2, 5, 16), torch.randn(2, 16), torch.randn(2, 16)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * (1 + scale[:, None]) + shift[:, None]
    torch.testing.assert_close(ops.adaln_modulate(x, shift, scale), expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown norm backend"):
        ops.adaln_modulate(x, shift, scale, backend="fast")


@pytest.mark.parametrize("kw", [dict(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=6),
                                dict(input_size=16, hidden_size=96, depth=3, num_heads=3, patch_size=4, condition="inpaint",
                                     cond_channels=5)])
def test_flop_formula_is_what_torch_counts(kw):
    """The MFU's FLOPs per image (train.throughput) against torch.utils.flop_counter on the network's own forward,
    attention as explicit matmuls (FlopCounterMode has no formula for the CPU SDPA kernel)."""
    from torch.utils.flop_counter import FlopCounterMode

    from lfm_fast.models.dit import set_backends
    from lfm_fast.train.throughput import forward_flops_per_image

    cfg = DiTConfig(**kw)
    model = set_backends(DiT(cfg).eval(), attn="math", norm="reference")
    cond = torch.zeros(2, cfg.in_channels + 1, cfg.input_size, cfg.input_size) if cfg.condition == "inpaint" else None
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randn(2, 4, cfg.input_size, cfg.input_size), torch.rand(2),
              torch.zeros(2, dtype=torch.long) if cfg.num_classes else None, cond)
    assert counter.get_total_flops() / 2 == forward_flops_per_image(cfg)


@pytest.mark.parametrize("kind", ["label", "inpaint"])
def test_guided_rows_alone_get_the_guided_combination_and_scale_one_is_one_plain_forward(kind):
    """`guided` (a guidance interval, each row its own time): its rows get v_u + s·(v_c − v_u), the others v_c, in
    one forward of the batch plus the guided rows; at scale 1 the call is the conditional forward itself, at batch n."""
    model = small() if kind == "label" else small(num_classes=0, **CONDITIONED["inpaint"])
    x, t = torch.randn(4, 4, 8, 8), torch.rand(4)
    y, c = (torch.tensor([0, 1, 2, 4]), None) if kind == "label" else (None, a_condition("inpaint", 4))
    from lfm_fast.models.cond import null_condition

    v_c = model(x, t, y, c)
    v_u = model(x, t, None if y is None else torch.full_like(y, 5), None if c is None else null_condition("inpaint", c))
    guided = torch.tensor([True, False, True, False])
    batches = []
    model.x_embedder.register_forward_hook(lambda m, args, out: batches.append(args[0].shape[0]))
    got = model.forward_with_cfg(x, t, y, 3.0, c, guided=guided)
    torch.testing.assert_close(got[guided], (v_u + 3.0 * (v_c - v_u))[guided], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[~guided], v_c[~guided], rtol=1e-6, atol=1e-6)
    assert batches == [6]
    assert torch.equal(model.forward_with_cfg(x, t, y, 1.0, c), model(x, t, y, c)) and batches[1:] == [4, 4]
    if kind == "label":  # no label to guide by: the unconditional forward, once
        assert torch.equal(model.forward_with_cfg(x, t, None, 3.0), model(x, t, None)) and batches[3:] == [4, 4]


def test_an_unlabelled_call_uses_the_null_class_on_the_models_device_and_bf16_weights_take_fp32_inputs():
    """y=None on a class-conditional model is the null class, made where the model lives (the meta device here
    stands for a GPU: a host-side index would fail there); a net with bf16 parameters and an fp32 position table (as
    FSDP2's bf16 compute casts it) takes fp32 latents, times and one-hot maps, and computes what its fp32 self does to
    bf16's precision."""
    model = small()
    x, t = torch.randn(3, 4, 8, 8), torch.rand(3)
    assert torch.equal(model(x, t, None), model(x, t, torch.full((3,), 5)))
    meta, labels = small().to("meta"), []
    meta.y_embedder.register_forward_pre_hook(lambda m, args: labels.append(args[0]))
    assert meta(x.to("meta"), t.to("meta"), None).shape == (3, 4, 8, 8)
    assert labels[0].device.type == "meta" and labels[0].dtype == torch.long and labels[0].shape == (3,)
    sem = small(**CONDITIONED["semantic"])
    c = a_condition("semantic", 3)
    want = sem(x, t, torch.tensor([0, 1, 2]), c)
    for p in sem.parameters():  # FSDP2's bf16 compute: the parameters cast, the buffers (the position table) not
        p.data = p.data.bfloat16()
    got = sem(x, t, torch.tensor([0, 1, 2]), c)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=0.05, atol=0.05 * want.abs().max().item())


def test_the_semantic_rescaler_is_an_average_of_each_cell_then_a_1x1_convolution():
    """Bilinear halving (align_corners=False) at exactly ½ averages each 2×2 block: `stages` of them are the average
    over each 2^stages cell, an independent way to the same map."""
    import torch.nn.functional as F

    from lfm_fast.models.cond import SpatialRescaler

    torch.manual_seed(0)
    enc = SpatialRescaler(num_classes=6, out_channels=3, stages=2)
    onehot = F.one_hot(torch.randint(0, 6, (2, 16, 16)), 6).permute(0, 3, 1, 2).float()
    torch.testing.assert_close(enc(onehot), enc.proj(F.avg_pool2d(onehot, 4)), rtol=1e-5, atol=1e-6)


def test_condition_settings_are_checked_at_their_bounds_with_the_expected_values_named():
    small(condition="semantic", cond_channels=1, semantic_classes=1)  # the least a semantic model may have
    small(condition="inpaint", cond_channels=5)  # the latent's 4 channels and the hole mask
    for kw, words in [({"condition": "inpaint", "cond_channels": 4}, "expected cond_channels=5$"),
                      ({"condition": "none", "cond_channels": 2}, "expected cond_channels=0$"),
                      ({"condition": "semantic", "cond_channels": 0, "semantic_classes": 3},
                       "expected cond_channels=≥ 1 and semantic_classes ≥ 1"),
                      ({"condition": "semantic", "cond_channels": 2, "semantic_classes": 0}, "semantic_classes ≥ 1"),
                      ({"condition": "depth"}, "condition 'depth': expected one of none, inpaint, semantic")]:
        with pytest.raises(InputError, match=words):
            small(**kw)
