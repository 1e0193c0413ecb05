import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from lfm_fast.config import get_preset
from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT
from lfm_fast.train.checkpoint import latest_checkpoint, read_checkpoint_tensors
from lfm_fast.train.loop import train


def tiny_config(steps=20, precision="fp32"):
    cfg = get_preset("small-data")
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads, cfg.model.num_classes = 32, 2, 2, 3
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = steps, 8, 5, 10
    cfg.train.precision, cfg.train.warmup_steps = precision, 3
    return cfg


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_is_bit_identical_to_an_uninterrupted_run(random_latents, tmp_path, precision):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(tiny_config(precision=precision), random_latents, straight, progress=False)
    train(tiny_config(precision=precision), random_latents, resumed, stop_at=10, progress=False)
    train(tiny_config(precision=precision), random_latents, resumed, resume=True, progress=False)
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ta, tb = (json.load(open(os.path.join(latest_checkpoint(r), "trainer.json"))) for r in (straight, resumed))
    assert ta["step"] == tb["step"] == 20 and ta["data_position"] == tb["data_position"] == 20 * 8
    ma, mb = read_checkpoint_tensors(latest_checkpoint(straight)), read_checkpoint_tensors(latest_checkpoint(resumed))
    assert ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)
    steps = [json.loads(line)["step"] for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert steps == [5, 10, 15, 20]
    la = [json.loads(line)["loss"] for line in open(os.path.join(straight, "metrics.jsonl"))]
    lb = [json.loads(line)["loss"] for line in open(os.path.join(resumed, "metrics.jsonl"))]
    assert la == lb


def test_training_learns_and_writes_an_inference_checkpoint(random_latents, tmp_path):
    out = str(tmp_path / "run")
    cfg = tiny_config(steps=120)
    cfg.train.lr, cfg.train.log_every = 3e-3, 20
    train(cfg, random_latents, out, progress=False)
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert {"step", "loss", "img_per_s", "lr"} <= metrics[0].keys()
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    model = DiT.from_pretrained(out)
    state = read_checkpoint_tensors(latest_checkpoint(out))
    ema = {k.removeprefix("ema."): v for k, v in state.items() if k.startswith("ema.")}
    assert ema.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    assert model.config.input_size == 8 and model.config.num_classes == 3  # taken from the latents
    meta = json.load(open(os.path.join(out, "config.json")))["meta"]
    assert meta["experiment"]["train"]["steps"] == 120


def test_train_refuses_to_overwrite_or_resume_nothing(random_latents, tmp_path):
    with pytest.raises(InputError, match="no complete checkpoint"):
        train(tiny_config(), random_latents, str(tmp_path / "new"), resume=True, progress=False)
    train(tiny_config(steps=2), random_latents, str(tmp_path / "run"), progress=False)
    with pytest.raises(InputError, match="--resume"):
        train(tiny_config(steps=2), random_latents, str(tmp_path / "run"), progress=False)
    cfg = tiny_config()
    cfg.model.num_classes = 7
    with pytest.raises(InputError, match="model.num_classes=7"):
        train(cfg, random_latents, str(tmp_path / "other"), progress=False)


def test_a_nonfinite_step_is_skipped_and_counted(random_latents, tmp_path, monkeypatch):
    """A NaN loss at step 7 leaves weights, optimizer state and EMA as they were after step 6; step 8 goes on."""
    ref, hit = str(tmp_path / "ref"), str(tmp_path / "nan")
    train(tiny_config(steps=6), random_latents, ref, progress=False)
    monkeypatch.setenv("LFM_FAST_FAULT", "nan:7")
    train(tiny_config(steps=6), random_latents, hit, progress=False)
    train(tiny_config(steps=7), random_latents, hit, resume=True, progress=False)
    a, b = read_checkpoint_tensors(latest_checkpoint(ref)), read_checkpoint_tensors(latest_checkpoint(hit))
    same = [k for k in a if not k.startswith("optim.param_groups")]
    assert all(torch.equal(a[k], b[k]) for k in same)  # step 7 changed nothing (its lr step aside)
    metrics = [json.loads(line) for line in open(os.path.join(hit, "metrics.jsonl"))]
    assert metrics[-1]["step"] == 7 and metrics[-1]["nonfinite_steps"] == 1 and metrics[0]["nonfinite_steps"] == 0
    assert json.load(open(os.path.join(latest_checkpoint(hit), "trainer.json")))["nonfinite_steps"] == 1
    train(tiny_config(steps=9), random_latents, hit, resume=True, progress=False)  # finite again: it trains on
    assert not torch.equal(read_checkpoint_tensors(latest_checkpoint(hit))["model.blocks.0.mlp.0.weight"],
                           a["model.blocks.0.mlp.0.weight"])


def test_a_diverged_run_stops_with_one_line_and_keeps_its_finite_checkpoint(random_latents, tmp_path, capsys, monkeypatch):
    from lfm_fast.cli import main

    out = str(tmp_path / "run")
    args = ["train", "--latents", random_latents, "--preset", "small-data", "--out", out, "--steps", "30", "model.hidden_size=32",
            "model.depth=2", "model.num_heads=2", "train.batch_size=8", "train.ckpt_every=10", "train.max_nonfinite_steps=4"]
    monkeypatch.setenv("LFM_FAST_FAULT", "nan:13-30")
    assert main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "lfm-fast" in line]  # (the progress bar aside)
    assert len(err) == 1 and err[0].startswith("lfm-fast: error: step 16: 4 steps in a row had a non-finite loss"), err
    assert json.load(open(os.path.join(latest_checkpoint(out), "trainer.json")))["step"] == 10
    state = read_checkpoint_tensors(latest_checkpoint(out))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


