"""`lfm-fast train --preset NAME --dry-run` for every paper experiment: the preset's model and data pipeline on
random latents, its size and cost, one real training step (at batch 1 here, so CI stays fast)."""

import pytest

from lfm_fast.cli import main

# DiT's published sizes (Peebles & Xie, table 4: parameters with learn_sigma's 8 output channels, GFLOPs counted as
# multiply-adds) → ours: 4 output channels (LFM predicts a velocity), 2 FLOPs per multiply-add
DIT = {"DiT-B/2": (130e6, 23.01), "DiT-L/2": (458e6, 80.71), "DiT-XL/2": (675e6, 118.64)}
PRESETS = {"celebahq256-dit-l2": "DiT-L/2", "ffhq256-dit-l2": "DiT-L/2", "church256-dit-l2": "DiT-L/2",
           "bedroom256-dit-l2": "DiT-L/2", "imagenet256-dit-b2": "DiT-B/2", "celebahq256-inpaint": "DiT-L/2",
           "celebahq256-semantic": "DiT-L/2", "imagenet256-dit-xl2": "DiT-XL/2"}


# one timed training step for each distinct network: the other DiT-L/2 presets differ from celebahq256-dit-l2 in their
# data and batch only, so their batch-1 step is that one's computation (their dry runs do everything else)
TIMED = {"celebahq256-dit-l2", "imagenet256-dit-b2", "celebahq256-inpaint", "celebahq256-semantic", "imagenet256-dit-xl2"}


@pytest.mark.parametrize("name", PRESETS)
def test_dry_run_of_every_paper_experiment(name, capsys, tmp_path, monkeypatch):
    from lfm_fast.train import dryrun

    seen = []
    monkeypatch.setattr(dryrun, "format_dry_run", lambda r, f=dryrun.format_dry_run: seen.append(r) or f(r))
    steps = 1 if name in TIMED else 0  # CI time
    monkeypatch.setattr(dryrun, "dry_run", lambda cfg, batch, f=dryrun.dry_run: f(cfg, batch, steps=steps))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--preset", name, "--dry-run", "--dry-run-batch", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{name}: ") and "H100-hours" in out and "64 GPUs" in out
    assert list(tmp_path.iterdir()) == []  # nothing written
    r = seen[0]
    params, gflops = DIT[PRESETS[name]]
    assert abs(r["params"] / params - 1) < 0.01 and abs(r["forward_gflops_per_image"] / (2 * gflops) - 1) < 0.02
    mem = r["memory_per_gpu"]
    assert mem[1]["micro_batch"] == r["batch"] and mem[64]["states_gib"] == pytest.approx(mem[1]["states_gib"] / 64)
    assert 0 < r["activation_mib_per_image"] and (r["step_seconds_here"] > 0) == (name in TIMED)
