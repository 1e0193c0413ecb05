import torch

from lfm_fast.models.dit import DiT, DiTConfig, build_dit
from tests.conftest import perturbed


def forward_backward(model, x, t, y, call=None):
    model.zero_grad(set_to_none=True)
    out = (model if call is None else call)(x, t, y)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_dit_s2_triton_backend_matches_reference_forward_and_backward():
    # DiT-S/2 at a 16×16 latent (64 tokens, head dim 64), two images: the interpreter keeps this small
    torch.manual_seed(0)
    ref = perturbed(build_dit("DiT-S/2", input_size=16, num_classes=10, attn_backend="reference", norm_backend="reference"), 0.02)
    tri = build_dit("DiT-S/2", input_size=16, num_classes=10, attn_backend="triton", norm_backend="triton")
    tri.load_state_dict(ref.state_dict())
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([0.3, 0.8]), torch.tensor([1, 10])
    out_r, grads_r = forward_backward(ref, x, t, y)
    out_t, grads_t = forward_backward(tri, x, t, y)
    torch.testing.assert_close(out_t, out_r, rtol=1e-4, atol=1e-4)
    for name, gr in grads_r.items():
        scale = gr.abs().max().item() + 1e-6
        assert (grads_t[name] - gr).abs().max().item() <= 1e-3 * scale, name


def test_compile_fullgraph_has_no_graph_breaks_with_the_fused_ops():
    torch._dynamo.reset()
    cfg = DiTConfig(input_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=5, attn_backend="triton", norm_backend="triton")
    model = perturbed(DiT(cfg), 0.02)
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 5])
    explanation = torch._dynamo.explain(model)(x, t, y)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    ops_in_graph = {str(n.target) for g in explanation.graphs for n in g.graph.nodes if n.op == "call_function"}
    assert any("lfm_fast.flash_attention" in o for o in ops_in_graph)
    assert any("lfm_fast.gated_residual_modulate" in o for o in ops_in_graph)
    # forward and backward through AOTAutograd use the ops' fake implementations and registered autograd
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out_c, grads_c = forward_backward(model, x, t, y, call=compiled)
    out_e, grads_e = forward_backward(model, x, t, y)
    torch.testing.assert_close(out_c, out_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name])
