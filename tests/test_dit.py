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
