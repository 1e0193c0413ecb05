"""FSDP2 training and distributed sampling with real process groups: torchrun, 1 or 2 CPU processes, gloo.

Every multi-rank run here is torchrun in a subprocess, through `python -m lfm_fast.launch` (torchrun as `--nproc` runs
it, ending without Python's module teardown) or as the README writes it (`python -m torch.distributed.run`, the
two-agent test); one thread per process, so 1-rank and 2-rank runs do their arithmetic alike."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lfm_fast.train.checkpoint import latest_checkpoint, read_checkpoint_tensors
from tests.conftest import write_random_latents

STEPS = 12
TINY = ["--preset", "small-data", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "model.num_classes=3",
        "train.batch_size=8", "train.log_every=1", "train.ckpt_every=4", "train.warmup_steps=3", "train.lr=3e-3",
        "data.flip=true", "data.posterior=sample"]  # the paper's augmentation: its draws, too, must not depend on the ranks
BF16_RTOL = 1e-3  # bf16 compute: 1 vs 2 ranks differ by reduction order (bench/fsdp_parity.py: ≤ 1e-4 relative)


def torchrun(nproc: int, *args: str, fault: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    env.pop("LFM_FAST_FAULT", None)
    if fault:
        env["LFM_FAST_FAULT"] = fault
    cmd = [sys.executable, "-m", "lfm_fast.launch", "--standalone", f"--nproc_per_node={nproc}", "-m", "lfm_fast", "--", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed ({res.returncode}):\n{res.stderr[-3000:]}")
    return res


def here(*args: str) -> None:
    """A 1-rank run in this process, one thread like a torchrun worker (`lfm-fast` makes the same group of one that
    torchrun's single worker joins, and the same FSDP2 wrapping): the launch's ~8 s of process start saved."""
    from lfm_fast.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(list(args)) == 0, args
    finally:
        torch.set_num_threads(threads)


def train_run(latents, out, nproc, *extra, **kw):
    args = ("train", "--latents", latents, "--out", str(out), "--steps", str(STEPS), *TINY, *extra)
    return here(*args) if nproc == 1 and not kw else torchrun(nproc, *args, **kw)


def losses(run) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, open(os.path.join(run, "metrics.jsonl")))}


def trainer_state(run) -> dict:
    return json.load(open(os.path.join(latest_checkpoint(str(run)), "trainer.json")))


def weights_close(a, b, rtol=0.0, atol=0.0):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=rtol, atol=atol, msg=k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted reference runs, made once: (precision, ranks, grad_accum) → run folder."""
    root = tmp_path_factory.mktemp("dist")
    latents = str(root / "latents")
    write_random_latents(latents, n=64, num_classes=3, autoencoder="builtin:shapes")  # (its 4×8×8 latents: previews)
    out = {"latents": latents}
    for precision, nproc, accum in [("fp32", 1, 1), ("fp32", 2, 1), ("fp32", 2, 2), ("bf16", 1, 1), ("bf16", 2, 1)]:
        folder = root / f"{precision}-{nproc}x{accum}"
        preview = ["train.sample_every=6"] if (precision, accum) == ("fp32", 1) else []  # a gather and a barrier mid-run
        train_run(latents, folder, nproc, f"train.precision={precision}", f"train.grad_accum={accum}", *preview)
        out[precision, nproc, accum] = str(folder)
    return out


def test_one_and_two_ranks_agree_on_the_same_global_batch(runs):
    one, two, two_accum = (losses(runs["fp32", *k]) for k in [(1, 1), (2, 1), (2, 2)])
    assert list(one) == list(two) == list(range(1, STEPS + 1))
    # fp32: equal up to summation order (a mean of 8 vs a mean of two means of 4, and the gradient reduction)
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-5)
    np.testing.assert_allclose(list(two_accum.values()), list(one.values()), rtol=1e-5)
    assert one[1] == pytest.approx(two[1], rel=1e-6)  # step 1 also shows the sharded init equals the 1-rank one
    weights_close(runs["fp32", 1, 1], runs["fp32", 2, 1], rtol=1e-4, atol=1e-5)
    b1, b2 = losses(runs["bf16", 1, 1]), losses(runs["bf16", 2, 1])
    np.testing.assert_allclose(list(b2.values()), list(b1.values()), rtol=BF16_RTOL)
    assert trainer_state(runs["fp32", 2, 2])["data_position"] == STEPS * 8
    # train.sample_every=6: rank 0 draws the EMA weights gathered from every rank's shards mid-run, as one rank does
    # (and the runs resumed in the tests below, which draw none, still match these bit for bit: a preview takes
    # nothing from the training's state)
    from PIL import Image

    one, two = (np.asarray(Image.open(os.path.join(runs["fp32", n, 1], "samples_000006.png")), int) for n in (1, 2))
    assert one.shape == two.shape and np.abs(one - two).max() <= 2 and one.std() > 10
    assert not os.path.exists(os.path.join(runs["fp32", 2, 2], "samples_000006.png"))


