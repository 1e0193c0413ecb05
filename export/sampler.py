"""The fixed-step latent ODE sampler as one module, shared by every non-eager backend.

`UnrolledSampler` unrolls N steps of any fixed-step solver of `lfm_fast.solvers` (the same step code the eager
sampler runs) on the chosen time grid, batches CFG inside every evaluation, and optionally ends with the AE
decoder. Exported to ONNX (→ ONNX Runtime, TensorRT) or `torch.compile`d, it is the same math.
"""

from __future__ import annotations


import torch
from torch import nn

from lfm_fast.errors import InputError
from lfm_fast.models.dit import DiT
from lfm_fast.choices import FIXED_SOLVERS, NFE_PER_STEP
from lfm_fast.sampling import Field, SampleConfig, time_grid
from lfm_fast.solvers import integrate_fixed


class UnrolledSampler(nn.Module):
    """The N steps of a fixed-step solver, unrolled. The state and the time grid are fp32 whatever the network's
    dtype (the network is cast at its boundary); `noise` and `condition` come in as fp32."""

    def __init__(self, model, cfg: SampleConfig, decoder=None, scaling_factor: float = 1.0, sigma_min: float = 1e-5):
        super().__init__()
        if cfg.solver not in FIXED_SOLVERS:
            raise InputError(f"--solver {cfg.solver}: exported samplers and the compile backend unroll fixed steps; "
                             f"expected one of {', '.join(FIXED_SOLVERS)} (or sample with --backend eager)")
        self.model, self.config, self.sigma_min = model, cfg, sigma_min
        self.decoder, self.scaling_factor = decoder, scaling_factor
        self.times = time_grid(cfg.steps, cfg.grid, cfg.shift, cfg.times)  # Python floats: constants of the graph
        self.nfe = NFE_PER_STEP[cfg.solver] * cfg.steps

    def field(self, batch: int, labels, condition) -> Field:
        c = self.model.config
        return Field(self.model, batch, labels if c.num_classes else None, condition, self.config.cfg,
                     (self.config.cfg_lo, self.config.cfg_hi))

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        x = integrate_fixed(self.field(noise.shape[0], labels, condition), noise.float(), self.times, self.config.solver,
                            self.sigma_min)
        if self.decoder is None:
            return x
        dec = next(self.decoder.parameters()).dtype
        images = self.decoder.decode((x / self.scaling_factor).to(dec)).sample
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


class GraphNet(nn.Module):
    """A velocity network behind a graph boundary: `velocity(x, t, labels, cond)` is an exported network (an ONNX
    Runtime session or a TensorRT engine, fp32 in and out) or, while a sampler graph is traced, the placeholder the
    network is spliced into. CFG is DiT's own `forward_with_cfg` (both halves in one batch through `velocity`), so
    `Field` and every solver of `lfm_fast.sampling` drive it as they drive the eager network."""

    forward_with_cfg = DiT.forward_with_cfg

    def __init__(self, config, velocity, device: str | torch.device = "cpu"):
        super().__init__()
        self.config, self.velocity, self.device = config, velocity, torch.device(device)
        self.y_embedder = True if config.num_classes else None  # forward_with_cfg asks whether labels condition

    def forward(self, x, t, y=None, cond=None):
        labels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device) if y is None else y
        return self.velocity(x, t, labels, cond)


class GraphedNet(nn.Module):
    """The network alone under torch.compile with CUDA graphs (mode="reduce-overhead"), for the solvers to drive as the
    eager network: one compile of one network call (31 s cold for DiT-XL/2 on an H200) where the unrolled sampler's
    16 calls did not compile in 200 s (bench/REPORT.md, "GPU"). A call starts a new CUDA-graph step and clones the
    output, which the next replay overwrites (a solver keeps earlier velocities). Each batch size compiles once."""

    forward_with_cfg = DiT.forward_with_cfg  # CFG's two halves in one batch, through the compiled call

    def __init__(self, model):
        super().__init__()
        self.net, self.config, self.y_embedder = model, model.config, model.y_embedder
        self.compiled = torch.compile(model, mode="reduce-overhead", dynamic=False)

    def forward(self, x, t, y=None, cond=None):
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x, t, y, cond).clone()


def compile_sampler(model, cfg: SampleConfig, decoder=None, scaling_factor: float = 1.0, sigma_min: float = 1e-5,
                    per_network: bool | None = None) -> tuple[nn.Module, int]:
    """The `compile` backend: (sampler, NFE). On CUDA (`per_network` None: the model's device decides) the unrolled
    sampler drives a `GraphedNet`; on CPU the whole unrolled sampler is compiled (inductor fuses the solver's
    arithmetic with the network's: 2.15x eager at batch 1 on the CPU, bench/REPORT.md)."""
    if per_network is None:
        per_network = next(model.parameters()).is_cuda
    if per_network:
        sampler = UnrolledSampler(GraphedNet(model), cfg, decoder, scaling_factor, sigma_min).eval()
        return sampler, sampler.nfe
    sampler = UnrolledSampler(model, cfg, decoder, scaling_factor, sigma_min).eval()
    return torch.compile(sampler, dynamic=False), sampler.nfe
