"""ONNX export: the unrolled fixed-step sampler (graph "sampler"), or the velocity network alone ("velocity").

The network is traced once. A sampler graph is the solver of `lfm_fast.export.sampler` traced around a
placeholder op (`lfm_fast.graph::Velocity`, one per evaluation), into which the network's nodes are spliced,
its weights shared by every evaluation: export time and file size grow with the network, not with the steps.

Both graphs take and give fp32 (the noise, the ODE state, the times, the velocity); with `dtype` float16 or
bfloat16 the network runs in that type, cast at its boundary inside the graph, so a strongly typed TensorRT
build needs no precision flags. Weights past `external_bytes` go to one `<out>.data` file beside `<out>`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from lfm_fast import __version__
from lfm_fast.errors import InputError
from lfm_fast.export.sampler import GraphNet, UnrolledSampler
from lfm_fast.fileio import fsync_path, umask_mode
from lfm_fast.sampling import SampleConfig

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GRAPHS = ("sampler", "velocity")
DOMAIN = "lfm_fast.graph"  # the placeholder's domain: never left in a saved graph
EXTERNAL_BYTES = int(1.5 * 2**30)  # weights past this go to <out>.data (protobuf cannot hold more than 2 GiB)


@dataclass
class GraphMeta:
    """What `lfm-fast export` records in a graph's ONNX metadata (and a TensorRT engine's record keeps), typed; ONNX
    stores each field as a string property (`props`, `from_props`). A sampler graph also fixes its recipe (solver,
    steps, CFG, grid, times: `recipe`), its NFE, and whether it ends with the decoder (uint8 images out)."""
    graph: str  # "sampler" or "velocity"
    dtype: str  # the network's: float32, float16 or bfloat16 (the graph's inputs and outputs are fp32 or uint8)
    weights_sha256: str
    latent_shape: tuple[int, ...]
    num_classes: int
    condition: str
    cond_shape: tuple[int, ...]
    sigma_min: float
    output_shape: tuple[int, ...] = ()
    recipe: SampleConfig | None = None
    nfe: int | None = None
    scaling_factor: float = 1.0
    with_decoder: bool = False
    lfm_fast_version: str = __version__

    def props(self) -> dict[str, str]:
        p = {"lfm_fast_version": self.lfm_fast_version, "graph": self.graph, "dtype": self.dtype,
             "weights_sha256": self.weights_sha256, "latent_shape": json.dumps(list(self.latent_shape)),
             "num_classes": str(self.num_classes), "condition": self.condition,
             "cond_shape": json.dumps(list(self.cond_shape)), "sigma_min": str(self.sigma_min),
             "output_shape": json.dumps(list(self.output_shape))}
        if self.recipe is not None:
            r = self.recipe
            p.update(solver=r.solver, steps=str(r.steps), cfg=str(float(r.cfg)), grid=r.grid, shift=str(r.shift),
                     times=json.dumps(list(r.times)), cfg_interval=f"{r.cfg_lo}:{r.cfg_hi}", nfe=str(self.nfe),
                     state_dtype="float32", scaling_factor=str(self.scaling_factor),
                     with_decoder=str(self.with_decoder).lower())
        return p

    @classmethod
    def from_props(cls, p: dict[str, str]) -> "GraphMeta":
        recipe = None
        if p["graph"] == "sampler":
            lo, hi = (float(v) for v in p["cfg_interval"].split(":"))
            recipe = SampleConfig(solver=p["solver"], steps=int(p["steps"]), cfg=float(p["cfg"]), grid=p["grid"],
                                  shift=float(p["shift"]), cfg_lo=lo, cfg_hi=hi, times=tuple(json.loads(p["times"])))
        return cls(graph=p["graph"], dtype=p["dtype"], weights_sha256=p["weights_sha256"],
                   latent_shape=tuple(json.loads(p["latent_shape"])), num_classes=int(p.get("num_classes", 0)),
                   condition=p.get("condition", "none"), cond_shape=tuple(json.loads(p.get("cond_shape", "[]"))),
                   sigma_min=float(p["sigma_min"]), output_shape=tuple(json.loads(p["output_shape"])), recipe=recipe,
                   nfe=int(p["nfe"]) if "nfe" in p else None, scaling_factor=float(p.get("scaling_factor", 1.0)),
                   with_decoder=p.get("with_decoder") == "true", lfm_fast_version=p["lfm_fast_version"])

    def input_shapes(self) -> list[tuple[str, tuple]]:
        """(name, per-sample shape) of each input of the graph."""
        cond = [("cond", self.cond_shape)] if self.condition != "none" else []
        if self.graph == "velocity":
            return [("x", self.latent_shape), ("t", ()), ("labels", ())] + cond
        return [("noise", self.latent_shape), ("labels", ())] + cond


@torch.library.custom_op("lfm_fast::graph_velocity", mutates_args=())
def _velocity_placeholder(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                          cond: torch.Tensor | None = None) -> torch.Tensor:
    raise RuntimeError("the velocity placeholder only exists to be traced into an ONNX graph")


@_velocity_placeholder.register_fake
def _(x, t, labels, cond=None):
    return torch.empty_like(x)


def _placeholder_translation():
    """The ONNX node of the placeholder: `lfm_fast.graph::Velocity(x, t, labels[, cond])`, schema registered once."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema

    if not onnx.defs.has("Velocity", DOMAIN):
        p = OpSchema.FormalParameter
        onnx.defs.register_schema(OpSchema(
            "Velocity", DOMAIN, 1,
            inputs=[p("x", "T"), p("t", "T"), p("labels", "L"), p("cond", "T", param_option=OpSchema.FormalParameterOption.Optional)],
            outputs=[p("v", "T")], type_constraints=[("T", ["tensor(float)"], ""), ("L", ["tensor(int64)"], "")]))
    op = onnxscript.values.Op(onnxscript.values.Opset(DOMAIN, 1), "Velocity")
    return {torch.ops.lfm_fast.graph_velocity.default: lambda x, t, labels, cond=None: op(x, t, labels, *([] if cond is None else [cond]))}