def test_a_kill_during_a_save_then_a_kill9_mid_training_each_resume_exactly(runs, tmp_path):
    """SIGKILL of both ranks while step 8's checkpoint is written leaves step 4's (the shards of 8 written, never
    committed); the resumed run is SIGKILLed after step 7, before its next save: step 4's again; the run resumed from
    it is the uninterrupted one bit for bit, and its first commit removed the half-written save. The saves are
    asynchronous (`train.async_checkpoint`, a gloo group of their own), the reference run's synchronous."""
    out, fp32 = tmp_path / "run", ("train.precision=fp32", "train.async_checkpoint=true")  # 2 ranks' async saves
    res = train_run(runs["latents"], out, 2, *fp32, fault="save:8", check=False)
    assert res.returncode != 0
    assert os.path.isdir(out / "checkpoints" / "step_00000008.tmp")  # the shards were written, never committed
    assert trainer_state(out)["step"] == 4
    res = train_run(runs["latents"], out, 2, *fp32, "--resume", fault="step:7", check=False)
    assert res.returncode != 0  # SIGKILL of both ranks after step 7; the last checkpoint is step 4
    state = trainer_state(out)
    assert (state["step"], state["data_position"]) == (4, 4 * 8)
    train_run(runs["latents"], out, 2, *fp32, "--resume")
    assert trainer_state(out)["step"] == STEPS
    assert losses(out) == losses(runs["fp32", 2, 1])  # same ranks, same threads: bit for bit
    weights_close(out, runs["fp32", 2, 1])
    assert not os.path.exists(out / "checkpoints" / "step_00000008.tmp")


