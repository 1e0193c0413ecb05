"""What the commands share: the parser class, flags several commands take, and number checks. Torch-free."""

from __future__ import annotations

import argparse
import difflib
import sys

from lfm_fast.errors import InputError


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default (where it has one worth saying)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not any(action.default is v for v in (None, False, True, argparse.SUPPRESS)) and action.option_strings):
            text += " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a bad choice) as one line too, like every other bad input, with a
    "did you mean" for a mistyped command or flag; --help with the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_args(self, args=None, namespace=None):
        """A mistyped command or flag is named first (argparse would report a required flag as missing instead)."""
        args = sys.argv[1:] if args is None else list(args)
        commands = next((a.choices for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        command = next((a for a in args if not a.startswith("-")), None)
        if commands and command is not None and command not in commands:
            self.error(f"unknown command {command!r}{did_you_mean(command, commands)}")
        if commands and command in commands:
            sub = commands[command]
            known = [s for a in sub._actions for s in a.option_strings]
            rest = args[args.index(command) + 1:]
            for token in rest[:rest.index("--")] if "--" in rest else rest:
                name = token.split("=", 1)[0]
                if name.startswith("--") and not any(k.startswith(name) for k in known):  # (argparse takes a prefix)
                    sub.error(f"unrecognized argument {name}{did_you_mean(name, known)}")
        return super().parse_args(args, namespace)


    def error(self, message):
        command = self.prog.removeprefix("lfm-fast").strip()
        self.exit(2, f"lfm-fast: error: {command + ': ' if command else ''}{message} (see {self.prog} --help)\n")


def did_you_mean(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def add_num_images(p, default: int, help: str):
    """--num-images (every command's spelling of a count of images), with --num as its hidden old spelling."""
    p.add_argument("--num-images", dest="num", type=int, default=default, metavar="N", help=help)
    p.add_argument("--num", dest="num", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def add_overwrite_flag(p):
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out, if lfm-fast wrote it (never '.', a folder above it, or a training run)")


def add_nproc_flag(p):
    p.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="run on N local processes (starts torchrun for you, as `torchrun --nproc_per_node=N -m "
                   "lfm_fast -- …` would, and reports a failure in one line). Multi-node: call torchrun yourself "
                   "(docs/gpu-and-cluster.md)")


def add_backend_flags(p):
    from lfm_fast.choices import ATTENTION_BACKENDS, NORM_BACKENDS

    p.add_argument("--attn-backend", choices=ATTENTION_BACKENDS, default=None,
                   help="attention kernels (default: the config's, 'auto' = SDPA on CUDA; on CPU plain matmuls (math) for bf16 up to 512 tokens, else SDPA; 'triton' = the fused kernels)")
    p.add_argument("--norm-backend", choices=NORM_BACKENDS, default=None,
                   help="adaLN modulate / gated residual kernels, model.norm_backend: triton (fused Triton kernels; on "
                   "CPU they run Triton's interpreter only under TRITON_INTERPRET=1), compile (the PyTorch expression, "
                   "for torch.compile to fuse), reference (plain PyTorch), auto (Triton on CUDA in eager, PyTorch under compile and on CPU; default: "
                   "the config's)")
    p.add_argument("--kernels", dest="norm_backend", choices=NORM_BACKENDS, default=None, help=argparse.SUPPRESS)  # old name


def backend_overrides(args) -> dict:
    return {k: v for k, v in (("attn_backend", args.attn_backend), ("norm_backend", args.norm_backend)) if v is not None}


def add_grid_flags(p):
    from lfm_fast.choices import GRIDS

    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale, 1 = off (default: the checkpoint's)")
    p.add_argument("--cfg-interval", default=None, metavar="LO:HI",
                   help="apply CFG only where LO ≤ t ≤ HI (t = 1 noise, 0 data); elsewhere the conditional half alone "
                        "(default: the checkpoint's, 0:1 = everywhere)")
    p.add_argument("--grid", choices=GRIDS, default=None,
                   help="time grid of fixed-step solvers: uniform; shifted (SD3's shift); power (t_i = (1 − i/N)^ρ, ρ = "
                        "--shift); calibrated (fitted by `lfm-fast calibrate`, stored with the checkpoint) "
                        "(default: the checkpoint's)")
    p.add_argument("--shift", type=float, default=None, help="the shifted grid's shift, or the power grid's ρ (default: the checkpoint's)")


class Once(argparse.Action):
    """A flag and its old spelling both given with different values: refused, not the last one silently kept."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) not in (None, values):
            parser.error(f"{option_string} {values}: the same setting as {flag(self.dest)} given before "
                         f"({getattr(namespace, self.dest)}); --steps is its old spelling; give it once")
        setattr(namespace, self.dest, values)


def add_ode_steps(p, help: str):
    """--ode-steps (the ODE solver's; `train --steps` counts optimizer steps), with --steps as its hidden old spelling."""
    p.add_argument("--ode-steps", dest="steps", type=int, default=None, metavar="N", action=Once, help=help)
    p.add_argument("--steps", dest="steps", type=int, default=None, action=Once, help=argparse.SUPPRESS)


def flag(name: str) -> str:
    """The sampler flag of a SampleConfig field: `steps` → --ode-steps, `cfg_interval` → --cfg-interval."""
    return "--ode-steps" if name == "steps" else "--" + name.replace("_", "-")


def check_positive(name: str, value, allow_zero: bool = False):
    if value != value or value in (float("inf"), float("-inf")):
        raise InputError(f"{name} {value}: expected a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        raise InputError(f"{name} {value}: expected a {'non-negative' if allow_zero else 'positive'} number")


def parse_interval(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise InputError(f"--cfg-interval {text}: expected LO:HI, two numbers in [0, 1] (e.g. 0.1:0.7)") from None
    if not 0 <= lo <= hi <= 1:
        raise InputError(f"--cfg-interval {text}: expected 0 ≤ LO ≤ HI ≤ 1")
    return lo, hi
