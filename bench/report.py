"""Turn benchmark JSON into bench/REPORT.md (tables with ratios) and PNG plots.

Reads a pytest-benchmark JSON (the run of `make bench`) and, when present beside it in
bench/results/cpu/, the NFE sweep of `bench/nfe_sweep.py`.
Usage: python bench/report.py RUN.json [MORE.json ...] [--out bench/REPORT.md]
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


def sampling_table(run: dict) -> str:
    rows = {}
    for b in run["benchmarks"]:
        e = b.get("extra_info", {})
        if "ms_per_nfe" in e and "backend" in e:
            rows[(e["model"], e["batch"], e["backend"])] = e
    lines = ["| model | batch | backend | ms / image | images/s | ms / NFE | vs eager |", "|---|---|---|---|---|---|---|"]
    for (model, batch, backend), e in sorted(rows.items()):
        eager = rows.get((model, batch, "eager"))
        ratio = f"{eager['ms_per_image'] / e['ms_per_image']:.2f}×" if eager else "–"
        lines.append(f"| {model} | {batch} | {backend} | {e['ms_per_image']:.2f} | {e['img_per_s']:.1f} | {e['ms_per_nfe']:.2f} | {ratio} |")
    return "\n".join(lines)


def training_table(run: dict) -> str:
    rows = {b["extra_info"]["kind"]: b["extra_info"] for b in run["benchmarks"] if "kind" in b.get("extra_info", {})}
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


def nfe_section(path: str, out_dir: str) -> str:
    if not os.path.isfile(path):
        return "(run `python bench/nfe_sweep.py` for this section)"
    sweep = json.load(open(path))
    lines = ["| solver | setting | NFE | rel. error | class accuracy | latent FD |", "|---|---|---|---|---|---|"]
    curves = defaultdict(list)
    for r in sweep["rows"]:
        setting = ", ".join(f"{k}={r[k]}" for k in ("steps", "grid", "shift", "atol") if k in r)
        lines.append(f"| {r['solver']} | {setting} | {r['nfe']} | {r['rel_rms_error']:.2e} | {r['class_accuracy']:.3f} | {r['latent_fd']:.2f} |")
        if not r.get("reference"):
            curves[r["solver"] + (" shifted" + str(r["shift"]) if "grid" in r else "")].append((r["nfe"], r["rel_rms_error"]))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, pts in sorted(curves.items()):
            pts.sort()
            ax.loglog([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
        ax.set_xlabel("NFE")
        ax.set_ylabel("relative RMS error vs dopri5 1e-7 (fp64)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "nfe_error.png"), dpi=120)
        lines.append("\n![NFE vs error](nfe_error.png)")
    except ImportError:
        lines.append("\n(matplotlib is not installed: no plot)")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("runs", nargs="+", help="pytest-benchmark JSON files (merged)")
    p.add_argument("--out", default="bench/REPORT.md")
    a = p.parse_args()
    runs = [json.load(open(path)) for path in a.runs]
    run = dict(runs[0], benchmarks=[b for r in runs for b in r["benchmarks"]])
    info = run.get("machine_info", {})
    out_dir = os.path.dirname(os.path.abspath(a.out))
    text = f"""# lfm-fast benchmark report

Runs {', '.join(f'`{os.path.basename(r)}`' for r in a.runs)} on {info.get('node', '?')} ({info.get('cpu', {}).get('brand_raw', '?')}),
Python {info.get('python_version', '?')}, {run.get('datetime', '')}. Compare rows within this run (ratios):
these machines are noisy.

## Attention (batch 32, 256 tokens)

{kernel_table(run, "attention", "eager")}

## adaLN modulate, and gated residual + modulate fused

{kernel_table(run, "adaln", "eager")}

{kernel_table(run, "adaln_fused", "eager")}

## Training step, DiT-S/2 at 4×32×32, batch 16, bf16 autocast

{training_table(run)}

## Sampling latency, 8-step Heun with CFG (16 NFE)

{sampling_table(run)}

## NFE against accuracy (demo checkpoint)

{nfe_section(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cpu", "nfe_sweep.json"), out_dir)}
"""
    with open(a.out, "w") as f:
        f.write(text)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
