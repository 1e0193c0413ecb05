"""Mutation testing of the modules whose arithmetic the tests must pin (`make mutate`; mutmut 3, configured in
pyproject.toml's [tool.mutmut]): mutmut changes one operator, constant or call at a time and runs the tests that
reach that function; a mutant no test fails on "survived". Prints the score (killed / (killed + survived), timeouts
counted as killed) of each scope and writes them, with the surviving mutants' names, to --out.

Usage: python bench/mutate.py [--scope flow,ema,...] [--out bench/results/cpu/mutation.json] [--no-run]
`mutmut show NAME` (in this folder) prints a survivor's diff; `--no-run` only reads the results of the last run.
About 1–3 s a mutant that a fast test kills, and the whole selection of tests that reach it for a survivor.
"""

import argparse
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# scope → mutmut mutant-name globs (a function's mutants are named MODULE.x_FUNCTION__mutmut_N, methods xǁCLASSǁNAME)
SCOPES = {
    "flow": ["lfm_fast.flow.*"],
    "sampling": ["lfm_fast.sampling.*"],
    "ema": ["lfm_fast.train.ema.*"],
    "tasks": ["lfm_fast.tasks.*"],
    "masks": ["lfm_fast.data.masks.*"],
    "conditioning": ["lfm_fast.models.cond.*", "lfm_fast.models.dit.xǁDiTǁforward__mutmut_*",
                     "lfm_fast.models.dit.xǁDiTǁforward_with_cfg__mutmut_*", "lfm_fast.models.dit.x__check_condition__mutmut_*"],
    "lr_schedule": ["lfm_fast.train.loop.x_lr_lambda__mutmut_*"],
}
STATUS = {1: "killed", 3: "killed", 0: "survived", 36: "timeout", 24: "timeout", -24: "timeout", 152: "timeout",
          255: "timeout", 5: "no tests", 33: "no tests", 34: "skipped", None: "not checked"}


def results() -> dict[str, int | None]:
    """{mutant name: exit code} from mutmut's .meta files of the last run."""
    out = {}
    for meta in (ROOT / "mutants").rglob("*.meta"):
        out.update(json.loads(meta.read_text()).get("exit_code_by_key", {}))
    return out


def summary(codes: dict[str, int | None], globs: list[str]) -> dict:
    from fnmatch import fnmatch

    mine = {k: v for k, v in codes.items() if any(fnmatch(k, g) for g in globs)}
    counts = Counter(STATUS.get(v, "suspicious") for v in mine.values())
    killed = counts["killed"] + counts["timeout"]
    checked = killed + counts["survived"]
    return {"mutants": len(mine), **dict(counts), "score": round(killed / checked, 4) if checked else None,
            "survivors": sorted(k for k, v in mine.items() if STATUS.get(v) == "survived")}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scope", default=",".join(SCOPES), help=f"comma-separated, of: {', '.join(SCOPES)}")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "cpu" / "mutation.json"))
    p.add_argument("--no-run", action="store_true", help="summarise the last run only")
    a = p.parse_args()
    scopes = a.scope.split(",")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        p.error(f"--scope: unknown {', '.join(unknown)}")
    if not a.no_run:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        mutmut = Path(sys.executable).with_name("mutmut")
        subprocess.run([str(mutmut), "run", *[g for s in scopes for g in SCOPES[s]]], cwd=ROOT, env=env, check=True)
    codes = results()
    table = {s: summary(codes, SCOPES[s]) for s in scopes}
    for s, r in table.items():
        score = "-" if r["score"] is None else f"{100 * r['score']:.1f} %"
        print(f"{s:13s} {r['mutants']:5d} mutants  killed {r.get('killed', 0):4d}  timeout {r.get('timeout', 0):3d}  "
              f"survived {r.get('survived', 0):4d}  not checked {r.get('not checked', 0):4d}  score {score}")
    previous = json.loads(Path(a.out).read_text()) if os.path.exists(a.out) else {}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({**previous, **table}, indent=1) + "\n")


if __name__ == "__main__":
    main()
