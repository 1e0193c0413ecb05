"""`python -m lfm_fast.launch TORCHRUN-ARGS…`: torchrun for `lfm-fast --nproc N`, ending as every lfm-fast command does.

torchrun reports any worker that exits non-zero with a log line and a ChildFailedError traceback (exit 1). Here a
worker's bad input (exit 2), failed run (exit 1), Ctrl-C (130) or SIGTERM (143) ends the launch with its one line
(`lfm-fast: error: …`) and its exit code: the workers write that line to their torchrun error files instead of
printing it (`cli.report`). A crash ends the launch with torchrun's failure summary, whose root cause is the first
failing rank's traceback (the workers' `main` runs under torch.distributed.elastic's `record`, which writes it),
and exit 1.
"""

from __future__ import annotations

import logging
import os
import signal
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    from lfm_fast.cli.app import shell_code

    # the failures are reported below; torchrun's note that each worker gets OMP_NUM_THREADS=1 (where it is unset)
    # would come before a bad input's one line (docs/gpu-and-cluster.md says it)
    for name in ("torch.distributed.elastic", "torch.distributed.elastic.multiprocessing.errors", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)  # (the second and third have levels of their own)
    os.environ["LFM_FAST_LAUNCH"] = "1"  # the workers leave their error line to us (see the module doc)
    # SLURM's --signal=USR1 reaches every process of the step: torchrun has no handler and would die of it, orphaning
    # its workers (which stop on it themselves). A handler, not SIG_IGN: the workers it starts get the default back
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        torchrun(argv)
    except ChildFailedError as e:
        # each worker that failed or was stopped wrote its one line (`lfm-fast: error: …`, `… interrupted`, `…
        # terminated`) to its error file; a rank that torchrun killed after another rank's exit has none (-15). An
        # error's line wins over a stop's (the stop was torchrun's, after that error), the lowest rank's over the
        # others'. Anything else (a crash: a traceback in its error file) gets torchrun's own summary
        messages = {rank: f.message.get("message") if isinstance(f.message, dict) else f.message for rank, f in e.failures.items()}
        ours = {rank: m for rank, m in messages.items() if isinstance(m, str) and m.startswith("lfm-fast: ")}
        if ours and all(rank in ours or f.exitcode == -signal.SIGTERM for rank, f in e.failures.items()):
            # (a rank that torchrun killed after it wrote its line: that line, another rank's exit code)
            rank = min(ours, key=lambda r: (not ours[r].startswith("lfm-fast: error:"), e.failures[r].exitcode < 0, r))
            print(ours[rank], file=sys.stderr)
            return shell_code(e.failures[rank].exitcode)
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from lfm_fast.cli.app import exit_now

    exit_now(main(sys.argv[1:]))
