"""What the compiler makes of the Triton kernels for an H100/H200 (sm_90a), without a GPU.

Every kernel launch of the attention forward, the attention backward and the adaLN ops is captured
at DiT shapes (the attention inputs are views of a packed (B, T, 3, H, D) qkv projection, as the DiT
passes them), specialised exactly as Triton's runtime would specialise those arguments (its own
binder), and compiled ahead of time for `GPUTarget("cuda", 90, 32)` with every config of the
autotuner's set. From the PTX and the cubin it records: `wgmma` and `mma.sync` counts, the widths of
`cp.async` and `ld.global` loads (bytes per thread per instruction), TMA (`cp.async.bulk.tensor`) use,
the integer width of 2-D tile offsets (TTIR `tt.addptr`), registers, spill (local-memory) bytes and
shared memory. Launches without an autotuner compile with their own num_warps / num_stages, as at run
time. Prints one JSON object:

    python bench/ptx_report.py [--dtypes bf16,fp16] [--head-dims 64,72,128] [--first-config]

Run without TRITON_INTERPRET (the interpreter replaces the compiler). tests/kernels/test_ptx.py runs
it and asserts the fast path (wgmma, 16-byte loads, no spills).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import multiprocessing

if __name__ == "__main__" and os.environ.get("TRITON_INTERPRET") == "1":  # (the suite imports it under the interpreter)
    sys.exit("ptx_report: unset TRITON_INTERPRET (the interpreter replaces the compiler)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class _Recorder:
    """Stands in for a kernel (or an autotuner) and records each launch instead of running it."""

    def __init__(self, name, fn, configs, log):
        self.name, self.fn, self.configs, self.log = name, fn, configs, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.name, self.fn, self.configs, args, kwargs))
        return launch


def _patch(module, log):
    """Replace the module's kernels and autotuners (also inside dicts) by recorders; returns an undo."""
    saved = {}

    def wrap(name, obj):
        if isinstance(obj, Autotuner):
            return _Recorder(name, obj.fn, obj.configs, log)
        if isinstance(obj, JITFunction):
            return _Recorder(name, obj, [None], log)
        return None

    if hasattr(module, "_tuner"):  # autotuners made per head dim on first use
        saved["_tuner"], kernels = module._tuner, dict(module._KERNELS)
        module._tuner = lambda kernel, D: _Recorder(kernel, kernels[kernel], module.configs_for(kernel, D), log)
    for name, obj in list(vars(module).items()):
        if isinstance(obj, dict) and any(isinstance(v, (Autotuner, JITFunction)) for v in obj.values()):
            saved[name] = obj
            setattr(module, name, {k: wrap(f"{name}[{k}]", v) or v for k, v in obj.items()})
        elif (rec := wrap(name, obj)) is not None:
            saved[name] = obj
            setattr(module, name, rec)
    return lambda: [setattr(module, k, v) for k, v in saved.items()]


def capture(dtype: torch.dtype, head_dim: int | None = None, hidden: int | None = None, B=2, T=256, H=16):
    """The launches of one attention forward + backward (head_dim) or of every adaLN op (hidden)."""
    from lfm_fast.kernels import adaln, attention

    log = []
    module = attention if head_dim is not None else adaln
    undo = _patch(module, log)
    try:
        if head_dim is not None:
            qkv = torch.empty((B, T, 3, H, head_dim), dtype=dtype)
            q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))
            o, lse = attention.attention_forward_triton(q, k, v)
            do = torch.empty((B, T, H, head_dim), dtype=dtype).transpose(1, 2)
            attention.attention_backward_triton(do, q, k, v, o, lse)
        else:
            x, y, dy = (torch.empty((B, T, hidden), dtype=dtype) for _ in range(3))
            mod = torch.empty((B, 6 * hidden), dtype=dtype)  # adaLN chunks are views of one projection
            shift, scale, gate = mod[:, :hidden], mod[:, hidden:2 * hidden], mod[:, 2 * hidden:3 * hidden]
            mean, rstd = (torch.empty(B * T, dtype=torch.float32) for _ in range(2))
            adaln.modulate_forward_triton(x, shift, scale)
            adaln.modulate_backward_triton(dy, x, scale, mean, rstd)
            adaln.gated_forward_triton(x, gate, y)
            adaln.gated_forward_triton(x, gate, y, shift, scale)
            adaln.gated_backward_triton(dy, gate, y)
            if hasattr(adaln, "gated_modulate_backward_triton"):
                adaln.gated_modulate_backward_triton(dy, dy, gate, y, scale, x, mean, rstd)
    finally:
        undo()
    return log


def _count_loads(ptx: str) -> dict:
    widths = {}
    for vec, bits in re.findall(r"ld\.global(?:\.[a-zA-Z0-9:_]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s", ptx):
        w = int(vec or 1) * int(bits) // 8
        widths[w] = widths.get(w, 0) + 1
    cp = {}
    for size in re.findall(r"cp\.async\.c[ag]\.shared\.global(?:\.[a-zA-Z0-9:_]+)*\s+\[[^\]]*\],\s*\[[^\]]*\],\s*(0x[0-9a-f]+|\d+)", ptx):
        cp[int(size, 0)] = cp.get(int(size, 0), 0) + 1
    return {"ld_global_bytes": dict(sorted(widths.items())), "cp_async_bytes": dict(sorted(cp.items()))}


