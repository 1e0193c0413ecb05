"""ONNX export of the unrolled fixed-step sampler (lfm_fast.export.sampler), or of the velocity net alone.

The graph maps (noise, labels[, cond]) → latents, or → uint8 NHWC images with the decoder; the
batch is dynamic; the graph passes onnx.checker's full check and carries the sampler's metadata.
"""

from __future__ import annotations

import copy
import logging
import os
import warnings

import torch
from torch import nn

from lfm_fast.errors import InputError
from lfm_fast.export.sampler import UnrolledSampler, sampler_metadata
from lfm_fast.sampling import Field, SampleConfig
from lfm_fast.fileio import atomic_path

def export_onnx(model, out: str, cfg: SampleConfig, ae=None, fp16: bool = False, opset: int = 18, net_only: bool = False,
                sigma_min: float = 1e-5) -> dict:
    """Export the unrolled sampler of `cfg` (or, with net_only, the velocity network alone) and check it.

    Inputs `noise` (B, C, H, W) fp32 / `labels` (B,) int64 [/ `cond` fp32]; output `latents` (fp32) or `images`;
    a dynamic batch. With fp16 the network (and decoder) run in fp16, the ODE state and times stay fp32. The
    velocity graph takes and gives the network's dtype. Returns the metadata written into the graph."""
    import onnx

    from lfm_fast.models.dit import set_backends

    # a copy with plain-PyTorch ops only: the graph must not hold the Triton custom ops
    model = set_backends(copy.deepcopy(model).eval().cpu(), attn="reference", norm="reference")
    decoder = copy.deepcopy(ae).eval().cpu() if ae is not None else None
    scaling = float(ae.config.scaling_factor) if ae is not None else 1.0
    dtype = torch.float16 if fp16 else torch.float32
    sampler = UnrolledSampler(model.to(dtype), cfg, None if decoder is None else decoder.to(dtype), scaling, sigma_min).eval()
    c = model.config
    noise = torch.randn(2, c.in_channels, c.input_size, c.input_size)
    labels = torch.zeros(2, dtype=torch.long)
    args = [noise, labels]
    names = ["noise", "labels"]
    if c.condition != "none":
        args.append(torch.zeros(2, *c.cond_shape))
        names.append("cond")
    if net_only:
        module, names = _VelocityGraph(sampler), ["x", "t", "labels"] + names[2:]
        args = [a.to(dtype) if a.is_floating_point() else a for a in [noise, torch.full((2,), 0.5)] + args[1:]]
        output = "velocity"
    else:
        module, output = sampler, "images" if decoder is not None else "latents"
    # torch.export first: handing the exporter an ExportedProgram keeps the batch dimension symbolic.
    # Dim.DYNAMIC, not a fixed range: diffusers' decoder branches at batch 64 on a memory-layout detail
    # that does not change the math, and the ONNX graph is the same on both sides of it.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed…"
    level = registration.level
    with warnings.catch_warnings(), atomic_path(out) as tmp:
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations, nothing the user can act on
        registration.setLevel(logging.ERROR)
        try:
            exported = torch.export.export(module, tuple(args), dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in args))
            program = torch.onnx.export(exported, tuple(args), dynamo=True, input_names=names, output_names=[output],
                                        opset_version=opset, optimize=True, verbose=False)
        finally:
            registration.setLevel(level)
        program.save(tmp)
        proto = onnx.load(tmp)
        for value in list(proto.graph.input) + list(proto.graph.output):
            value.type.tensor_type.shape.dim[0].dim_param = "batch"
        meta = sampler_metadata(sampler, "float16" if fp16 else "float32")
        meta["graph"] = "velocity" if net_only else "sampler"
        if net_only:  # one network evaluation (CFG batched inside): no solver, steps or grid
            for key in ("solver", "steps", "grid", "shift", "times", "cfg_interval", "nfe", "state_dtype"):
                del meta[key]
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
        c = self.sampler.model.config
        field = Field(self.sampler.model, x.shape[0], labels if c.num_classes else None, condition, self.sampler.config.cfg)
        return field(x, t, 0.0)  # guided wherever a scale is given: the graph has no guidance interval


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
