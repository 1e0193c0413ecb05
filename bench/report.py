"""Turn benchmark JSON into bench/REPORT.md (tables with ratios) and PNG plots.

Reads a pytest-benchmark JSON (the run of `make bench`), the FSDP scaling JSON of
`bench/fsdp_scaling.py` (--fsdp) and, when present in bench/results/cpu/, the NFE sweep of
`bench/nfe_sweep.py`. Writes training.png, latency.png and nfe_error.png beside the report.
Usage: python bench/report.py RUN.json [MORE.json ...] [--fsdp FSDP.json] [--save MERGED.json] [--out bench/REPORT.md]
"""

import argparse
import json
import os
from collections import defaultdict


def _rows(run: dict, kernel: str) -> dict:
    out = {}
    for b in run["benchmarks"]:
        e = b.get("extra_info", {})
        if e.get("kernel") == kernel:
            out[(e["shape"], e["mode"], e["impl"])] = b["stats"]["mean"] * 1e3
    return out


def kernel_table(run: dict, kernel: str, baseline: str) -> str:
    rows = _rows(run, kernel)
    impls = sorted({k[2] for k in rows})
    lines = [f"| shape | mode | {' | '.join(f'{i} ms' for i in impls)} | ratios vs {baseline} |",
             "|---|---|" + "---|" * (len(impls) + 1)]
    for shape, mode in sorted({k[:2] for k in rows}):
        base = rows.get((shape, mode, baseline))
        times = [rows.get((shape, mode, i)) for i in impls]
        ratios = ", ".join(f"{i} {base / t:.2f}×" for i, t in zip(impls, times) if t and base and i != baseline)
        cells = " | ".join(f"{t:.1f}" if t else "–" for t in times)
        lines.append(f"| {shape} | {mode} | {cells} | {ratios} |")
    return "\n".join(lines)


def _sampling_rows(run: dict) -> dict:
    rows = {}
    for b in run["benchmarks"]:
        e = b.get("extra_info", {})
        if "ms_per_nfe" in e and "backend" in e:
            rows[(e["model"], e["batch"], e["backend"])] = e
    return rows


def sampling_table(run: dict) -> str:
    rows = _sampling_rows(run)
    lines = ["| model | batch | backend | ms / image | images/s | ms / NFE | vs eager |", "|---|---|---|---|---|---|---|"]
    for (model, batch, backend), e in sorted(rows.items()):
        eager = rows.get((model, batch, "eager"))
        ratio = f"{eager['ms_per_image'] / e['ms_per_image']:.2f}×" if eager else "–"
        lines.append(f"| {model} | {batch} | {backend} | {e['ms_per_image']:.2f} | {e['img_per_s']:.1f} | {e['ms_per_nfe']:.2f} | {ratio} |")
    return "\n".join(lines)


def solver_cost_table(run: dict) -> str:
    """The interleaved solver-cost benchmark (bench/test_sampling.py): median and best ms per image per solver."""
    costs = next((b["extra_info"] for b in run["benchmarks"] if "solver_cost" in b.get("extra_info", {})), None)
    if costs is None:
        return ""
    rows = costs["solver_cost"]
    base = rows.get("heun × 8")
    lines = [f"| solver (NFE {costs['nfe']}, batch {costs['batch']}) | ms / image, median | best | median vs Heun × 8 |",
             "|---|---|---|---|"]
    for name, e in rows.items():
        ratio = f"{e['ms_per_image_median'] / base['ms_per_image_median']:.2f}×" if base else "–"
        lines.append(f"| {name} | {e['ms_per_image_median']:.2f} | {e['ms_per_image_min']:.2f} | {ratio} |")
    return "\n".join(lines)


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        return None


