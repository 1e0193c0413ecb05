"""Training step throughput on CPU: the demo model, fp32 vs bf16 autocast.

Run with `make bench`; compare rows within one run (these machines are noisy), never across runs.
"""

import pytest
import torch

from lfm_fast.config import get_preset
from lfm_fast.flow import flow_matching_loss
from lfm_fast.models.dit import DiT


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_step_shapes_tiny(benchmark, precision):
    cfg = get_preset("small-data")
    cfg.model.num_classes = 6
    model = DiT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    bs = cfg.train.batch_size
    x0, y = torch.randn(bs, 4, 8, 8), torch.randint(0, 6, (bs,))
    g = torch.Generator().manual_seed(0)

    def step():
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
            loss = flow_matching_loss(model, x0, y, cfg.flow, g, 0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()
    benchmark.pedantic(step, rounds=10, iterations=1)
    benchmark.extra_info.update(batch=bs, img_per_s=bs / benchmark.stats.stats.mean)