def test_each_stop_signal_to_the_launcher_checkpoints_and_the_resumes_match_exactly(runs, tmp_path):
    """`lfm-fast train --nproc 2` gets SIGUSR1 (SLURM's warning before a time limit), then, resumed, SIGINT (Ctrl-C),
    then, resumed again, SIGTERM (a scheduler) mid-run: each reaches the workers, which finish their step, write a
    checkpoint and exit 0 with a line saying how to resume; the run resumed after the last is the uninterrupted one,
    bit for bit. Every step sleeps 0.5 s (LFM_FAST_FAULT=slow) so that each signal lands mid-run."""
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "LFM_FAST_FAULT": f"slow:1-{STEPS}"}
    cmd = [sys.executable, "-m", "lfm_fast", "train", "--nproc", "2", "--latents", runs["latents"], "--out", str(out),
           "--steps", str(STEPS), *TINY, "train.precision=fp32"]
    stopped = 0
    for signum in (signal.SIGUSR1, signal.SIGINT, signal.SIGTERM):
        proc = subprocess.Popen(cmd + (["--resume"] if stopped else []), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < stopped + 2:
            assert time.time() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, (signum, stderr[-3000:])
        assert f"{signum.name}: stopped at step" in stderr and "--resume" in stderr and "Traceback" not in stderr, stderr[-3000:]
        stopped, before = trainer_state(out)["step"], stopped
        assert before + 2 <= stopped < STEPS and not (out / "model.safetensors").exists(), (signum, before, stopped)
    train_run(runs["latents"], out, 2, "train.precision=fp32", "--resume")
    assert losses(out) == losses(runs["fp32", 2, 1])
    weights_close(out, runs["fp32", 2, 1])


def test_resharding_between_world_sizes(runs, tmp_path):
    """A run checkpointed at 2 ranks resumes at 1, which checkpoints and resumes at 2 again: each resume reshards
    the model, optimizer and EMA, and the run is the uninterrupted one."""
    out = tmp_path / "run"
    for stage, (nproc, stop) in enumerate([(2, "4"), (1, "8"), (2, None)]):
        train_run(runs["latents"], out, nproc, "train.precision=fp32", *(["--resume"] if stage else []),
                  *(["--stop-at", stop] if stop else []))
        state = trainer_state(out)
        assert (state["step"], state["data_position"], state["world_size"]) == (int(stop or STEPS), int(stop or STEPS) * 8, nproc)
    got = losses(out)
    for nproc in (1, 2):
        ref = losses(runs["fp32", nproc, 1])
        assert list(got) == list(ref)
        np.testing.assert_allclose(list(got.values()), list(ref.values()), rtol=1e-5)
        weights_close(out, runs["fp32", nproc, 1], rtol=1e-4, atol=1e-5)
    ema = read_checkpoint_tensors(latest_checkpoint(str(out)))
    final = load_file(os.path.join(out, "model.safetensors"))
    assert "model.pos_embed" not in ema and "pos_embed" in final  # the fixed table: in the weights, not the run state
    assert all(ema[f"model.{k}"].shape == v.shape for k, v in final.items() if k != "pos_embed")


def test_sampling_does_not_depend_on_the_world_size(tiny_pipeline, tmp_path):
    """11 images in batches of 4 on 1 and on 2 ranks are the same files; with more ranks than batches (1 or 3 images
    in one batch of 64), rank 1 gets no batch and only joins the write, and the images are the 1-rank ones."""
    args = ["sample", "--ckpt", str(tiny_pipeline / "dit"), "--solver", "heun", "--steps", "2", "--cfg", "2"]
    here(*args, "--num", "11", "--batch-size", "4", "--out", str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "lfm_fast", *args, "--num", "11", "--batch-size", "4", "--nproc", "2", "--out",
                    str(tmp_path / "two")], env=env, check=True, capture_output=True)
    names = sorted(os.listdir(tmp_path / "one"))
    assert names == sorted(os.listdir(tmp_path / "two")) and len([n for n in names if "_class" in n]) == 11
    for n in names:
        if n.endswith(".png"):
            assert (tmp_path / "one" / n).read_bytes() == (tmp_path / "two" / n).read_bytes(), n
    a, b = np.load(tmp_path / "one" / "samples.npz"), np.load(tmp_path / "two" / "samples.npz")
    assert a["arr_0"].shape == (11, 32, 32, 3) and np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["labels"], b["labels"])
    for num in (1, 3):
        torchrun(2, *args, "--batch-size", "64", "--num", str(num), "--out", str(tmp_path / f"two{num}"))
        got, want = np.load(tmp_path / f"two{num}" / "samples.npz")["arr_0"], a["arr_0"][:num]
        assert got.shape == want.shape and np.abs(got.astype(int) - want).max() <= 1  # other batching