class NetworkBoundary(nn.Module):
    """The network with fp32 in and out: x and cond cast to the token path's dtype, t passed in fp32, as `Field` does."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.dtype = model.x_embedder.weight.dtype

    def forward(self, x, t, labels, cond=None):
        c = self.model.config
        return self.model(x.to(self.dtype), t, labels if c.num_classes else None,
                          None if cond is None else cond.to(self.dtype)).float()


def weights_digest(model) -> str:
    """sha256 of a model's fp32 weights (names and values): which checkpoint a graph was exported from."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def export_onnx(model, out: str, cfg: SampleConfig, ae=None, dtype: str = "float32", graph: str = "sampler",
                sigma_min: float = 1e-5, opset: int | None = None, external_bytes: int = EXTERNAL_BYTES) -> GraphMeta:
    """Export the sampler of `cfg` (inputs noise, labels[, cond] → latents, or uint8 NHWC images with `ae`'s
    decoder), or the velocity network (x, t, labels[, cond] → velocity), with a dynamic batch; check it with
    onnx.checker's full check. The opset defaults to 18, and to 22 for bf16 (where ONNX types Conv in bf16).
    Returns the metadata written into the graph."""
    from lfm_fast.generate import cast_token_path
    from lfm_fast.models.dit import set_backends

    opset = opset or (22 if dtype == "bfloat16" else 18)

    if dtype not in DTYPES or graph not in GRAPHS:
        raise ValueError(f"dtype {dtype!r} / graph {graph!r}: expected one of {list(DTYPES)} / {list(GRAPHS)}")
    # a copy with plain-PyTorch ops only, no Triton custom ops: SDPA becomes MatMul-Softmax-MatMul in the network's
    # dtype, the pattern TensorRT fuses into its own attention kernels
    net = cast_token_path(set_backends(copy.deepcopy(model).eval().cpu(), attn="sdpa", norm="compile"), DTYPES[dtype])
    c = net.config
    b = 2
    x = torch.randn(b, c.in_channels, c.input_size, c.input_size)
    labels = torch.zeros(b, dtype=torch.long)
    cond = [torch.zeros(b, *c.cond_shape)] if c.condition != "none" else []
    network = _to_onnx(NetworkBoundary(net), [x, torch.full((b,), 0.5), labels] + cond,
                       ["x", "t", "labels"] + ["cond"] * len(cond), "velocity", opset)
    meta = GraphMeta(graph, dtype, weights_digest(model), (c.in_channels, c.input_size, c.input_size), c.num_classes,
                     c.condition, tuple(c.cond_shape), sigma_min)
    if graph == "velocity":
        proto = network
    else:
        # nn.Module.to, not diffusers' override, which warns of its (here empty) list of modules to keep in fp32
        decoder = None if ae is None else nn.Module.to(copy.deepcopy(ae).eval().cpu(), DTYPES[dtype])
        scaling = float(ae.config.scaling_factor) if ae is not None else 1.0
        sampler = UnrolledSampler(GraphNet(c, torch.ops.lfm_fast.graph_velocity), cfg, decoder, scaling, sigma_min).eval()
        # not optimized: the rewriter's pattern matching grows faster than linearly with the solver's nodes (48 Heun
        # steps: 74 of 119 s), for a graph of adds and multiplies that every runtime folds itself
        solver = _to_onnx(sampler, [x, labels] + cond, ["noise", "labels"] + ["cond"] * len(cond),
                          "images" if decoder is not None else "latents", opset, _placeholder_translation(), optimize=False)
        proto = splice(solver, network)
        recipe = dataclasses.replace(sampler.config, times=tuple(sampler.times))
        meta = dataclasses.replace(meta, recipe=recipe, nfe=sampler.nfe, scaling_factor=sampler.scaling_factor,
                                   with_decoder=sampler.decoder is not None)
    meta.output_shape = tuple(d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim[1:])
    for k, v in meta.props().items():
        proto.metadata_props.add(key=k, value=v)
    save_onnx(proto, out, external_bytes)
    return meta


