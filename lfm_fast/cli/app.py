"""The `lfm-fast` program: the parser assembled from the command modules, dispatch, and how a command ends (its
one error or stop line, its exit code, `--nproc`'s relaunch under torchrun).

A bad input ends with one line `lfm-fast: error: …` on stderr, exit code 2, and no partial output.
"""

from __future__ import annotations

import argparse
import atexit
import ctypes
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings

from lfm_fast.cli import calibrate, convert, demo, eval, export, prepare, presets, sample, train, train_ae
from lfm_fast.cli.common import Parser
from lfm_fast.errors import InputError, RunError

EXAMPLES = """examples:
  lfm-fast demo --out runs/demo
  lfm-fast prepare --ae builtin:shapes --data shapes --out runs/latents
  lfm-fast train-ae --data shapes --out runs/ae --steps 2500 --latent-noise 0.1 --scale-equivariance 0.5
  lfm-fast train --latents runs/latents --preset small-data --out runs/dit --steps 2000 train.lr=5e-4
  lfm-fast train --nproc 2 --latents runs/latents --preset small-data --out runs/dit2 train.precision=bf16
  lfm-fast sample --ckpt runs/dit --num-images 64 --labels 0,3 --solver heun --ode-steps 16 --cfg 2 --seed 0 --out runs/samples
  lfm-fast export --ckpt runs/dit --format onnx --solver heun --ode-steps 8 --cfg 2 --with-decoder --out runs/sampler.onnx
  lfm-fast sample --ckpt runs/dit --backend onnxruntime --engine runs/sampler.onnx --num-images 64 --out runs/samples-ort
  lfm-fast calibrate --ckpt runs/dit --solver dpm++2m --nfe 16 --cfg 2
  lfm-fast sample --ckpt runs/dit --solver dpm++2m --ode-steps 16 --cfg 2 --grid calibrated --out runs/samples-cal
"""
# in `lfm-fast --help`'s order; each module has add_parser(sub) and run(args)
MODULES = {"presets": presets, "demo": demo, "train-ae": train_ae, "prepare": prepare, "train": train, "sample": sample,
           "export": export, "calibrate": calibrate, "convert": convert, "eval": eval}
COMMANDS = {name: module.run for name, module in MODULES.items()}


def build_parser() -> argparse.ArgumentParser:
    """The whole command line, built without importing torch (`--help` answers in a fraction of a second)."""
    from lfm_fast import __version__

    p = Parser(prog="lfm-fast", description="Latent flow matching: train and sample DiT velocity networks "
               "in an autoencoder's latent space.", epilog=EXAMPLES)
    p.add_argument("--version", action="version", version=f"lfm-fast {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", help="one of these (each has --help):")
    for module in MODULES.values():
        module.add_parser(sub)
    return p


def relaunch(argv: list[str], nproc: int) -> int:
    """`--nproc N` outside torchrun: run the same command under torchrun on N local processes. SIGTERM, SIGUSR1 and
    SIGINT are passed on to the workers (torchrun's children), which finish their step, checkpoint and exit 0, so torchrun
    ends normally; we wait for it, leaving no orphans. (Signalled itself, torchrun would pass the signal on too, but
    end with a SignalException traceback and exit 1 after workers that stopped cleanly.) Before the workers exist,
    torchrun gets the signal."""
    from lfm_fast.dist import torchrun_command

    rest, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    # its own session: a terminal's Ctrl-C (a SIGINT to the foreground process group) reaches us alone, and the workers
    # get it once, from us (torchrun would also pass it on: a second SIGINT, a KeyboardInterrupt mid-step)
    child = subprocess.Popen(torchrun_command(nproc, rest), start_new_session=True)

    def pass_on(signum, frame):
        for pid in child_pids(child.pid) or [child.pid]:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    forward = {s: signal.signal(s, pass_on) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = child.wait()
        if -code in STOPPED:  # torchrun itself stopped by a signal, before it had workers to pass it on to
            report(STOPPED[-code])
        return shell_code(code)
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)


def child_pids(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc; [] where that is unavailable)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def main(argv: list[str] | None = None) -> int:
    """Under torchrun (which names an error file), through torch.distributed.elastic's `record`: a crash's traceback
    goes to the file torchrun reads, so its failure summary shows the failing rank's traceback."""
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        return _main(argv)
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_main)(argv)


def entry() -> None:
    """The `lfm-fast` command and `python -m lfm_fast`: `main`, ending through `exit_now`. A reader that closed the
    pipe early (`lfm-fast presets | head -1`) ends the output quietly (exit 1, no traceback)."""
    try:
        code = main()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe
        code = 1
    exit_now(code)


# the line a command stopped by Ctrl-C or SIGTERM ends with (its exit code: 128 + the signal's number, as a shell's)
STOPPED = {signal.SIGINT: "lfm-fast: interrupted", signal.SIGTERM: "lfm-fast: terminated (SIGTERM); nothing half-written is left"}