def test_meta_device_init_equals_eager_init():
    """Meta device → AC → FSDP2 → DiT's init shard by shard gives the eager weights, adaLN-Zero included."""
    from lfm_fast.dist import init_distributed
    from lfm_fast.models.dit import DiT, DiTConfig
    from lfm_fast.train.ema import create_ema, full_state
    from lfm_fast.train.parallelize import build_parallel_dit

    d = init_distributed("cpu")
    cfg = DiTConfig(input_size=8, hidden_size=32, depth=3, num_heads=2, num_classes=3, qk_norm=True)
    eager = DiT(cfg)
    eager.initialize_weights(seed=7)
    sharded = build_parallel_dit(cfg, d.mesh, d.device, "bf16", ac="selective:2", seed=7)
    full, ref = full_state(create_ema(sharded)), dict(eager.named_parameters())
    assert full.keys() == ref.keys()
    for k in ref:
        assert torch.equal(full[k], ref[k].detach()), k
    zero = [k for k in ref if "adaLN_modulation" in k or k.startswith("final_layer.linear")]
    assert len(zero) == 2 * (cfg.depth + 2) and all(not full[k].any() for k in zero)
    w = full["blocks.1.mlp.0.weight"]  # Xavier-uniform: bound √(6 / (fan_in + fan_out))
    assert w.abs().max() <= (6 / (32 + 128)) ** 0.5 and w.std() > 0.5 * (6 / 160 / 3) ** 0.5
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 1])
    assert not sharded(x, t, y).any()  # adaLN-Zero: the velocity is exactly 0 at init
    assert not torch.equal(DiT(cfg).blocks[0].attn.qkv.weight, DiT(cfg).blocks[0].attn.qkv.weight)  # seed=None draws one


def test_per_block_compile_and_activation_checkpointing_train_the_same_run(runs, tmp_path):
    """AC (every block, recomputed in backward) and torch.compile of each block change how, not what, is computed."""
    out = tmp_path / "run"
    train_run(runs["latents"], out, 2, "train.precision=fp32", "train.compile=true", "train.activation_checkpointing=full")
    np.testing.assert_allclose(list(losses(out).values()), list(losses(runs["fp32", 2, 1]).values()), rtol=1e-4)
    weights_close(out, runs["fp32", 2, 1], rtol=1e-3, atol=1e-4)


def test_reductions_put_their_tensors_on_the_groups_device(monkeypatch):
    """An NCCL group has no CPU backend: a value `Dist` reduces lives on its device. A fake device ("meta") and a
    recording all_reduce catch a tensor made without `device=` (the CUDA crash before step 1). The per-step flags
    (signals, checkpoint timers) are host values: reduced on the host group (gloo), they never wait for the device."""
    import torch.distributed as dist

    from lfm_fast.dist import Dist

    seen = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, op=None, group=None: seen.append((t.device, group)))
    d = Dist(rank=0, world_size=2, local_rank=0, device=torch.device("meta"), mesh=None, host_group="gloo group")
    for call in (lambda: d.all_mean(1.0), lambda: d.any(True, False)):
        try:
            call()
        except (NotImplementedError, RuntimeError):  # reading a meta tensor back; the device was already recorded
            pass
    assert seen == [(torch.device("meta"), None), (torch.device("cpu"), "gloo group")]


def test_the_ema_export_gathers_to_rank_0_only(monkeypatch):
    """Every rank joins each shard's gather (a collective), but only rank 0 keeps a full CPU copy."""
    import torch.distributed as dist

    from lfm_fast.train.ema import full_state

    class Shard:
        gathered = 0

        def full_tensor(self):
            Shard.gathered += 1
            return torch.ones(2)

    ema = {"a": Shard(), "b": Shard()}
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert full_state(ema) == {} and Shard.gathered == 2
    monkeypatch.setattr(dist, "get_rank", lambda: 0)
    assert list(full_state(ema)) == ["a", "b"] and Shard.gathered == 4