def _to_onnx(module: nn.Module, args: list, names: list[str], output: str, opset: int, translation=None,
             optimize: bool = True):
    """torch.export (the batch dimension symbolic) → ONNX ModelProto, inputs and output named, batch dim 'batch'."""
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed…"
    level = registration.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.export's own deprecations, nothing the user can act on
        registration.setLevel(logging.ERROR)
        try:
            # Dim.DYNAMIC, not a fixed range: diffusers' decoder branches at batch 64 on a memory-layout detail
            # that does not change the math, and the ONNX graph is the same on both sides of it.
            exported = torch.export.export(module, tuple(args), dynamic_shapes=tuple({0: torch.export.Dim.DYNAMIC} for _ in args))
            program = torch.onnx.export(exported, tuple(args), dynamo=True, input_names=names, output_names=[output],
                                        opset_version=opset, optimize=optimize, verbose=False,
                                        custom_translation_table=translation)
        finally:
            registration.setLevel(level)
    proto = program.model_proto
    for node in proto.graph.node:  # the exporter's per-node stack traces: most of a graph's bytes, of no use to a runtime
        node.ClearField("metadata_props")
        node.ClearField("doc_string")
    for value in list(proto.graph.input) + list(proto.graph.output):
        value.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def splice(solver, network):
    """Replace every `lfm_fast.graph::Velocity` node of `solver` by the nodes of `network` (values renamed per
    evaluation, `e{k}/…`), with the network's weights added once (`net/…`) and shared by every evaluation."""
    import onnx

    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in network.graph.node for a in n.attribute):
        raise NotImplementedError("the network graph has control flow; splicing renames only a flat graph")
    weights = {i.name for i in network.graph.initializer}
    inputs = [i.name for i in network.graph.input]
    output = network.graph.output[0].name
    nodes, k = [], 0
    for node in solver.graph.node:
        if node.domain != DOMAIN:
            nodes.append(node)
            continue
        names = dict(zip(inputs, node.input))
        names[output] = node.output[0]
        rename = lambda s: "" if not s else names.get(s) or (f"net/{s}" if s in weights else f"e{k}/{s}")  # noqa: E731
        for n in network.graph.node:
            copied = onnx.NodeProto()
            copied.CopyFrom(n)
            copied.name = f"e{k}/{n.name}"
            copied.input[:] = [rename(s) for s in n.input]
            copied.output[:] = [rename(s) for s in n.output]
            nodes.append(copied)
        k += 1
    model = onnx.ModelProto()
    model.CopyFrom(solver)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    for init in network.graph.initializer:
        model.graph.initializer.add().CopyFrom(init)
        model.graph.initializer[-1].name = f"net/{init.name}"
    used = {o.domain: o.version for o in list(solver.opset_import) + list(network.opset_import) if o.domain != DOMAIN}
    del model.opset_import[:]
    model.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in used.items())
    model.functions.extend(f for f in network.functions if (f.domain, f.name) not in {(g.domain, g.name) for g in solver.functions})
    return model


