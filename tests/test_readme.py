"""The documentation's examples run as written, so they cannot go stale: every Python block of README.md and docs/*.md
(the API's live in docs/python-api.md) against a small checkpoint at runs/demo/dit, and the eval command lines of
docs/evaluation.md "Examples" on stand-in files of the names they use (the README's eval line must be one of them)."""

import glob
import os
import re
import shutil

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
README = os.path.join(ROOT, "README.md")
EVALUATION = os.path.join(ROOT, "docs", "evaluation.md")


def pages() -> list[str]:
    """README.md and every docs page, in a fixed order."""
    return [README] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))


def python_blocks() -> list[tuple[str, str]]:
    """(page, code) of every ```python block of the documentation."""
    blocks = []
    for page in pages():
        with open(page) as f:
            blocks += [(os.path.relpath(page, ROOT), b) for b in re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)]
    return blocks


def test_the_readme_has_python_blocks():
    codes = [code for _, code in python_blocks()]
    assert len(codes) >= 2 and any("LFMPipeline" in b for b in codes) and any("build_dit" in b for b in codes)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_a_readme_python_block_runs(index, tiny_pipeline, tmp_path, monkeypatch, capsys):
    page, code = python_blocks()[index]
    for name in ("dit", "ae"):  # the checkpoint records its autoencoder as ../ae
        shutil.copytree(tiny_pipeline / name, tmp_path / "runs" / "demo" / name, ignore=shutil.ignore_patterns("checkpoints"))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"{page} python block {index}", "exec"), {})
    printed = capsys.readouterr().out
    if "LFMPipeline" in code:
        assert (tmp_path / "sample.png").is_file() and "NFE 32" in printed
    elif "build_dit" in code:
        assert "torch.Size([2, 4, 8, 8]) 16" in printed


def readme_commands(prefix: str, section: str, page: str = README) -> list[list[str]]:
    """The `prefix …` command lines in the bash blocks of one section of a page (continuations joined)."""
    import shlex

    with open(page) as f:
        text = f.read()
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line.split("#")[0])[1:] for block in re.findall(r"```bash\n(.*?)```", body, flags=re.S)
            for line in block.replace("\\\n", " ").splitlines() if line.startswith(prefix)]


def test_the_readme_eval_examples_run(random_inception, tmp_path, monkeypatch, capsys):
    """Each `lfm-fast eval` line of docs/evaluation.md "Examples", as written, on stand-ins under the same names:
    samples, an ADM reference batch (arr_0 + mu/sigma), a reference of images, pytorch-fid's Inception weights file.
    The README's "Use it" eval line is one of them, so it runs here too."""
    import json

    import numpy as np

    from lfm_fast.cli import main
    from lfm_fast.data.shapes import make_shapes
    from lfm_fast.eval.run import evaluate

    commands = readme_commands("lfm-fast eval", "Examples", EVALUATION)
    assert len(commands) == 2
    in_readme = readme_commands("lfm-fast eval", "Use it")
    assert in_readme and all(argv in commands for argv in in_readme), in_readme
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "samples").mkdir(parents=True)
    np.savez("runs/samples/samples.npz", arr_0=make_shapes(12, 32, seed=1)[0])
    np.savez("runs/real.npz", arr_0=make_shapes(12, 32, seed=2)[0])
    shutil.copy(random_inception[0], "pt_inception-2015-12-05-6726825d.pth")
    evaluate("runs/real.npz", "runs/real.npz", [], random_inception[0], save_stats="stats.npz", progress=False)  # stats only
    with np.load("stats.npz") as f:
        np.savez("VIRTUAL_imagenet256_labeled.npz", arr_0=make_shapes(12, 32, seed=2)[0], mu=f["mu"], sigma=f["sigma"])
    for argv in commands:
        assert main(argv) == 0, argv
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    # the ADM batch's statistics give the FID its images give, and its images the precision/recall (the values
    # themselves are checked against independent computations in tests/test_eval.py)
    written = json.loads((tmp_path / "metrics.json").read_text())
    direct = evaluate("runs/samples/samples.npz", "runs/real.npz", ["fid", "pr"], random_inception[0], progress=False)
    assert written["fid"] == pytest.approx(direct["fid"], rel=1e-6) and written["fid"] > 1
    assert (written["precision"], written["recall"]) == (direct["precision"], direct["recall"])
    assert printed[-1]["latent_fd"] == pytest.approx(
        evaluate("runs/samples/samples.npz", "runs/real.npz", ["latent_fd"], ae="builtin:shapes")["latent_fd"], rel=1e-9)