def test_nproc_reports_a_bad_input_as_one_line_and_a_crash_with_the_failing_ranks_traceback(runs, tmp_path):
    """Under `--nproc 2`, a worker's bad input is the only line the user sees (exit 2, no torchrun traceback); a
    crash exits 1 with torchrun's summary, whose root cause carries the rank's traceback (`record`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "lfm_fast", "sample", "--nproc", "2", "--ckpt", str(tmp_path / "none"),
                          "--out", str(tmp_path / "s")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == f"lfm-fast: error: checkpoint {tmp_path / 'none'}: no such folder"
    env["LFM_FAST_FAULT"] = "raise-step:2"
    crash = subprocess.run([sys.executable, "-m", "lfm_fast", "train", "--nproc", "2", "--latents", runs["latents"],
                            "--out", str(tmp_path / "run"), *TINY], env=env, capture_output=True, text=True, timeout=120)
    summary = crash.stderr[crash.stderr.index("lfm_fast FAILED"):]
    assert crash.returncode == 1 and "Root Cause" in summary and "RuntimeError: injected fault at step 2" in summary
    assert 'in fault_point' in summary  # the worker's own traceback, from its error file


def test_a_workers_error_line_reaches_the_user_once_through_the_launcher(tmp_path, monkeypatch, capsys, request):
    """Under `--nproc` the workers write a bad input's line to their torchrun error files and print nothing; the
    launcher prints it once, with the worker's exit code. A rank 0 that torchrun stopped before it reached the line
    (after another rank's exit: seen in CI, when rank 0 alone printed) no longer loses it."""
    import signal

    import torch.distributed.run
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from lfm_fast import launch
    from lfm_fast.cli import app as cli
    from lfm_fast.cli.app import report

    previous = signal.getsignal(signal.SIGTERM)  # report() and _terminate ignore a second SIGTERM: put it back
    request.addfinalizer(lambda: signal.signal(signal.SIGTERM, previous))

    files = [str(tmp_path / f"error-{rank}.json") for rank in range(3)]
    line = "lfm-fast: error: checkpoint x: no such folder"
    monkeypatch.setenv("LFM_FAST_LAUNCH", "1")
    for rank in (1, 2):  # ranks 1 and 2 met the bad input; rank 0 was stopped first
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[rank])
        report(line)
    assert capsys.readouterr().err == ""
    failures = {0: ProcessFailure(0, 10, -15, files[0]), 1: ProcessFailure(1, 11, 2, files[1]), 2: ProcessFailure(2, 12, 2, files[2])}

    def torchrun(argv):
        raise ChildFailedError("lfm_fast", failures)

    monkeypatch.setattr(torch.distributed.run, "main", torchrun)
    assert launch.main([]) == 2 and capsys.readouterr().err == line + "\n"
    monkeypatch.setenv("RANK", "0")  # rank 0 wrote the line too, then torchrun killed it: the line, rank 1's code
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[0])
    report(line)
    failures[0] = ProcessFailure(0, 10, -15, files[0])
    assert launch.main([]) == 2 and capsys.readouterr().err == line + "\n"
    # rank 0, stopped by torchrun's SIGTERM mid-command, wrote its own line: the error's is the one printed
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[0])
    report("lfm-fast: terminated (SIGTERM); nothing half-written is left")
    failures[0] = ProcessFailure(0, 10, 143, files[0])
    assert launch.main([]) == 2 and capsys.readouterr().err == line + "\n"
    for rank in (1, 2):  # a stop of every rank (a SIGTERM the user sent): its line, once, with its code
        failures[rank] = ProcessFailure(rank, 11, 143, files[0])
    assert launch.main([]) == 143 and capsys.readouterr().err == "lfm-fast: terminated (SIGTERM); nothing half-written is left\n"
    failures[0] = ProcessFailure(0, 10, 1, str(tmp_path / "none.json"))  # a crash is not hidden behind the others' lines
    assert launch.main([]) == 1 and "lfm_fast FAILED" in capsys.readouterr().err
    # torchrun run by hand: rank 0 prints the line, and each rank's error file (torchrun's summary) holds it too
    monkeypatch.delenv("LFM_FAST_LAUNCH")
    for rank in (0, 1):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", files[rank])
        report("lfm-fast: error: y")
        assert json.load(open(files[rank]))["message"]["message"] == "lfm-fast: error: y"
    assert capsys.readouterr().err == "lfm-fast: error: y\n"
    # a SIGTERM while the first one unwinds (torchrun stopping the ranks after another's exit) cannot cut short the
    # removal of a half-written output
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    with pytest.raises(cli.Terminated):
        cli._terminate(signal.SIGTERM, None)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    # torchrun itself killed by the SIGTERM passed on (before it had workers): the line and 143, not exit 241

    class Killed:
        pid = 0

        def __init__(self, *args, **kwargs):
            pass

        def wait(self):
            return -signal.SIGTERM

    for name in ("TORCHELASTIC_ERROR_FILE", "RANK"):  # the `lfm-fast --nproc` process itself
        monkeypatch.delenv(name)
    monkeypatch.setattr("subprocess.Popen", Killed)
    assert cli.relaunch(["sample", "--nproc", "2"], 2) == 143
    assert capsys.readouterr().err == "lfm-fast: terminated (SIGTERM); nothing half-written is left\n"


