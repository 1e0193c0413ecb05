"""`python -m lfm_fast.launch TORCHRUN-ARGS…`: torchrun for `lfm-fast --nproc N`, ending as every lfm-fast command does.

torchrun reports any worker that exits non-zero with a log line and a ChildFailedError traceback (exit 1). Here a
worker's bad input (exit 2: it has printed its one line `lfm-fast: error: …`) ends the launch with exit 2 and
nothing more; a crash ends it with torchrun's failure summary, whose root cause is the first failing rank's
traceback (the workers' `main` runs under torch.distributed.elastic's `record`, which writes it), and exit 1.
"""

from __future__ import annotations

import logging
import signal
import sys


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the failures are reported below
    # SLURM's --signal=USR1 reaches every process of the step: torchrun has no handler and would die of it, orphaning
    # its workers (which stop on it themselves). A handler, not SIG_IGN: the workers it starts get the default back
    signal.signal(signal.SIGUSR1, lambda signum, frame: None)
    try:
        torchrun(argv)
    except ChildFailedError as e:
        codes = {failure.exitcode for failure in e.failures.values()}
        # bad input on some rank, the others stopped by torchrun's SIGTERM: killed by it (-15), or ended by lfm-fast's
        # own handler (143 = 128 + SIGTERM) when they were further along: the bad input's line is printed
        if 2 in codes and codes <= {2, -15, 128 + 15}:
            return 2
        print(e.format_msg(), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from lfm_fast.cli import end

    end(main(sys.argv[1:]))
