"""bench/gpu_check.sh fits the lent GPU machine, checked without one: each part is dry-run with fake `python3`,
`pip`, `nvidia-smi`, `timeout` and `date` on PATH. The fakes record every command with the timeouts around it,
and the clock runs the worst case: each command under a timeout takes its whole limit and kill grace. A part
must run whole under one timeout, every command inside it, the inner limits summing within it, ≤ 300 s in all.

GPU_CHECK_SCRIPT=PATH runs these tests against another copy of the script (an older one, say)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(os.environ.get("GPU_CHECK_SCRIPT", REPO / "bench" / "gpu_check.sh"))
PARTS = ["1", "2", "3"]
LIMIT_S = 300  # one part's wall time on the GPU machine, at worst
BENCH = ["gpu_kernels.py", "gpu_train_step.py", "gpu_sampling.py", "fsdp_scaling.py"]

FAKE = r'''
import json, os, subprocess, sys

name, args = sys.argv[1], sys.argv[2:]
state = os.environ["FAKE_STATE"]
clock_file = os.path.join(state, "clock")
stack = json.loads(os.environ.get("FAKE_TIMEOUTS", "[]"))


def clock():
    return float(open(clock_file).read())


def log(**row):
    with open(os.path.join(state, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"cmd": name, "at": clock(), "inside": stack, **row}) + "\n")


def seconds(v):
    return float(v.rstrip("s"))


if name == "date":
    print(int(clock()) if args == ["+%s"] else "Thu Jan  1 00:00:00 UTC 1970")
elif name == "timeout":
    kill = 0.0
    while args[0].startswith("-"):
        opt = args.pop(0)
        if opt in ("-k", "--kill-after", "-s", "--signal"):
            value = args.pop(0)
            kill = seconds(value) if opt in ("-k", "--kill-after") else kill
        elif opt.startswith("--kill-after="):
            kill = seconds(opt.split("=", 1)[1])
    limit, start = seconds(args.pop(0)), clock()
    log(limit=limit, kill=kill, argv=args)
    rc = subprocess.run(args, env=dict(os.environ, FAKE_TIMEOUTS=json.dumps(stack + [start + limit]))).returncode
    end = max(clock(), start + limit + kill)  # the worst case: it ran until killed
    with open(clock_file, "w") as f:
        f.write(str(end))
    sys.exit(rc)
else:  # python3, pip, nvidia-smi
    log(argv=args)
    script = os.path.basename(args[0]) if args and args[0].endswith(".py") else None
    if script and script in os.environ.get("FAKE_FAIL", "").split(","):
        with open(args[args.index("--out") + 1], "a") as f:
            f.write(json.dumps({"row": "measured before the failure"}) + "\n")
        if os.environ.get("FAKE_HANG"):
            open(os.path.join(state, "hung.pid"), "w").write(str(os.getpid()))
            import time
            time.sleep(60)
        sys.exit(1)
'''


def dry_run(tmp_path, part, fail="", hang=False, script=SCRIPT):
    """Run one part with the fakes (`fail`: a bench script that writes a row, then fails, or with `hang`, sleeps,
    under the real `timeout` and `date`); returns (exit status, output, the recorded calls, the final clock, OUT)."""
    fakes, state, out = tmp_path / "bin", tmp_path / "state", tmp_path / "out"
    for d in (fakes, state):
        d.mkdir(parents=True, exist_ok=True)
    (state / "clock").write_text("0")
    (state / "calls.jsonl").write_text("")
    (fakes / "fake.py").write_text(FAKE)
    for name in ("python3", "python", "pip", "pip3", "nvidia-smi") + (() if hang else ("timeout", "date")):
        f = fakes / name
        f.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{fakes / "fake.py"}" {name} "$@"\n')
        f.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_CHECK_", "WHEELS"))}
    env.update(PATH=f"{fakes}:{os.environ['PATH']}", FAKE_STATE=str(state), FAKE_FAIL=fail, FAKE_HANG="1" if hang else "",
               OUT=str(out))
    p = subprocess.run(["bash", str(script), part], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in (state / "calls.jsonl").read_text().splitlines()]
    return p.returncode, p.stdout + p.stderr, calls, float((state / "clock").read_text()), out


def bench_calls(calls):
    """The argument lists of the recorded `python3 SCRIPT.py …` calls."""
    return [c["argv"] for c in calls if c["cmd"] in ("python3", "python") and c["argv"][:1] and c["argv"][0].endswith(".py")]


def test_syntax():
    p = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("part", PARTS)
def test_part_fits(tmp_path, part):
    rc, output, calls, end, out = dry_run(tmp_path, part)
    assert rc == 0, output
    unbounded = [" ".join([c["cmd"], *c["argv"]])[:80] for c in calls if not c["inside"] and c["cmd"] != "timeout"]
    assert not unbounded, f"part {part}: install, imports and every command must run inside the bound: {unbounded}"
    timeouts = [c for c in calls if c["cmd"] == "timeout"]
    outer = [c for c in timeouts if not c["inside"]]
    assert len(outer) == 1 and calls[0] is outer[0], f"part {part}: not run whole under one timeout"
    outer = outer[0]
    assert outer["limit"] + outer["kill"] <= LIMIT_S, f"part {part}: outer bound {outer['limit']} + {outer['kill']} s"
    inner = [c for c in timeouts if len(c["inside"]) == 1]
    total = sum(c["limit"] + c["kill"] for c in inner)
    assert total <= outer["limit"], f"part {part}: inner limits sum to {total} s, over the bound {outer['limit']} s"
    assert all(len(c["inside"]) == 2 for c in calls if c["cmd"] != "timeout"), \
        f"part {part}: a command outside its step's own timeout"
    assert end - outer["at"] <= LIMIT_S, f"part {part}: worst case {end - outer['at']} s"

    commands = [c["argv"] for c in calls if c["cmd"] in ("python3", "python")]
    assert any(a[:3] == ["-m", "pip", "install"] and "-e" in a for a in commands), f"part {part}: no install"
    scripts = bench_calls(calls)
    assert scripts, f"part {part}: runs no bench script"
    for a in scripts:
        assert (REPO / a[0]).is_file(), f"part {part}: {a[0]} does not exist"
        assert "--out" in a, f"part {part}: {a[0]} has no --out"
        dest = Path(a[a.index("--out") + 1])
        assert (REPO / dest).resolve().is_relative_to(out.resolve()), f"part {part}: {a[0]} --out {dest} is not under $OUT"
        assert os.path.basename(a[0]) in BENCH


def test_every_bench_row_is_measured_by_some_part(tmp_path):
    called = set()
    for part in PARTS:
        _, _, calls, _, _ = dry_run(tmp_path / part, part)
        called |= {os.path.basename(a[0]) for a in bench_calls(calls)}
    assert called == set(BENCH), f"never called: {set(BENCH) - called}"


def test_a_failing_step_keeps_its_rows_and_the_part_goes_on(tmp_path):
    rc, output, calls, _, out = dry_run(tmp_path, "1", fail="gpu_kernels.py")
    assert rc != 0, f"a failed step leaves the part's exit status 0:\n{output}"
    assert (out / "kernels.jsonl").read_text().strip(), "the rows measured before the failure are gone"
    scripts = [os.path.basename(a[0]) for a in bench_calls(calls)]
    assert scripts[-1] == "gpu_train_step.py", "the part stopped at the failing step"
    assert "kernels" in (out / "part1.log").read_text().splitlines()[-1]  # the summary names the failed step


def test_a_part_cut_at_its_bound_keeps_its_rows_and_stops_the_step(tmp_path):
    """The real `timeout`, at a bound of 6 s: a hanging step is stopped there, its rows stay, the log says so."""
    script = tmp_path / "gpu_check.sh"
    text = SCRIPT.read_text()
    assert "\nBOUND=290\n" in text
    script.write_text(text.replace("\nBOUND=290\n", "\nBOUND=6\n"))
    t0 = time.monotonic()
    rc, output, _, _, out = dry_run(tmp_path, "1", fail="gpu_kernels.py", hang=True, script=script)
    assert rc == 124 and time.monotonic() - t0 < 6 + 5 + 5, output
    assert (out / "kernels.jsonl").read_text().strip(), "the rows measured before the cut are gone"
    assert "cut at its bound" in (out / "part1.log").read_text().splitlines()[-1]
    pid = int((tmp_path / "state" / "hung.pid").read_text())
    for _ in range(100):  # the hung step is stopped (TERM, then KILL 5 s later), not left running
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("the hung step outlived its part")


def test_bench_scripts_help_on_cpu():
    """Each script parses its arguments before it needs CUDA: `--help` runs here (nothing skipped)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    procs = {s: subprocess.Popen([sys.executable, str(REPO / "bench" / s), "--help"], cwd=REPO, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for s in BENCH}
    for s, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0 and "--out" in stdout, f"{s} --help: {stderr[-2000:]}"