def test_two_torchrun_agents_train_checkpoint_and_resume_as_documented(runs, tmp_path):
    """Multi-node as the README launches it: two torchrun agents (here on one machine, one process each) meet at a
    c10d rendezvous, train to a stop, and two new agents resume; the run is the 2-rank standalone one."""
    import socket

    def two_agents(*args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("LFM_FAST_FAULT", None)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv-backend=c10d",
               f"--rdzv-endpoint=127.0.0.1:{port}", f"--rdzv-id=test{port}", "-m", "lfm_fast", "--", "train", "--latents",
               runs["latents"], "--out", str(tmp_path / "run"), "--steps", str(STEPS), *TINY, "train.precision=fp32", *args]
        agents = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        for a in agents:
            _, err = a.communicate(timeout=300)
            assert a.returncode == 0, err[-3000:]

    two_agents("--stop-at", "6")
    assert (trainer_state(tmp_path / "run")["step"], trainer_state(tmp_path / "run")["world_size"]) == (6, 2)
    two_agents("--resume")
    assert losses(tmp_path / "run") == losses(runs["fp32", 2, 1])
    weights_close(tmp_path / "run", runs["fp32", 2, 1])


def test_conditional_training_on_two_ranks_resumes_and_matches_one(tmp_path):
    """Inpainting on 2 ranks, stopped and resumed, is the 1-rank run: each rank slices the global batch's conditions,
    mask picks and condition drops."""
    latents = str(tmp_path / "latents")
    write_random_latents(latents, n=64, conditions=True)
    tiny = ["--preset", "shapes-inpaint", "model.hidden_size=32", "model.depth=2", "model.num_heads=2", "train.batch_size=8",
            "train.log_every=1", "train.ckpt_every=4", "train.cond_dropout=0.3", "train.precision=fp32", "data.flip=true",
            "data.posterior=sample"]  # conditions of the mirror images too
    here("train", "--latents", latents, "--out", str(tmp_path / "one"), "--steps", str(STEPS), *tiny)
    torchrun(2, "train", "--latents", latents, "--out", str(tmp_path / "two"), "--steps", str(STEPS), *tiny, "--stop-at", "6")
    torchrun(2, "train", "--latents", latents, "--out", str(tmp_path / "two"), "--resume")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert list(one) == list(two) == list(range(1, STEPS + 1))
    np.testing.assert_allclose(list(two.values()), list(one.values()), rtol=1e-5)
    weights_close(tmp_path / "one", tmp_path / "two", rtol=1e-4, atol=1e-5)