def _tile_loads(ttgir: str) -> dict:
    """Bytes per thread of every load of a 2-D tile of 16-bit data (Q, K, V, dO, x, ...), read from the
    TTGIR: an async copy's `contiguity`, else the layout's sizePerThread along its fastest dim. The
    fp32 row statistics (LSE, Δ, mean, rstd) are 1-D and not counted."""
    layouts = {}
    for name, body in re.findall(r"^#(\w+) = #ttg\.blocked<\{(.*)\}>", ttgir, re.M):
        spt = [int(x) for x in re.search(r"sizePerThread = \[([\d, ]+)\]", body)[1].split(",")]
        order = [int(x) for x in re.search(r"order = \[([\d, ]+)\]", body)[1].split(",")]
        layouts[name] = spt[order[0]]
    widths = {}
    for line in ttgir.splitlines():
        m = re.search(r"(tt\.load|ttg\.async_copy_global_to_local) .*: tensor<\d+x\d+x!tt\.ptr<(bf16|f16)>, #(\w+)>", line)
        if m:
            c = re.search(r"contiguity = (\d+)", line)
            elems = min(int(c[1]), layouts[m[3]]) if c else layouts[m[3]]
            widths[2 * elems] = widths.get(2 * elems, 0) + 1
    return dict(sorted(widths.items()))


def _tile_offset_bits(ttir: str) -> dict:
    """Integer widths (bits -> count) of the offsets of every `tt.addptr` that builds a 2-D tile of
    pointers, e.g. `tt.addptr %a, %b : tensor<2x2048x!tt.ptr<bf16>>, tensor<2x2048xi64>`: 32-bit tile
    offsets wrap once a tensor passes 2³¹ elements (1-D row vectors and scalars are not counted)."""
    widths = {}
    for bits in re.findall(r"tt\.addptr .*: tensor<\d+x\d+x!tt\.ptr<\w+>>, tensor<\d+x\d+xi(\d+)>", ttir):
        widths[int(bits)] = widths.get(int(bits), 0) + 1
    return dict(sorted(widths.items()))


def _resources(ptx: str) -> dict:
    """Registers and spills as ptxas (the one Triton uses for sm_90a) reports them."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        out = subprocess.run([get_ptxas(90).path, "--gpu-name", "sm_90a", "-v", src, "-o", os.path.join(d, "k.cubin")],
                             capture_output=True, text=True, check=True).stderr
    frame, stores, loads = map(int, re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", out).groups())
    return {"registers": int(re.search(r"Used (\d+) registers", out)[1]), "stack_bytes": frame,
            "spill_bytes": stores + loads}


_JOBS: list = []  # set before the worker processes fork (kernels and tensors do not pickle)


def compile_one(i: int) -> dict:
    """AOT-compile one captured launch under one config; the row of the report."""
    name, fn, config, args, kwargs = _JOBS[i]
    kwargs = dict(kwargs)
    # what the runtime would use: the launch's own num_warps / num_stages, else Triton's defaults
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    if config is not None:
        kwargs.update(config.kwargs)
        options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, opts = binder(*args, **kwargs, **options)
    opts, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs, **options), bound, specialization, opts)
    t0 = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=opts.__dict__)
    ptx = kernel.asm["ptx"]
    row = {"kernel": name, "config": {k: v for k, v in kwargs.items() if k.startswith("BLOCK")} | options,
           "wgmma": ptx.count("wgmma.mma_async"), "mma_sync": ptx.count("mma.sync"),
           "tma": ptx.count("cp.async.bulk.tensor"), "tile_load_bytes": _tile_loads(kernel.asm["ttgir"]),
           "tile_offset_bits": _tile_offset_bits(kernel.asm["ttir"]),
           **_count_loads(ptx), **_resources(ptx),
           "shared_bytes": kernel.metadata.shared, "compile_s": round(time.perf_counter() - t0, 2)}
    return row


def _jobs(log):
    return [(name, fn, config, args, kwargs) for name, fn, configs, args, kwargs in log for config in configs]


def report(dtypes=("bf16", "fp16"), head_dims=(64, 72, 128), hidden=1152, first_config=False, workers=2) -> dict:
    jobs, where = [], []
    for dt in dtypes:
        for key, log in [(("attention", dt, d), capture(DTYPES[dt], head_dim=d)) for d in head_dims] + \
                        [(("adaln", dt, hidden), capture(DTYPES[dt], hidden=hidden))]:
            if first_config:
                log = [(n, f, c[:1], a, k) for n, f, c, a, k in log]
            for job in _jobs(log):
                jobs.append(job)
                where.append(key)
    _JOBS[:] = jobs
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        rows = pool.map(compile_one, range(len(jobs)), chunksize=1)
    out = {"target": "sm_90a", "triton": triton.__version__, "rows": []}
    for (op, dt, dim), row in zip(where, rows):
        out["rows"].append({"op": op, "dtype": dt, "dim": dim, **row})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--head-dims", default="64,72,128")
    p.add_argument("--hidden", type=int, default=1152, help="adaLN hidden size (DiT-XL/2: 1152)")
    p.add_argument("--first-config", action="store_true", help="only each autotuner's first config")
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    print(json.dumps(report(a.dtypes.split(","), [int(d) for d in a.head_dims.split(",")], a.hidden,
                            a.first_config, a.workers)))


if __name__ == "__main__":
    main()
