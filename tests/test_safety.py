"""No command deletes or replaces what it did not write; every output folder appears only once its inputs
are validated, carries the writer's marker and honours the umask."""

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from lfm_fast.cli import main
from lfm_fast.errors import InputError
from lfm_fast.fileio import MARKER
from tests.test_cli import assert_input_error, run_cli


def sample(capsys, tiny_pipeline, out, *extra):
    return run_cli(capsys, "sample", "--ckpt", str(tiny_pipeline / "dit"), "--num", "2", "--solver", "euler", "--steps", "1",
                   "--out", str(out), *extra)


def user_folder(path):
    path.mkdir()
    (path / "thesis.tex").write_text("years of work")
    return path


def test_out_never_replaces_a_folder_lfm_fast_did_not_write(tiny_pipeline, tmp_path, capsys, monkeypatch):
    mine = user_folder(tmp_path / "mine")
    assert_input_error(*sample(capsys, tiny_pipeline, mine), "exists and is not empty", "--overwrite")
    assert_input_error(*sample(capsys, tiny_pipeline, mine, "--overwrite"), "not written by lfm-fast", MARKER)
    assert (mine / "thesis.tex").read_text() == "years of work" and os.listdir(mine) == ["thesis.tex"]
    monkeypatch.chdir(mine)  # `--out .` (and any folder above the working directory) is refused even with --overwrite
    for out in (".", "..", str(tmp_path)):
        assert_input_error(*sample(capsys, tiny_pipeline, out, "--overwrite"), "working directory")
    assert (mine / "thesis.tex").exists()
    run = tiny_pipeline / "dit"  # a training run is never replaced
    before = sorted(os.listdir(run))
    assert_input_error(*sample(capsys, tiny_pipeline, run, "--overwrite"), "training run")
    assert sorted(os.listdir(run)) == before and (run / "checkpoints" / "latest").exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_out_written_by_lfm_fast_is_replaced_only_with_overwrite(tiny_pipeline, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(capsys, tiny_pipeline, out)[0] == 0
    assert json.loads((out / MARKER).read_text())["command"] == "sample"
    (out / "note.txt").write_text("x")
    assert_input_error(*sample(capsys, tiny_pipeline, out), "exists and is not empty")
    assert (out / "note.txt").exists()
    assert sample(capsys, tiny_pipeline, out, "--overwrite")[0] == 0
    assert not (out / "note.txt").exists() and (out / "samples.npz").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert sample(capsys, tiny_pipeline, empty)[0] == 0  # an empty folder is as good as a new one
    (tmp_path / "file").write_text("x")
    assert_input_error(*sample(capsys, tiny_pipeline, tmp_path / "file"), "is a file")


def test_every_folder_writing_command_refuses_a_user_folder_before_any_work(tmp_path, capsys):
    mine = user_folder(tmp_path / "mine")
    for argv in (["prepare", "--ae", "builtin:shapes", "--data", "shapes"], ["train-ae", "--data", "shapes"], ["demo", "--quick"]):
        assert_input_error(*run_cli(capsys, *argv, "--out", str(mine)), "exists and is not empty")
        assert_input_error(*run_cli(capsys, *argv, "--out", str(mine), "--overwrite"), "not written by lfm-fast")
    assert os.listdir(mine) == ["thesis.tex"] and sorted(os.listdir(tmp_path)) == ["mine"]


def test_train_writes_its_folder_only_after_validation_and_never_beside_other_files(random_latents, tmp_path, capsys):
    def train(out, *bad):
        return ["train", "--latents", random_latents, "--preset", "small-data", "--steps", "2", "--out", str(out),
                "model.hidden_size=32", "model.depth=1", "model.num_heads=2", "train.batch_size=8", *bad]

    out = tmp_path / "run"
    for bad, words in (("train.lr_schedule=foo", "lr_schedule"), ("train.grad_accum=3", "divisible"),
                       ("model.attn_backend=foo", "attn_backend")):
        code, err = run_cli(capsys, *train(out, bad))
        assert code == 2 and words in err, err
        assert not out.exists()
    mine = user_folder(tmp_path / "mine")
    assert_input_error(*run_cli(capsys, *train(mine)), "holds other files")
    assert os.listdir(mine) == ["thesis.tex"]
    assert main(train(out)) == 0
    capsys.readouterr()
    assert json.loads((out / MARKER).read_text())["command"] == "train"
    assert_input_error(*run_cli(capsys, *train(out)), "already holds a training run", "--resume")


def test_outputs_honour_the_umask(tiny_pipeline, tmp_path, capsys):
    old = os.umask(0o022)
    try:
        assert sample(capsys, tiny_pipeline, tmp_path / "s")[0] == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s").st_mode) == 0o755
    assert {stat.S_IMODE(os.stat(tmp_path / "s" / f).st_mode) for f in os.listdir(tmp_path / "s")} == {0o644}
    for f in ("dit/model.safetensors", "dit/config.json", "dit/metrics.jsonl", "latents/shard-00000.safetensors"):
        assert stat.S_IMODE(os.stat(tiny_pipeline / f).st_mode) & 0o044 == 0o044, f  # group/world-readable


def test_overwrite_replaces_only_the_same_commands_output_and_rechecks_before_commit(tiny_pipeline, tmp_path, capsys):
    from lfm_fast.errors import InputError
    from lfm_fast.fileio import atomic_dir

    latents = tmp_path / "latents"
    shutil.copytree(tiny_pipeline / "latents", latents)  # written by `prepare`
    assert_input_error(*sample(capsys, tiny_pipeline, latents, "--overwrite"), "written by `lfm-fast prepare`")
    assert (latents / "meta.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="not empty"):
        with atomic_dir(str(empty), "sample") as tmp:
            (empty / "notes.txt").write_text("written while the command ran")
            (Path(tmp) / "grid.png").write_bytes(b"")
    assert os.listdir(empty) == ["notes.txt"] and not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_odd_out_paths_get_one_line(tiny_pipeline, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    assert_input_error(*sample(capsys, tiny_pipeline, tmp_path / "afile" / "x"), "is a file, not a folder")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    assert_input_error(*sample(capsys, tiny_pipeline, tmp_path / "dangling"), "broken symbolic link")
    assert sorted(os.listdir(tmp_path)) == ["afile", "dangling"]


def test_export_never_replaces_a_file_without_overwrite(tiny_pipeline, tmp_path, capsys):
    mine = tmp_path / "notes.onnx"
    mine.write_text("mine")
    args = ["export", "--ckpt", str(tiny_pipeline / "dit"), "--steps", "1", "--solver", "euler"]
    assert_input_error(*run_cli(capsys, *args, "--out", str(mine)), "exists", "--overwrite")
    assert_input_error(*run_cli(capsys, *args, "--out", str(tmp_path), "--overwrite"), "is a folder")
    assert mine.read_text() == "mine"
    assert run_cli(capsys, *args, "--out", str(mine), "--overwrite")[0] == 0 and mine.read_bytes() != b"mine"


def test_sigterm_leaves_nothing_half_written(tmp_path):
    """SIGTERM (what a scheduler or `kill` sends) unwinds like Ctrl-C: `prepare` leaves whole shards only (no
    temporary file, no index), a folder that a rerun continues."""
    import signal
    import subprocess
    import sys
    import time

    from lfm_fast.data.latents import LatentShardDataset

    out = tmp_path / "latents"
    proc = subprocess.Popen([sys.executable, "-m", "lfm_fast", "prepare", "--ae", "builtin:shapes", "--data", "shapes",
                             "--num-images", "20000", "--shard-size", "500", "--out", str(out)],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "shard-00000.safetensors").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(0.3)  # inside the encoding of a later shard
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "lfm-fast: terminated" in err and "Traceback" not in err
    assert os.listdir(tmp_path) == ["latents"]
    left = sorted(os.listdir(out))
    assert "meta.json" not in left and not [n for n in left if "tmp" in n] and "shard-00000.safetensors" in left
    with pytest.raises(InputError, match="unfinished"):
        LatentShardDataset(str(out))


def test_the_command_ends_without_module_teardown_but_with_everything_an_exit_owes(tmp_path):
    """`lfm-fast` ends through `exit_now`: os._exit with main's code, after what Python's own exit does first (a
    thread pool left open is shut down, a non-daemon thread still writing is joined, atexit handlers run, a
    block-buffered stdout pipe is flushed), and without the teardown of torch's modules (0.8–2.5 s measured here): a
    module global's finalizer, which that teardown would run, does not. stdout on a full disk makes a success exit 120,
    as Python's own exit does."""
    import subprocess
    import sys

    script = f"""
import atexit, threading, time, sys
from concurrent.futures import ThreadPoolExecutor
import torch
from lfm_fast.cli.app import exit_now
def late():
    time.sleep(0.3)
    open({str(tmp_path / "thread")!r}, "w").write("joined")
threading.Thread(target=late).start()
pool = ThreadPoolExecutor(2)  # left open, as torch.compile's worker pool is: its idle workers wait for work
pool.submit(time.sleep, 0.1)
atexit.register(lambda: open({str(tmp_path / "atexit")!r}, "w").write("ran"))
class Global:
    def __del__(self):
        open({str(tmp_path / "teardown")!r}, "w").write("ran")
kept = Global()
print("x" * 100)  # stdout is a pipe: block-buffered, still in the buffer at os._exit
exit_now(int(sys.argv[1]))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    res = subprocess.run([sys.executable, "-c", script, "3"], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 3 and res.stdout == "x" * 100 + "\n" and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert (tmp_path / "thread").read_text() == "joined" and (tmp_path / "atexit").read_text() == "ran"
    assert not (tmp_path / "teardown").exists()
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        res = subprocess.run([sys.executable, "-c", script, "0"], env=env, stdout=full, stderr=subprocess.PIPE, timeout=60)
    assert res.returncode == 120