def bar_plot(path: str, groups: dict[str, dict[str, float]], ylabel: str, title: str, higher_is_better: bool) -> str:
    """Grouped bars; each bar is labelled with its ratio to the first bar of its group (>1 = better)."""
    plt = _plt()
    if plt is None or not groups:
        return ""
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups) + 1, 3.4), squeeze=False)
    for ax, (group, bars) in zip(axes[0], groups.items()):
        names, values = list(bars), list(bars.values())
        ax.bar(range(len(values)), values, color=["#999999"] + ["#3b75af"] * (len(values) - 1))
        for i, v in enumerate(values):
            ratio = v / values[0] if higher_is_better else values[0] / v
            ax.text(i, v, f"{ratio:.2f}×", ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(values)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_ylabel(ylabel, fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"\n\n![{title}]({os.path.basename(path)})"


def _kinds(run: dict) -> dict:
    return {b["extra_info"]["kind"]: b["extra_info"] for b in run["benchmarks"] if "kind" in b.get("extra_info", {})}


def recipe_table(run: dict) -> str:
    rows = _kinds(run)
    stock, ours = rows.get("recipe_stock_lfm"), rows.get("recipe_ours")
    if not (stock and ours):
        return "(no recipe rows in this run)"
    return ("| recipe | images/s |\n|---|---|\n"
            f"| stock LFM: VAE encode every batch (fp32 eager) + diffusers DiT-S/2, fp32 eager | {stock['img_per_s']:.2f} |\n"
            f"| lfm-fast: cached latents + DiT-S/2 through FSDP2, bf16, per-block compile | {ours['img_per_s']:.2f} |\n\n"
            f"Ratio lfm-fast / stock: **{ours['img_per_s'] / stock['img_per_s']:.2f}×**")


def training_table(run: dict) -> str:
    rows = {k: v for k, v in _kinds(run).items() if not k.startswith("recipe_")}
    if not rows:
        return "(no training rows in this run)"
    peak = rows.get("gemm_peak", {}).get("tflops")
    lines = ["| model | images/s | TFLOP/s | MFU vs measured GEMM peak |", "|---|---|---|---|"]
    for kind, e in rows.items():
        if kind != "gemm_peak":
            mfu = f"{e['tflops'] / peak:.0%}" if peak else "–"
            lines.append(f"| {kind} | {e['img_per_s']:.2f} | {e['tflops']:.3f} | {mfu} |")
    if "ours" in rows and "diffusers" in rows:
        lines.append(f"\nRatio ours / diffusers: **{rows['ours']['img_per_s'] / rows['diffusers']['img_per_s']:.2f}×**; "
                     f"bf16 GEMM peak measured in the same run: {peak:.3f} TFLOP/s.")
    return "\n".join(lines)


def _setting(r: dict) -> str:
    if r["grid"] is None:
        return f"{r['solver']} tol {r['tol']:g}"
    return f"{r['solver']} {r['grid']}" + (f":{r['shift']:g}" if r["grid"] == "shifted" else "")


def nfe_section(path: str, out_dir: str) -> str:
    """The NFE sweep (bench/nfe_sweep.py): the table, the fewest NFE per setting for an error target, and two plots
    (error and classifier FD against NFE, a curve per solver and grid)."""
    if not os.path.isfile(path):  # the full sweep, else the reduced one of `make bench`
        path = path.replace("nfe_sweep.json", "nfe_sweep_quick.json")
    if not os.path.isfile(path):
        return "(run `python bench/nfe_sweep.py` for this section)"
    sweep = json.load(open(path))
    lines = [f"{sweep['num_samples']} samples per setting (FD), {sweep['ref_samples']} with a reference ({sweep['reference']}), "
             f"CFG {sweep['cfg']:g}; FD floors (real vs real): shape judge {sweep['shape_judge_fd_real_vs_real']:.3f}, classifier "
             f"{sweep['classifier_fd_real_vs_real']:.3f}. NFE per image "
             f"(mean over images, as LFM counts), network rows per image (2 per guided evaluation).", "",
             "| setting | NFE | rel. error | shape-judge FD [95 % CI] | classifier FD [95 % CI] | class acc. | shape acc. | ms / image |",
             "|---|---|---|---|---|---|---|---|"]
    curves = defaultdict(list)
    for r in sweep["rows"]:
        fd = lambda k: f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]"  # noqa: E731
        lines.append(f"| {_setting(r)} | {r['nfe']:g} | {r['rel_rms_error']:.2e} | {fd('shape_judge_fd')} | {fd('classifier_fd')} | "
                     f"{r['class_accuracy']:.3f} | {r['shape_accuracy']:.3f} | {r['ms_per_image']:.1f} |")
        curves["adaptive " + r["solver"] if r["grid"] is None else _setting(r)].append((r["nfe"], r["rel_rms_error"], r["shape_judge_fd"]))
    lines += ["", "Fewest NFE for a relative error of 1e-2 / 3e-2:", "", "| setting | NFE at ≤ 1e-2 | NFE at ≤ 3e-2 |", "|---|---|---|"]
    for name, pts in sorted(curves.items()):
        need = [min((n for n, err, _ in pts if err <= tol), default=None) for tol in (1e-2, 3e-2)]
        lines.append(f"| {name} | " + " | ".join(f"{n:g}" if n else "not reached" for n in need) + " |")
    plt = _plt()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
        solvers = sorted({name.split()[-1] if name.startswith("adaptive") else name.split()[0] for name in curves})
        colour = {sv: plt.get_cmap("tab10")(i % 10) for i, sv in enumerate(solvers)}
        style = {"uniform": ("-", "o"), "shifted": ("--", "s"), "power": ("-.", "^"), "calibrated": (":", "D")}
        for name, pts in sorted(curves.items()):
            pts.sort()
            words = name.split()
            solver, grid = (words[1], None) if words[0] == "adaptive" else (words[0], words[1].split(":")[0])
            line, marker = style.get(grid, ("-", "*"))
            kw = dict(marker=marker, linestyle=line, color=colour[solver], label=name, markersize=5)
            axes[0].loglog([p[0] for p in pts], [p[1] for p in pts], **kw)
            axes[1].loglog([p[0] for p in pts], [p[2] for p in pts], **kw)
        axes[0].axhline(1e-2, color="grey", linewidth=0.8)
        axes[1].axhline(sweep["shape_judge_fd_real_vs_real"], color="grey", linewidth=0.8)
        axes[0].set_ylabel("relative RMS error vs dopri5 1e-7 (fp64)")
        axes[1].set_ylabel("shape-judge feature FD (grey: real vs real)")
        for ax in axes:
            ax.set_xlabel("NFE per image")
        axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "nfe_error.png"), dpi=120)
        plt.close(fig)
        lines.append("\n![NFE vs error and FD](nfe_error.png)")
    return "\n".join(lines)


