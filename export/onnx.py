"""The whole fixed-step latent ODE sampler as one ONNX graph.

`UnrolledSampler` unrolls N steps of Euler / midpoint / Heun on the chosen time grid (the same step
code as `lfm_fast.sampling`), batches CFG inside every evaluation, and optionally ends with the AE
decoder, so the graph maps (noise, labels[, condition]) → latents, or → uint8 NHWC images.
The same module, `torch.compile`d, is the `compile` backend: every backend runs the same math.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from torch import nn

from lfm_fast import __version__
from lfm_fast.errors import InputError
from lfm_fast.fileio import atomic_path
from lfm_fast.sampling import _step, time_grid

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
        self.nfe = NFE_PER_STEP[solver] * steps

    def velocity(self, x, tb, labels, condition):
        if self.model.config.num_classes and self.cfg != 1.0:
            return self.model.forward_with_cfg(x, tb, labels, self.cfg, condition)
        return self.model(x, tb, labels if self.model.config.num_classes else None, condition)

    def forward(self, noise: torch.Tensor, labels: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        x = noise
        times = self.times.to(noise.dtype)
        for i in range(self.steps):
            x = _step(self.solver, lambda x_, t_: self.velocity(x_, t_.expand(x_.shape[0]), labels, condition),
                      x, times[i], times[i + 1])
        if self.decoder is None:
            return x
        images = self.decoder.decode(x / self.scaling_factor).sample
        return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def sampler_metadata(sampler: UnrolledSampler, grid: str, shift: float, dtype: str) -> dict:
    c = sampler.model.config
    return {"lfm_fast_version": __version__, "solver": sampler.solver, "steps": str(sampler.steps), "cfg": str(sampler.cfg),
            "grid": grid, "shift": str(shift), "nfe": str(sampler.nfe),
            "latent_shape": json.dumps([c.in_channels, c.input_size, c.input_size]), "num_classes": str(c.num_classes),
            "cond_channels": str(c.cond_channels), "scaling_factor": str(sampler.scaling_factor),
            "with_decoder": str(sampler.decoder is not None).lower(), "dtype": dtype}


def export_onnx(model, out: str, solver: str = "heun", steps: int = 8, cfg: float = 1.0, grid: str = "uniform",
                shift: float = 1.0, ae=None, fp16: bool = False, opset: int = 18, net_only: bool = False) -> dict:
    """Export the unrolled sampler (or, with net_only, the velocity network alone) and check it.

    Inputs `noise` (B, C, H, W) / `labels` (B,) int64 [/ `condition`]; output `latents` or `images`;
    a dynamic batch. Returns the metadata written into the graph."""
    import onnx

    from lfm_fast.models.dit import set_backends

    # a copy with plain-PyTorch ops only: the graph must not hold the Triton custom ops
    model = set_backends(copy.deepcopy(model).eval().cpu(), attn="reference", norm="reference")
    decoder = copy.deepcopy(ae).eval().cpu() if ae is not None else None
    scaling = float(ae.config.scaling_factor) if ae is not None else 1.0
    sampler = UnrolledSampler(model, solver, steps, cfg, grid, shift, decoder, scaling)
    dtype = torch.float16 if fp16 else torch.float32
    sampler = sampler.to(dtype)
    c = model.config
    noise = torch.randn(2, c.in_channels, c.input_size, c.input_size, dtype=dtype)
    labels = torch.zeros(2, dtype=torch.long)
    args = [noise, labels]
    names = ["noise", "labels"]
    if c.cond_channels:
        args.append(torch.zeros(2, c.cond_channels, c.input_size, c.input_size, dtype=dtype))
        names.append("condition")
    if net_only:
        module, names = _VelocityGraph(sampler), ["x", "t", "labels"] + names[2:]
        args = [noise, torch.full((2,), 0.5, dtype=dtype)] + args[1:]
        output = "velocity"
    else:
        module, output = sampler, "images" if decoder is not None else "latents"
    batch = torch.export.Dim("batch", min=1, max=4096)
    dynamic = {n: {0: batch} for n in names}
    with atomic_path(out) as tmp:
        program = torch.onnx.export(module, tuple(args), dynamo=True, input_names=names, output_names=[output],
                                    dynamic_shapes=dynamic, opset_version=opset, optimize=True, verbose=False)
        program.save(tmp)
        proto = onnx.load(tmp)
        meta = sampler_metadata(sampler, grid, shift, "float16" if fp16 else "float32")
        meta["graph"] = "velocity" if net_only else "sampler"
        for k, v in meta.items():
            proto.metadata_props.add(key=k, value=v)
        onnx.save(proto, tmp)
        onnx.checker.check_model(tmp, full_check=True)
    return meta


class _VelocityGraph(nn.Module):
    """The velocity network alone (CFG batched inside when a scale is given), for the `net_only` export."""

    def __init__(self, sampler: UnrolledSampler):
        super().__init__()
        self.sampler = sampler

    def forward(self, x, t, labels, condition=None):
        return self.sampler.velocity(x, t, labels, condition)


def read_metadata(path: str) -> dict:
    import onnx

    if not os.path.isfile(path):
        raise InputError(f"--engine {path}: no such file")
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception as e:  # onnx raises DecodeError and others for files that are not ONNX
        raise InputError(f"--engine {path}: not an ONNX model ({e.__class__.__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    if "lfm_fast_version" not in meta:
        raise InputError(f"--engine {path}: an ONNX model, but not one exported by `lfm-fast export`")
    return meta
