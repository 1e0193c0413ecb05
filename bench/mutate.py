"""Mutation testing of the modules whose arithmetic the tests must pin (`make mutate`, mutmut 3): mutmut changes one
operator, constant or call at a time and runs the tests that reach that function; a mutant no test fails on
"survived". Each scope runs in a copy of the package and tests under mutants-work/SCOPE (mutmut's own working
folder) with that scope's test files; prints each scope's score (killed / (killed + survived + no tests); a timeout
counts as killed, a mutant no selected test reaches as survived) and writes the scores and the surviving mutants'
names to --out.

Usage: python bench/mutate.py [--scope ema,lr_schedule,...] [--out bench/results/cpu/mutation.json] [--tests-from REF]
       [--max-children N]
`--tests-from REF` takes tests/ from git revision REF (the mutation score of older tests against today's code).
`--rerun survivors` runs only the last run's survivors of each scope again, with the working tree's tests: the score
of tests added for them (the killed mutants stay killed, tests being only added or made stricter). `--rerun killed
--tests-from REF` runs only the last run's killed mutants with REF's older tests: the older tests' score, taking the
last run's survivors as surviving them too (older tests are weaker) at the cost of the cheap mutants only.
A rerun keeps the last run's copy of lfm_fast/ (its mutants), and reruns only mutants the last run decided: those
it left "not checked" (an interrupted run) are not in the score; run the scope again without --rerun for them.
`cd mutants-work/SCOPE && mutmut show NAME` prints a survivor's diff. About 1–3 s for a mutant a fast test kills;
a survivor costs every selected test that reaches it.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from fnmatch import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scope → (mutant-name globs: a function's mutants are MODULE.x_FUNCTION__mutmut_N, a method's xǁCLASSǁNAME…,
#          the test files that exercise it, a -k filter or "")
SCOPES = {
    "flow": (["lfm_fast.flow.*"], ["tests/test_flow.py", "tests/test_train.py"], "not tensorboard and not benchmark_run"),
    "sampling": (["lfm_fast.sampling.*", "lfm_fast.solvers.*"], ["tests/test_sampling.py", "tests/test_calibrate.py"], "not cli"),
    "ema": (["lfm_fast.train.ema.*"], ["tests/test_train.py"], "not tensorboard and not benchmark_run"),
    # tasks.py's functions each have a unit test on small files (the end-to-end tests in test_tasks.py go through a
    # model trained in their fixture: ~30 s a mutant)
    "tasks": (["lfm_fast.tasks.*"], ["tests/test_task_inputs.py"], ""),
    "masks": (["lfm_fast.data.masks.*"], ["tests/test_masks.py"], ""),
    "conditioning": (["lfm_fast.models.cond.*", "lfm_fast.models.dit.xǁDiTǁforward__mutmut_*",
                      "lfm_fast.models.dit.xǁDiTǁforward_with_cfg__mutmut_*", "lfm_fast.models.dit.x__check_condition__mutmut_*"],
                     ["tests/test_dit.py", "tests/test_masks.py", "tests/test_flow.py", "tests/test_convert.py"], "not cli"),
    "lr_schedule": (["lfm_fast.train.step.x_lr_lambda__mutmut_*"], ["tests/test_prepare.py"], "cosine or lr_schedule"),
}


def module_files(globs: list[str]) -> list[str]:
    """lfm_fast/x/y.py for each module a glob names."""
    mods = {g.split(".x")[0].rstrip("*").rstrip(".") for g in globs}
    return sorted(m.replace(".", "/") + ".py" for m in mods)


def prepare(scope: str, tests_from: str | None) -> Path:
    work = ROOT / "mutants-work" / scope
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(ROOT / "lfm_fast", work / "lfm_fast", ignore=shutil.ignore_patterns("__pycache__"))
    copy_tests(work / "tests", tests_from)
    write_config(work, scope)
    return work


def write_config(work: Path, scope: str) -> None:
    """mutmut's settings for the scope: its modules, forkserver isolation, its test files and -k filter."""
    globs, tests, k = SCOPES[scope]
    selection = json.dumps(tests + (["-k", k] if k else []))
    (work / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        'source_paths = ["lfm_fast"]\n'
        f"only_mutate = {json.dumps(module_files(globs))}\n"
        'process_isolation = "forkserver"\n'  # torch's thread pools do not survive a fork of a process that ran tests
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "no:benchmark", "-p", "no:xdist"]\n'
        f"pytest_add_cli_args_test_selection = {selection}\n")