def save_onnx(proto, out: str, external_bytes: int = EXTERNAL_BYTES) -> None:
    """Write `proto` to `out` and check it (onnx.checker, full): inline, or, past `external_bytes` of weights, with
    every large weight in one `<out>.data` beside it. Both files are written and checked in a temporary folder
    beside `out` and only then moved into place; a `<out>.data` that the graph replaced at `out` referenced and
    the new one does not is removed."""
    import onnx
    from onnx.external_data_helper import set_external_data

    out = os.path.abspath(out)
    name = os.path.basename(out)
    data_path = out + ".data"
    stale = os.path.isfile(data_path) and os.path.isfile(out) and _references(out, name + ".data")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=os.path.dirname(out))
    try:
        external = sum(len(t.raw_data) for t in proto.graph.initializer) > external_bytes
        if external:
            with open(os.path.join(tmp, name + ".data"), "wb") as f:
                for t in proto.graph.initializer:
                    if len(t.raw_data) < 1024:
                        continue
                    f.write(b"\0" * (-f.tell() % 64))  # 64-byte aligned: mmap-friendly for ORT and TensorRT
                    offset = f.tell()
                    f.write(t.raw_data)
                    set_external_data(t, name + ".data", offset, len(t.raw_data))
                    t.ClearField("raw_data")
                    t.data_location = onnx.TensorProto.EXTERNAL
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(proto.SerializeToString())
        onnx.checker.check_model(os.path.join(tmp, name), full_check=True)
        for p in ([name + ".data"] if external else []) + [name]:
            os.chmod(os.path.join(tmp, p), umask_mode(0o666))
            fsync_path(os.path.join(tmp, p))
            os.replace(os.path.join(tmp, p), os.path.join(os.path.dirname(out), p))
        fsync_path(os.path.dirname(out))
        if stale and not external:
            os.remove(data_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _references(path: str, location: str) -> bool:
    import onnx

    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:  # not an ONNX file: nothing of ours references the data file
        return False
    return any(e.key == "location" and e.value == location for t in proto.graph.initializer for e in t.external_data)


def read_metadata(path: str) -> GraphMeta:
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
    return GraphMeta.from_props(meta)


def file_digest(path: str) -> str:
    """sha256 of an ONNX file and its external data file, if any: the key of a TensorRT engine built from it."""
    h = hashlib.sha256()
    for p in (path, path + ".data"):
        if os.path.isfile(p):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()