def fsdp_section(path: str | None) -> str:
    if not path or not os.path.isfile(path):
        return "(run `python bench/fsdp_scaling.py` for this section)"
    data = json.load(open(path))
    m = data["machine"]
    lines = [f"{m['host']}, {m['cpu_count']} CPUs, torch {m['torch']}{', ' + m['cuda'] if m.get('cuda') else ''}; "
             f"{data['rows'][0]['arch']}, global batch {data['rows'][0]['global_batch']}, {data['rows'][0]['precision']}; "
             "median of the steps after the warm-up, from the run's metrics.jsonl.", "",
             "| config | processes | images/s | vs 1 process | TFLOP/s | MFU | peak memory rank 0 (GiB) |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        sp = f"{r['speedup_vs_1proc']:.2f}×" if r.get("speedup_vs_1proc") else "1.00×"
        lines.append(f"| {r['config']} | {r['nproc']} | {r['img_per_s']:.2f} | {sp} | {r['tflops']:.3f} | {r['mfu']:.0%} | "
                     f"{r['mem_gib_rank0']:.2f} |")
    return "\n".join(lines)


def _jsonl(path: str) -> list[dict]:
    return [json.loads(line) for line in open(path)] if os.path.isfile(path) else []


def gpu_section(folder: str) -> str:
    """The GPU check's rows (bench/gpu_check.sh, bench/gpu_diagnose.py: JSON lines under `folder`) as tables, each
    Triton row beside its baseline of the same run."""
    kernels, steps = _jsonl(os.path.join(folder, "kernels.jsonl")), _jsonl(os.path.join(folder, "train_step.jsonl"))
    if not kernels and not steps:
        return "No GPU run yet (`bench/gpu_check.sh`)."
    machine = (kernels or steps)[0]
    out = [f"{machine['device']}, torch {machine['torch']}" + (f", triton {machine['triton']}" if "triton" in machine else "")
           + ". Rows of one run each; ratios within a table.", "",
           "Kernels, fwd + bwd, 256 tokens, bf16 (`bench/gpu_kernels.py`; `triton.testing.do_bench`, median):", "",
           "| kernel | shape | batch | baseline ms | Triton ms | Triton speed-up | Triton max rel. diff |", "|---|---|---|---|---|---|---|"]
    base = {}
    for r in kernels:
        key = (r["kernel"], r["shape"], r["batch"])
        if "err_vs_baseline" not in r:
            base[key] = r
            continue
        b = base[key]
        out.append(f"| {r['kernel']} | {r['shape']} | {r['batch']} | {b['ms']:.3f} ({b['impl']}) | {r['ms']:.3f} | "
                   f"{b['ms'] / r['ms']:.2f}× | {r['err_vs_baseline']:.1e} |")
    diag = _jsonl(os.path.join(folder, "diagnose.jsonl"))
    attn = [r for r in diag if r.get("part") == "a"]
    if attn:
        out += ["", "Attention per call, XL/2 (16 heads × 72), 256 tokens, bf16 (`bench/gpu_diagnose.py` a): the host's "
                "time to issue a call, the wall time of calls back to back, the GPU's kernel time (torch.profiler). "
                "`triton_raw` calls the kernels' launchers directly, without the custom op:", "",
                "| batch | impl | pass | host µs | wall µs | kernel µs | launches |", "|---|---|---|---|---|---|---|"]
        out += [f"| {r['batch']} | {r['impl']} | {r['pass']} | {r['host_us']:.0f} | {r['wall_us']:.0f} | {r['kernel_us']:.0f} | "
                f"{r['launches']:.0f} |" for r in attn]
    if steps:
        first = steps[0]
        out += ["", "DiT-XL/2 training step, batch 32, bf16 autocast, fused AdamW (`bench/gpu_train_step.py`):", "",
                "| attention | norms | compile | img/s | step ms | TFLOP/s | MFU (989) | peak GiB | vs first row |",
                "|---|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['attn_backend']} | {r['norm_backend']} | {r['compile']} | {r['img_per_s']:.0f} | {r['step_ms']:.1f} | "
                f"{r['tflops']:.0f} | {r['mfu_vs_989_tflops']:.1%} | {r['peak_mem_gib']:.1f} | "
                f"{r['img_per_s'] / first['img_per_s']:.2f}× |" for r in steps]
    for r in _jsonl(os.path.join(folder, "fsdp.jsonl")):
        out += ["", f"Through the launcher (`bench/fsdp_scaling.py`, `lfm-fast train --nproc {r['nproc']}`, FSDP2, "
                f"{r['arch']}, global batch {r['global_batch']}, {r['precision']}, config {r['config']}, default backends): "
                f"{r['img_per_s']:.0f} img/s, {r['tflops']:.0f} TFLOP/s, MFU {r['mfu']:.1%}, {r['mem_gib_rank0']:.1f} GiB."]
    samples = _jsonl(os.path.join(folder, "sampling.jsonl"))
    sampling = [r for r in diag if r.get("part") == "b"]
    if samples or sampling:
        out += ["", "DiT-XL/2 sampling, 8 Heun steps, CFG 1.5 (16 NFE), bf16, eager (`bench/gpu_sampling.py`, "
                "`bench/gpu_diagnose.py` b: backends set per row):", "",
                "| attention | norms | batch | ms / image | GPU kernel ms / batch | launches / batch |", "|---|---|---|---|---|---|"]
        out += [f"| auto | auto | {r['batch']} | {r['ms_per_image']:.1f} | – | – |" for r in samples if r["backend"] == "eager"]
        out += [f"| {r['attn']} | {r['norm']} | {r['batch']} | {r['ms_per_image']:.1f} | {r['kernel_ms_per_batch']:.1f} | "
                f"{r['launches']:.0f} |" for r in sampling]
    calls = [r for r in diag if r.get("part") == "c"]
    if calls:
        out += ["", "One DiT-XL/2 network call (CFG batch: 2 rows per image), SDPA + PyTorch norms, eager beside "
                "`torch.compile(mode=\"reduce-overhead\")` of the network alone (`bench/gpu_diagnose.py` c):", "",
                "| images | backend | ms / call | kernel ms / call | launches | cold compile s | ms / image at 16 NFE |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['images']} | {r['backend']} | {r['ms_per_call']:.2f} | {r['kernel_ms_per_call']:.2f} | {r['launches']:.0f} | "
                f"{r['first_call_s']:.0f} |" if r["first_call_s"] else
                f"| {r['images']} | {r['backend']} | {r['ms_per_call']:.2f} | {r['kernel_ms_per_call']:.2f} | {r['launches']:.0f} | – |"
                for r in calls]
        out[-len(calls):] = [line + f" {r['ms_per_image_16nfe']:.1f} |" for line, r in zip(out[-len(calls):], calls)]
    return "\n".join(out + ["", GPU_READING])


GPU_READING = """What the first run (2026-12-04) says:
- The Triton attention's kernels take the GPU as long as SDPA's (225 vs 228 µs forward + backward at batch 32) and
  less at batch 256 (1,600 vs 1,720 µs), but through its custom ops the host spends 1.0 ms per forward + backward
  (0.28 ms calling the launchers directly; SDPA 0.42), so at batch 32 every Triton row is host-bound. The adaLN
  kernels lose to inductor's fusion of the same expression at every size (0.58-0.82x at batch 256; whether the
  custom ops' host time is the cause there too was not measured).
- So `auto` is now SDPA for attention on CUDA, and the Triton norms only in eager (where they beat unfused
  PyTorch: 16.6 vs 19.1 ms per image at batch 32); under torch.compile the norms are PyTorch's, for inductor
  (training: 375 img/s against 202 with the Triton kernels). The default launcher run above (227 img/s) predates it.
- Eager sampling at batch 1 is launch-bound (8,760 launches and 42 ms of kernels in 400 ms). CUDA graphs over the
  network alone take a call from 14.1 to 2.5 ms after a 31 s compile, where compiling the whole unrolled sampler
  had not finished in 200 s: the compile backend now compiles the network alone on CUDA.
- Not yet measured: the Triton kernels without the custom op's dispatch in eager (the host's 229 µs per forward
  was 83 µs calling the launcher directly), and the new compile backend end to end."""


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON files (merged)")
    p.add_argument("--out", default="bench/REPORT.md")
    p.add_argument("--fsdp", default=None, help="JSON of bench/fsdp_scaling.py")
    p.add_argument("--save", default=None, help="write the merged runs plus the derived figures here "
                   "(default: back into the first run's JSON)")
    a = p.parse_args()
    runs = [json.load(open(path)) for path in a.runs]
    run = dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]])
    info = run.get("machine_info", {})
    out_dir = os.path.dirname(os.path.abspath(a.out))
    extra = run.get("machine_info", {}).get("lfm_fast", {})
    kinds = _kinds(run)
    train_groups = {}
    if {"ours", "diffusers"} <= kinds.keys():
        train_groups["DiT-S/2 step, bf16"] = {k: kinds[k]["img_per_s"] for k in ("diffusers", "ours", "ours_compile") if k in kinds}
    if {"recipe_stock_lfm", "recipe_ours"} <= kinds.keys():
        train_groups["64 px end to end"] = {"stock LFM": kinds["recipe_stock_lfm"]["img_per_s"], "lfm-fast": kinds["recipe_ours"]["img_per_s"]}
    train_plot = bar_plot(os.path.join(out_dir, "training.png"), train_groups, "images/s", "Training throughput (ratio vs first bar)", True)
    lat_groups = defaultdict(dict)
    for (model, batch, backend), e in sorted(_sampling_rows(run).items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] != "eager")):
        lat_groups[f"{model}, batch {batch}"][backend] = e["ms_per_image"]
    lat_plot = bar_plot(os.path.join(out_dir, "latency.png"), dict(lat_groups), "ms / image", "Sampling latency (speed-up vs eager)", False)
    text = f"""# lfm-fast benchmark report

Run `{os.path.basename(a.save or a.runs[0])}` on {info.get('node', '?')} ({info.get('cpu', {}).get('brand_raw', '?')}),
Python {info.get('python_version', '?')}, torch {extra.get('torch', '?')}, {extra.get('threads', '?')} threads,
{extra.get('cuda') or 'no GPU'}, {run.get('datetime', '')}. Compare rows within this run (ratios): these machines are noisy.

## Attention (batch 32, 256 tokens)

{kernel_table(run, "attention", "eager")}

## adaLN modulate, and gated residual + modulate fused

{kernel_table(run, "adaln", "eager")}

{kernel_table(run, "adaln_fused", "eager")}

## Training step, DiT-S/2 at 4×32×32, batch 16, bf16 autocast

{training_table(run)}

## End to end against the stock LFM recipe, 64×64 images, batch 32

{recipe_table(run)}{train_plot}

## FSDP2 through the launcher: 1 vs 2 processes

{fsdp_section(a.fsdp)}

## Sampling latency, 8-step Heun with CFG (16 NFE)

{sampling_table(run)}{lat_plot}

## Solver cost at equal NFE (16, CFG 1.5, demo model, batch 32, eager)

{solver_cost_table(run)}

## NFE against accuracy (demo checkpoint)

{nfe_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "nfe_sweep.json"), out_dir)}

## GPU: one H200 (`bench/gpu_check.sh`, parts 1 and 2, and `bench/gpu_diagnose.py`)

{gpu_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gpu"))}
"""
    with open(a.out, "w") as f:
        f.write(text)
    derived = {"training": {k: v for k, v in kinds.items()}}
    if {"ours", "diffusers"} <= kinds.keys():
        derived["ours_over_diffusers"] = kinds["ours"]["img_per_s"] / kinds["diffusers"]["img_per_s"]
    if {"recipe_stock_lfm", "recipe_ours"} <= kinds.keys():
        derived["ours_over_stock_recipe"] = kinds["recipe_ours"]["img_per_s"] / kinds["recipe_stock_lfm"]["img_per_s"]
    if a.fsdp and os.path.isfile(a.fsdp):
        derived["fsdp"] = json.load(open(a.fsdp))["rows"]
    merged = dict(run, derived=derived)  # pytest-benchmark's figures of every part, plus ours
    with open(a.save or a.runs[0], "w") as f:
        json.dump(merged, f, indent=2)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
