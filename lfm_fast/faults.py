"""Fault injection for the tests, behind one environment variable: LFM_FAST_FAULT=<point>:<step> or
<point>:<first>-<last>. The points: step (a training step), save (a checkpoint being written), prepare-shard (a latent shard written), nan (a step's
loss made non-finite), slow (a step that sleeps, for the signal tests); raise-<point> raises where <point> kills.
Unset (every user run), each check is one dictionary lookup.
"""

from __future__ import annotations

import os
import signal
import time


def fault_active(point: str, step: int) -> bool:
    """Fault injection for the tests: LFM_FAST_FAULT=<point>:<step> or <point>:<first>-<last>."""
    name, _, steps = os.environ.get("LFM_FAST_FAULT", "").partition(":")
    if name != point or not steps:
        return False
    first, _, last = steps.partition("-")
    return int(first) <= step <= int(last or first)


def fault_point(point: str, step: int) -> None:
    """LFM_FAST_FAULT=<point>:<step> SIGKILLs this process there (a crash, for the resume tests);
    raise-<point>:<step> raises an exception there (a bug, for the launcher's error reports)."""
    if fault_active(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if fault_active(f"raise-{point}", step):
        raise RuntimeError(f"injected fault at {point} {step}")


class TrainingFaults:
    """The training loop's one fault hook: `poisons(step)`, whether step's loss is made NaN (nan:STEP), and
    `after_step(step)`, once that step is done: SIGKILL or raise there (step:STEP), or sleep 0.5 s (slow:STEP, a
    step long enough for the signal tests to land in)."""

    def poisons(self, step: int) -> bool:
        return fault_active("nan", step)

    def after_step(self, step: int) -> None:
        fault_point("step", step)
        if fault_active("slow", step):
            time.sleep(0.5)