def rerun(scope: str, which: str, tests_from: str | None) -> tuple[Path, list[str]]:
    """The scope's last work folder with the working tree's (or REF's) tests in it, mutmut's test-to-function map
    dropped (it is collected again for these tests), and the names of the last run's survivors or killed mutants."""
    work = ROOT / "mutants-work" / scope
    if not (work / "mutants").is_dir():
        sys.exit(f"mutate.py: --rerun {which}: no earlier run of {scope} in {work} (run it without --rerun first)")
    last = summary(work, SCOPES[scope][0])
    names = last["survivors"] if which == "survivors" else last["killed_names"]
    for tests in (work / "tests", work / "mutants" / "tests"):
        shutil.rmtree(tests, ignore_errors=True)
        copy_tests(tests, tests_from)
    (work / "mutants" / "mutmut-stats.json").unlink(missing_ok=True)
    write_config(work, scope)  # the scope's test files as they are now
    return work, names


def copy_tests(dest: Path, tests_from: str | None) -> None:
    """tests/ of the working tree, or of git revision `tests_from`, to `dest`."""
    if tests_from:
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, check=True, capture_output=True).stdout
        dest.mkdir(parents=True)
        subprocess.run(["tar", "-x", "--strip-components=1", "-C", str(dest)], input=archive, check=True)
    else:
        shutil.copytree(ROOT / "tests", dest, ignore=shutil.ignore_patterns("__pycache__"))


def summary(work: Path, globs: list[str]) -> dict:
    codes = {}
    for meta in (work / "mutants").rglob("*.meta"):
        codes.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    from mutmut.stats import status_by_exit_code  # mutmut's own reading of its exit codes

    mine = {k: v for k, v in codes.items() if any(fnmatch(k, g) for g in globs)}
    status = {k: status_by_exit_code[v] for k, v in mine.items()}
    counts = Counter(status.values())
    killed = counts["killed"] + counts["timeout"]
    checked = killed + counts["survived"] + counts["no tests"]  # a mutant no selected test reaches is not caught either
    return {"mutants": len(mine), **dict(counts), "score": round(killed / checked, 4) if checked else None,
            "survivors": sorted(k for k, s in status.items() if s in ("survived", "no tests")),
            "killed_names": sorted(k for k, s in status.items() if s in ("killed", "timeout"))}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scope", default=",".join(SCOPES), help=f"comma-separated, of: {', '.join(SCOPES)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "mutation.json"),
                   help="the JSON the scores are merged into, under the tests' revision (default: %(default)s)")
    p.add_argument("--tests-from", metavar="REF", help="the tests of this git revision (e.g. a 'before' score)")
    p.add_argument("--rerun", choices=("survivors", "killed"), help="only the last run's survivors or killed mutants (see above)")
    p.add_argument("--max-children", type=int, help="mutants run at once (default: mutmut's, one a core); 1 leaves a core free")
    p.add_argument("--label", help="the key the scores go under in --out (default: 'tests of REF' or 'tests of the working tree')")
    a = p.parse_args()
    scopes = [s for s in a.scope.split(",") if s]
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        p.error(f"--scope: unknown {', '.join(unknown)}" if unknown else "--scope: name at least one scope")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    mutmut = Path(sys.executable).with_name("mutmut")
    table = {}
    if a.rerun == "killed" and not a.tests_from:
        p.error("--rerun killed scores older tests: give them with --tests-from REF")
    if a.rerun == "survivors" and a.tests_from:
        p.error("--rerun survivors runs the working tree's tests: no --tests-from with it")
    for scope in scopes:
        work, names = rerun(scope, a.rerun, a.tests_from) if a.rerun else (prepare(scope, a.tests_from), SCOPES[scope][0])
        if names:
            jobs = ["--max-children", str(a.max_children)] if a.max_children else []
            subprocess.run([str(mutmut), "run", *jobs, *names], cwd=work, env=env, check=True, stdout=subprocess.DEVNULL)
        r = table[scope] = summary(work, SCOPES[scope][0])
        r.pop("killed_names")
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f} %"
        print(f"{scope:13s} {r['mutants']:5d} mutants  killed {r.get('killed', 0):4d}  timeout {r.get('timeout', 0):3d}  "
              f"survived {r.get('survived', 0):4d}  no tests {r.get('no tests', 0):3d}  not checked {r.get('not checked', 0):4d}  score {score}", flush=True)
    key = a.label or (f"tests of {a.tests_from}" if a.tests_from else "tests of the working tree")
    previous = json.loads(Path(a.out).read_text()) if os.path.exists(a.out) else {}
    previous.setdefault(key, {}).update(table)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(previous, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
