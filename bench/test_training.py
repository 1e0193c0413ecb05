"""Training step of DiT-S/2 on 4×32×32 latents (batch 16, bf16 autocast, AdamW): ours (eager and
torch.compile) beside diffusers' DiTTransformer2DModel of the same size, and the bf16 GEMM peak of
this machine measured at the model's own shapes (for MFU). FLOPs = 2 × multiply-adds, training ≈ 3 ×
forward, attention included; stated in `dit_train_flops`."""

import time

import pytest
import torch

from lfm_fast.flow import FlowConfig, flow_matching_loss
from lfm_fast.models.dit import build_dit

BATCH = 16


def dit_train_flops(hidden=384, depth=12, tokens=256, patch_channels=16) -> float:
    per_block = 2 * tokens * 12 * hidden * hidden + 4 * tokens * tokens * hidden
    embed = 2 * 2 * tokens * patch_channels * hidden
    return 3.0 * BATCH * (depth * per_block + embed)


class DiffusersPeer(torch.nn.Module):
    """diffusers' DiT with our call signature (velocity output, t ∈ [0, 1] scaled like ours)."""

    def __init__(self):
        super().__init__()
        from diffusers import DiTTransformer2DModel

        self.net = DiTTransformer2DModel(num_attention_heads=6, attention_head_dim=64, in_channels=4, out_channels=4,
                                         num_layers=12, sample_size=32, patch_size=2, num_embeds_ada_norm=1000)
        self.config = type("C", (), {"num_classes": 1000})()

    def forward(self, x, t, y=None, cond=None):
        return self.net(x, timestep=t * 1000, class_labels=y).sample


def make(kind):
    torch.manual_seed(0)
    if kind == "diffusers":
        return DiffusersPeer()
    model = build_dit("DiT-S/2", input_size=32, in_channels=4, num_classes=1000)
    return torch.compile(model) if kind == "ours_compile" else model


@pytest.mark.parametrize("kind", ["ours", "ours_compile", "diffusers"])
def test_train_step_dit_s2(benchmark, kind):
    model = make(kind)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x, y = torch.randn(BATCH, 4, 32, 32), torch.randint(0, 1000, (BATCH,))
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", torch.bfloat16):
            loss = flow_matching_loss(model, x, y, FlowConfig(), g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    step()
    benchmark.pedantic(step, rounds=3, iterations=1)
    s = benchmark.stats.stats.mean
    benchmark.extra_info.update(kind=kind, img_per_s=BATCH / s, tflops=dit_train_flops() / s / 1e12)


def test_bf16_gemm_peak(benchmark):
    """The peak that MFU is measured against: bf16 matmuls at DiT-S/2's token-wise linear shapes."""
    tokens, d = BATCH * 256, 384
    shapes = [(tokens, d, 3 * d), (tokens, d, d), (tokens, d, 4 * d), (tokens, 4 * d, d)]
    mats = [(torch.randn(m, k, dtype=torch.bfloat16), torch.randn(k, n, dtype=torch.bfloat16)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)

    def run():
        for a, b in mats:
            torch.mm(a, b)

    run()
    benchmark.pedantic(run, rounds=10, iterations=3)
    benchmark.extra_info.update(kind="gemm_peak", tflops=flops / benchmark.stats.stats.mean / 1e12)