CLI_TINY = ["--preset", "small-data", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.num_classes=3",
            "train.batch_size=8", "train.log_every=5", "train.ckpt_every=10", "train.warmup_steps=3"]


def test_resume_reads_the_saved_config_and_refuses_what_would_make_another_run(random_latents, tmp_path, capsys):
    """`--resume` alone continues the run as configured (no overrides repeated) and matches the straight run;
    a shape change is refused naming the field and both values; lr and steps may change, and are logged."""
    from lfm_fast.cli import main

    straight, run = str(tmp_path / "straight"), str(tmp_path / "run")
    train(tiny_config(), random_latents, straight, progress=False)
    base = ["train", "--latents", random_latents, "--out", run]
    assert main([*base, "--steps", "20", "--stop-at", "10", *CLI_TINY]) == 0
    capsys.readouterr()
    listing = sorted(os.listdir(run))
    code = main([*base, "--resume", "model.hidden_size=64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == (f"lfm-fast: error: --resume: model.hidden_size=64 but the run was trained with 32; a resumed "
                                 f"run keeps its model, data and batch: drop the override, or start a new run"), err
    for bad, words in ((["--preset", "imagenet256-dit-b2"], "trained with preset 'small-data'"),
                       (["train.batch_size=16"], "train.batch_size=16 but the run was trained with 8"),
                       (["--steps", "5"], "it is at step 10); pass --steps above 10")):
        assert main([*base, "--resume", *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and words in err, err
    assert sorted(os.listdir(run)) == listing and trainer_step(run) == 10
    assert main([*base, "--resume"]) == 0  # the saved config: CLI_TINY is not repeated
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(run, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    assert main([*base, "--resume"]) == 2 and "has reached train.steps=20" in capsys.readouterr().err
    assert main([*base, "--resume", "--steps", "30", "train.lr=1e-3"]) == 0
    assert "resuming " + run + " at step 20 with train.steps 20 → 30; train.lr 0.004 → 0.001" in capsys.readouterr().err
    lrs = {m["step"]: m["lr"] for m in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}
    import math
    assert lrs[25] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (25 - 3) / (30 - 3))))  # the new lr and horizon


def trainer_step(run):
    return json.load(open(os.path.join(latest_checkpoint(run), "trainer.json")))["step"]


def test_async_checkpoints_resume_exactly_and_keep_the_newest(random_latents, tmp_path):
    """dcp.async_save: training goes on while a thread writes the shards (of a copy of the state), so the resumed
    run is still the straight one bit for bit; keep_checkpoints prunes all but the newest N; a time interval
    checkpoints as well (1e-9 minutes, 60 ns: after every step; 1e-4 minutes, 6 ms, missed a tiny step 1 in about
    1 run in 2 here)."""
    straight, resumed, timed = str(tmp_path / "straight"), str(tmp_path / "resumed"), str(tmp_path / "timed")
    train(tiny_config(), random_latents, straight, progress=False)
    cfg = tiny_config()
    cfg.train.async_checkpoint, cfg.train.ckpt_every, cfg.train.keep_checkpoints = "true", 3, 3
    train(cfg, random_latents, resumed, stop_at=10, progress=False)
    assert sorted(os.listdir(os.path.join(resumed, "checkpoints"))) == ["latest", "step_00000006", "step_00000009",
                                                                        "step_00000010"]
    train(cfg, random_latents, resumed, resume=True, progress=False)
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ma, mb = read_checkpoint_tensors(latest_checkpoint(straight)), read_checkpoint_tensors(latest_checkpoint(resumed))
    assert all(torch.equal(ma[k], mb[k]) for k in ma if not k.startswith("optim.param_groups"))
    cfg = tiny_config(steps=4)
    cfg.train.ckpt_every, cfg.train.ckpt_every_minutes, cfg.train.keep_checkpoints = 0, 1e-9, 10
    train(cfg, random_latents, timed, progress=False)
    assert sorted(os.listdir(os.path.join(timed, "checkpoints")))[1:] == [f"step_0000000{i}" for i in (1, 2, 3, 4)]


def test_a_checkpoint_commit_is_fsynced_and_never_waits_at_a_barrier(random_latents, tmp_path, monkeypatch):
    """Every file and folder of a commit is fsynced after it is written and before `latest` names it; the commit
    and the pruning run off the training thread (other ranks are never held for them)."""
    import threading

    import torch.distributed as dist

    from lfm_fast import fileio

    synced, threads = [], set()
    real = fileio.fsync_path
    monkeypatch.setattr(fileio, "fsync_path", lambda p: (synced.append((os.path.relpath(p, tmp_path),
                                                                        threading.current_thread().name)), real(p))[1])
    monkeypatch.setattr("lfm_fast.train.checkpoint.fsync_path", fileio.fsync_path)
    monkeypatch.setattr(dist, "barrier", lambda *a, **k: threads.add(threading.current_thread().name))
    cfg = tiny_config(steps=3)
    cfg.train.ckpt_every = 0
    train(cfg, random_latents, str(tmp_path / "run"), progress=False)
    ckpt = [p for p, _ in synced if "checkpoints" in p]
    assert ckpt == ["run/checkpoints/step_00000003.tmp/rng.pt", "run/checkpoints/step_00000003.tmp/.trainer.json.tmp-%d" % os.getpid(),
                    "run/checkpoints/step_00000003.tmp", "run/checkpoints/step_00000003.tmp",
                    "run/checkpoints/.latest.tmp-%d" % os.getpid(), "run/checkpoints"], ckpt
    assert not any(t.startswith("checkpoint-") for t in threads)
    committers = {t for p, t in synced if "checkpoints" in p}
    assert committers == {"checkpoint-step_00000003"}, committers  # the commit is off the training thread


@pytest.mark.parametrize("condition", ["inpaint", "semantic"])
def test_conditional_training_resumes_exactly(tmp_path, condition):
    """The condition (and, for inpainting, which stored mask each sample uses, and the condition drops) comes from
    the step's seed: a resumed run is the straight one bit for bit. The rescaler is trained with the net."""
    from tests.conftest import write_random_latents

    latents = str(tmp_path / "latents")
    write_random_latents(latents, conditions=True)

    def config():
        cfg = get_preset(f"shapes-{condition}")
        cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
        cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = 12, 8, 4, 6
        cfg.train.cond_dropout = 0.3
        return cfg

    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train(config(), latents, straight, progress=False)
    train(config(), latents, resumed, stop_at=6, progress=False)
    train(config(), latents, resumed, resume=True, progress=False)
    a, b = load_file(os.path.join(straight, "model.safetensors")), load_file(os.path.join(resumed, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    model = DiT.from_pretrained(straight)
    assert model.config.condition == condition and model.config.cond_shape == ((5, 8, 8) if condition == "inpaint" else (5, 16, 16))
    if condition == "semantic":
        init = DiT(model.config)
        init.initialize_weights(seed=0)
        assert not torch.equal(a["cond_encoder.proj.weight"], init.cond_encoder.proj.weight.detach())
    with pytest.raises(InputError, match="carry no inpaint conditions"):
        write_random_latents(str(tmp_path / "plain"))
        train(get_preset("shapes-inpaint"), str(tmp_path / "plain"), str(tmp_path / "x"), progress=False)


def wandb_history(folder: str) -> list[dict]:
    """The logged rows of every offline wandb run under `folder`, read from its .wandb files: LevelDB's log format
    (after a 7-byte ':W&B' header, 32 KiB blocks of records, each with a 7-byte header: crc, length, type) holding
    wandb's protobuf Records."""
    import glob

    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(glob.glob(os.path.join(folder, "offline-run-*", "run-*.wandb"))):
        data, pos, part = open(path, "rb").read(), 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
            if left < 7 or (length == 0 and kind == 0):  # the padded end of a block
                pos += left
                continue
            part, pos = part + data[pos + 7:pos + 7 + length], pos + 7 + length
            if kind in (1, 4):  # FULL, LAST
                record = wandb_internal_pb2.Record()
                record.ParseFromString(part)
                if record.WhichOneof("record_type") == "history":
                    rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item})
                part = b""
    return rows


def test_tensorboard_and_wandb_hold_the_metrics_and_the_sample_grid_across_a_resume(tiny_pipeline, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = get_preset("small-data")
    cfg.model.hidden_size, cfg.model.depth, cfg.model.num_heads = 32, 2, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every, cfg.train.ckpt_every = 6, 16, 2, 2
    cfg.train.log = "jsonl,tensorboard,wandb" if importlib.util.find_spec("wandb") else "jsonl,tensorboard"
    out = str(tmp_path / "run")
    latents = str(tiny_pipeline / "latents")
    train(cfg, latents, out, stop_at=4, progress=False)
    train(cfg, latents, out, resume=True, progress=False)
    events = EventAccumulator(os.path.join(out, "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    metrics = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [m["step"] for m in metrics] == [2, 4, 6]
    assert [e.value for e in loss] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
    assert {"train/lr", "train/mfu", "train/grad_norm"} <= set(events.Tags()["scalars"])
    image = events.Images("samples")[-1]
    assert image.step == 6 and image.width > 0 and image.encoded_image_string[:4] == b"\x89PNG"
    if "wandb" in cfg.train.log:  # one wandb run (its id kept in the run folder), continued by the resume
        rows = [r for r in wandb_history(os.path.join(out, "wandb")) if "train/loss" in r]
        assert [r["_step"] for r in rows] == [2, 4, 6]
        assert [r["train/loss"] for r in rows] == pytest.approx([m["loss"] for m in metrics], rel=1e-6)
        assert {p.name.rsplit("-", 1)[-1] for p in (tmp_path / "run" / "wandb").glob("offline-run-*")} == {
            (tmp_path / "run" / "wandb" / "run_id").read_text()}
        grids = [r for r in wandb_history(os.path.join(out, "wandb")) if "samples/_type" in r]  # nested keys: a/b
        assert grids[-1]["_step"] == 6 and grids[-1]["samples/_type"] == "image-file"
        assert grids[-1]["samples/width"] == image.width and grids[-1]["samples/path"].endswith(".png")
    cfg.train.log = "jsonl,mlflow"
    with pytest.raises(InputError, match="train.log='jsonl,mlflow': expected a comma-separated list of jsonl, tensorboard, wandb"):
        from lfm_fast.config import validate

        validate(cfg)


def test_a_benchmark_run_saves_nothing_and_says_so(random_latents, tmp_path, capsys, monkeypatch):
    """train.save_checkpoints=false: metrics and grids only, no checkpoint and no weights, and no --resume offered; a
    run that diverges before its first checkpoint does not send the user to one either."""
    from lfm_fast.cli import main

    out = tmp_path / "bench"
    assert main(["train", "--latents", random_latents, "--out", str(out), "--steps", "4", "--stop-at", "2", *CLI_TINY,
                 "train.save_checkpoints=false"]) == 0
    assert "step 2 of 4 (--stop-at), loss" in capsys.readouterr().out.strip().splitlines()[-1]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["metrics.jsonl"]
    assert main(["train", "--latents", random_latents, "--out", str(tmp_path / "full"), "--steps", "4", *CLI_TINY,
                 "train.save_checkpoints=false"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith("; no checkpoint or weights (train.save_checkpoints=false)") and "--resume" not in last
    assert not (tmp_path / "full" / "model.safetensors").exists() and not (tmp_path / "full" / "checkpoints").exists()
    monkeypatch.setenv("LFM_FAST_FAULT", "nan:2-30")
    assert main(["train", "--latents", random_latents, "--out", str(tmp_path / "nan"), "--steps", "30", *CLI_TINY,
                 "train.max_nonfinite_steps=3"]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if "lfm-fast" in line]
    assert err == ["lfm-fast: error: step 4: 3 steps in a row had a non-finite loss or gradient (train.max_nonfinite_steps=3); "
                   "stopped. Lower train.lr, or start again (no checkpoint was written yet)"], err


def test_a_training_step_is_clipping_adamw_with_decay_on_matrices_and_the_warmed_up_ema():
    """train_step against the arithmetic written out: the gradient clipped to norm `grad_clip`, AdamW (β = 0.9, 0.999,
    ε = 1e-8) with decoupled weight decay on the weight matrices only (not biases, norms, embeddings), then
    ema ← ema + (1 − d)·(θ − ema), d = min(ema_decay, (1 + step) / (10 + step)), over steps whose decay is warming
    up (0, 1) and saturated (40)."""
    import copy

    from lfm_fast.flow import draw_flow, flow_matching_loss
    from lfm_fast.train.ema import create_ema
    from lfm_fast.train.step import MicroBatch, NonfiniteSteps, make_optimizer, optimizer_step
    from tests.conftest import perturbed

    cfg = tiny_config()
    cfg.model.input_size, cfg.model.in_channels = 8, 4
    cfg.train.grad_clip, cfg.train.weight_decay, cfg.train.ema_decay, cfg.train.lr = 0.05, 0.3, 0.9, 1e-2
    torch.manual_seed(0)
    model = perturbed(DiT(cfg.model)).train()
    optimizer, ema = make_optimizer(model, cfg.train), create_ema(model)
    decayed = {n for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n}
    assert "blocks.0.attn.qkv.weight" in decayed and "x_embedder.weight" in decayed
    assert not decayed & {"y_embedder.embedding_table.weight", "blocks.0.attn.qkv.bias", "t_embedder.mlp.0.bias"}
    ref = copy.deepcopy(model)
    theta = {n: p.detach().clone() for n, p in ref.named_parameters()}
    m, v = ({n: torch.zeros_like(p) for n, p in theta.items()} for _ in range(2))
    ref_ema = {n: p.clone() for n, p in theta.items()}
    health = NonfiniteSteps(torch.device("cpu"), 0, 5)
    g = torch.Generator().manual_seed(1)
    for k, step in enumerate([0, 1, 40]):
        x0, y = torch.randn(8, 4, 8, 8, generator=g), torch.randint(0, 3, (8,), generator=g)
        draws = draw_flow(8, (4, 8, 8), cfg.flow, g, cfg.train.label_dropout)
        loss, norm = optimizer_step(model, optimizer, ema, [MicroBatch(x0, y, None, draws)], cfg, step, health)
        ref.zero_grad()
        flow_matching_loss(ref, x0, y, cfg.flow, label_dropout=cfg.train.label_dropout, draws=draws).backward()
        grads = {n: p.grad for n, p in ref.named_parameters()}
        total = torch.sqrt(sum((gr.double() ** 2).sum() for gr in grads.values()))
        assert norm.item() == pytest.approx(total.item(), rel=1e-5) and total > 2 * cfg.train.grad_clip  # clipping acts
        d = min(0.9, (1 + step) / (10 + step))
        with torch.no_grad():
            for n, p in ref.named_parameters():
                gr = grads[n] * (cfg.train.grad_clip / total.float())
                m[n] = 0.9 * m[n] + 0.1 * gr
                v[n] = 0.999 * v[n] + 0.001 * gr ** 2
                wd = cfg.train.weight_decay if n in decayed else 0.0
                p.mul_(1 - cfg.train.lr * wd)
                p.sub_(cfg.train.lr * (m[n] / (1 - 0.9 ** (k + 1))) / ((v[n] / (1 - 0.999 ** (k + 1))).sqrt() + 1e-8))
                ref_ema[n] = d * ref_ema[n] + (1 - d) * p
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, dict(ref.named_parameters())[n], rtol=1e-4, atol=2e-5, msg=lambda s: f"{n} at step {step}: {s}")
            torch.testing.assert_close(ema[n], ref_ema[n], rtol=1e-4, atol=2e-5, msg=n)


def test_the_ema_decay_warms_up_and_the_update_is_a_lerp_by_one_minus_it():
    from lfm_fast.train.ema import create_ema, ema_decay_at, update_ema

    assert [ema_decay_at(s, 0.9999) for s in (0, 1, 8)] == [1 / 10, 2 / 11, 9 / 18]
    assert ema_decay_at(100_000, 0.9999) == 0.9999 and ema_decay_at(10_000, 0.9999) == 10_001 / 10_010
    assert ema_decay_at(8991, 0.999) == 0.999 and ema_decay_at(8990, 0.999) == 8991 / 9000
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    compiled = torch.compile(model, backend="eager")  # its parameters are named _orig_mod.0.weight
    ema = create_ema(compiled)
    assert list(ema) == ["0.weight", "0.bias"] and all(not v.requires_grad for v in ema.values())
    start = {k: v.clone() for k, v in ema.items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    update_ema(ema, compiled, 0.25)
    update_ema(ema, compiled, torch.tensor(0.5))  # the training step's weight: a 0-dim tensor
    for k, p in zip(ema, model.parameters()):
        # after the first: start + 0.25·(θ − start) = θ − 0.75; after the second: halfway to θ, θ − 0.375
        torch.testing.assert_close(ema[k], p.detach() - 0.375, rtol=0, atol=1e-6)
        torch.testing.assert_close(ema[k], start[k] + 0.625, rtol=0, atol=1e-6)