def shell_code(returncode: int) -> int:
    """A child's return code as a shell reports it: 128 + N for one killed by signal N (subprocess gives -N)."""
    return 128 - returncode if returncode < 0 else returncode


def report(line: str) -> None:
    """The one line a command ends with when it fails or is stopped (`lfm-fast: error: …`, `… interrupted`,
    `… terminated`). Every rank meets it; the user sees it once. Under torchrun each rank also writes it to its error
    file (torchrun's failure summary reads it). Under `--nproc` (`lfm_fast.launch`) no worker prints: the launcher
    prints one line from the error files, since a rank that printed itself could be stopped by torchrun (after
    another rank's exit) before it did. Elsewhere rank 0 prints it."""
    from lfm_fast.dist import is_main_process

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the command is ending: torchrun's SIGTERM must not cut the line
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if error_file:  # in the layout of torch.distributed.elastic's `record`; whole or not at all (torchrun parses it)
        with open(error_file + ".tmp", "w") as f:
            json.dump({"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}, f)
        os.replace(error_file + ".tmp", error_file)
        if os.environ.get("LFM_FAST_LAUNCH"):
            return
    if is_main_process():
        print(line, file=sys.stderr)


def exit_now(code: int) -> None:
    """End the process as Python's own exit would, without its teardown of the modules: once torch is imported, that
    teardown (garbage collection over every module's objects) took 0.8–2.5 s here at the end of each command and of
    each torchrun worker (which torchrun waits for). What an exit owes still happens, in Python's order: threading's
    exit hooks (which shut down thread pools left open) and the join of non-daemon threads, the atexit handlers
    (logging, tqdm, temporary folders), the flush of stdout, stderr and C's stdio. As with Python's exit, stdout that
    cannot be written (a full disk) turns a success into exit 120; a closed pipe does not. Files left open without a
    close are not flushed (lfm-fast writes every file in a `with` block). Only a normal return comes here: an
    exception still unwinds and prints as usual."""
    threading._shutdown()  # what Python's exit runs first: threading's atexit hooks, then the non-daemon joins
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except ValueError:  # closed: nothing more can be written to it
            pass
        except OSError as e:
            if e.errno != errno.EPIPE and stream is sys.stdout and code == 0:
                code = 120
    try:
        ctypes.CDLL(None).fflush(None)  # output of C libraries (NCCL, gloo) still in their stdio buffers
    except (OSError, AttributeError):
        pass
    os._exit(code)


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings as one line, like our errors; other packages' as Python prints them."""
    if f"{os.sep}lfm_fast{os.sep}" in filename:
        return f"lfm-fast: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


class Terminated(BaseException):
    """SIGTERM outside training (which checkpoints on it): unwinds like Ctrl-C, so every half-written output (the
    temporary folders of `fileio.atomic_dir`) is removed on the way out."""


def _terminate(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM (torchrun stopping the other ranks) must not
    raise Terminated()                                # cut short the removal of what is half-written


LOCKED = ("train", "prepare", "sample")  # the commands that write a run folder over minutes to hours


def _run_lock(args):
    """The lock on --out for the whole run, held by one process: the one started by the user (a single process, or
    the parent of --nproc's workers), or rank 0 of a run torchrun started directly (SLURM)."""
    import contextlib

    from lfm_fast.fileio import out_lock

    worker = os.environ.get("LFM_FAST_LAUNCH") == "1" or os.environ.get("RANK", "0") != "0"
    if args.command not in LOCKED or worker or not getattr(args, "out", None):
        return contextlib.nullcontext()
    return out_lock(args.out)


def _main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    warnings.formatwarning = _format_warning
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or argparse's one-line error
        return int(e.code or 0)
    from lfm_fast.dist import launched_by_torchrun, shutdown

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        print(f"lfm-fast: error: --nproc {nproc}: expected a positive count", file=sys.stderr)
        return 2
    if nproc and not launched_by_torchrun():
        try:
            with _run_lock(args):  # held by this parent while its workers run
                return relaunch(argv, nproc)
        except InputError as e:
            report(f"lfm-fast: error: {e}")
            return 2
    previous = signal.signal(signal.SIGTERM, _terminate) if threading.current_thread() is threading.main_thread() else None
    try:
        with _run_lock(args):
            COMMANDS[args.command](args)
    except InputError as e:
        report(f"lfm-fast: error: {e}")
        return 2
    except RunError as e:
        report(f"lfm-fast: error: {e}")
        return 1
    except (KeyboardInterrupt, Terminated) as e:
        stop = signal.SIGINT if isinstance(e, KeyboardInterrupt) else signal.SIGTERM
        report(STOPPED[stop])
        return shell_code(-stop)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        shutdown()
    return 0
