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
MEASURED: dict = {}  # (network, precision, activation checkpointing, depth, batch) → (saved bytes, parameters)


def measured_once(measure):
    """`dryrun._measure`, whose activations and parameters (bf16 forwards: ~7 s a preset on a CPU without bf16) are
    taken from an earlier preset with the same network and precision: ffhq, church and bedroom differ from
    celebahq256-dit-l2 in their data, batch and schedule only, which a forward at batch 1 and 2 does not see."""
    def wrapped(cfg, depth, batch, steps, time_precision):
        key = (repr(cfg.model), cfg.train.precision, cfg.train.activation_checkpointing, depth, batch)
        if steps == 0 and key in MEASURED:
            return MEASURED[key][0], 0.0, MEASURED[key][1]
        saved, seconds, params = measure(cfg, depth, batch, steps, time_precision)
        MEASURED[key] = saved, params
        return saved, seconds, params
    return wrapped


@pytest.mark.parametrize("name", PRESETS)
def test_dry_run_of_every_paper_experiment(name, capsys, tmp_path, monkeypatch):
    from lfm_fast.train import dryrun

    seen = []
    monkeypatch.setattr(dryrun, "format_dry_run", lambda r, f=dryrun.format_dry_run: seen.append(r) or f(r))
    steps = 1 if name in TIMED else 0  # CI time
    monkeypatch.setattr(dryrun, "dry_run", lambda cfg, batch, f=dryrun.dry_run: f(cfg, batch, steps=steps))
    monkeypatch.setattr(dryrun, "_measure", measured_once(dryrun._measure))
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
