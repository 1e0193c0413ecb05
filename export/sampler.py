"""The fixed-step latent ODE sampler as one module, shared by every non-eager backend.

`UnrolledSampler` unrolls N steps of Euler / midpoint / Heun on the chosen time grid (the same step
code as `lfm_fast.sampling`), batches CFG inside every evaluation, and optionally ends with the AE
decoder. Exported to ONNX (→ ONNX Runtime, TensorRT) or `torch.compile`d, it is the same math.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from lfm_fast import __version__
from lfm_fast.errors import InputError
from lfm_fast.sampling import SampleConfig, solver_step, time_grid

EXPORT_SOLVERS = ("euler", "midpoint", "heun")
NFE_PER_STEP = {"euler": 1, "midpoint": 2, "heun": 2}


class UnrolledSampler(nn.Module):
    def __init__(self, model, solver: str = "heun", steps: int = 8, cfg: float = 1.0, grid: str = "uniform",
                 shift: float = 1.0, decoder=None, scaling_factor: float = 1.0):
        super().__init__()
        if solver not in EXPORT_SOLVERS:
            raise InputError(f"--solver {solver}: the exported sampler unrolls fixed steps; expected one of {', '.join(EXPORT_SOLVERS)}")
        self.model, self.solver, self.steps, self.cfg = model, solver, steps, float(cfg)
        self.decoder, self.scaling_factor = decoder, scaling_factor
        self.register_buffer("times", time_grid(steps, grid, shift), persistent=False)
        self.grid, self.shift = grid, shift
        self.nfe = NFE_PER_STEP[solver] * steps

    def velocity(self, x, tb, labels, condition):
        c = self.model.config
        y = labels if c.num_classes else None
        if self.cfg != 1.0 and (c.num_classes or c.condition != "none"):
            return self.model.forward_with_cfg(x, tb, y, self.cfg, condition)
        return self.model(x, tb, y, condition)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        x = noise
        times = self.times.to(noise.dtype)
        for i in range(self.steps):
            x = solver_step(self.solver, lambda x_, t_: self.velocity(x_, t_.expand(x_.shape[0]), labels, condition),
                      x, times[i], times[i + 1])
        if self.decoder is None:
            return x
        images = self.decoder.decode(x / self.scaling_factor).sample
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def sampler_metadata(sampler: UnrolledSampler, dtype: str) -> dict:
    c = sampler.model.config
    return {"lfm_fast_version": __version__, "solver": sampler.solver, "steps": str(sampler.steps), "cfg": str(sampler.cfg),
            "grid": sampler.grid, "shift": str(sampler.shift), "nfe": str(sampler.nfe),
            "latent_shape": json.dumps([c.in_channels, c.input_size, c.input_size]), "num_classes": str(c.num_classes),
            "condition": c.condition, "cond_shape": json.dumps(list(c.cond_shape)), "scaling_factor": str(sampler.scaling_factor),
            "with_decoder": str(sampler.decoder is not None).lower(), "dtype": dtype}




def compile_sampler(model, cfg: SampleConfig, decoder=None, scaling_factor: float = 1.0) -> tuple[nn.Module, int]:
    """The `compile` backend: the unrolled sampler under torch.compile (CUDA: CUDA graphs via
    mode="reduce-overhead"; CPU: inductor's default). Returns (compiled module, NFE)."""
    sampler = UnrolledSampler(model, cfg.solver, cfg.steps, cfg.cfg, cfg.grid, cfg.shift, decoder, scaling_factor).eval()
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
    return torch.compile(sampler, mode=mode, dynamic=False), sampler.nfe
