"""The GPU fast path, proven on this CPU through the compiler's own output.

bench/ptx_report.py compiles every kernel launch of the attention forward/backward (D = 64, 72, 128,
every config of the autotuner's set) and of the adaLN ops (D = 1152) for sm_90a, bf16 and fp16, with
the argument specialisation Triton's runtime would use at DiT shapes; here its JSON is asserted on.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import triton.backends.nvidia.compiler  # noqa: E402,F401 (ships with triton: a broken import fails)

ROOT = Path(__file__).resolve().parents[2]
ATTENTION_DOTS = {"fwd", "dkdv", "dq"}


CACHE = ROOT / "bench" / "results" / "cpu" / "ptx_report.json"


def report_key(root: Path = ROOT) -> str:
    """What the compiler's output depends on: the kernels' and the report's sources and Triton's version."""
    import hashlib

    import triton

    h = hashlib.sha256(triton.__version__.encode())
    for path in sorted((root / "kernels").glob("*.py")) + [root / "bench" / "ptx_report.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def report():
    """bench/ptx_report.py's JSON, kept in bench/results/cpu/ptx_report.json under the key of what made it: compiled
    again (about 15 s, every autotune config) only when a kernel, the report or Triton changes. Commit the file."""
    key = report_key()
    if CACHE.exists() and json.loads(CACHE.read_text()).get("key") == key:
        return json.loads(CACHE.read_text())
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "ptx_report.py")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = {"key": key, **json.loads(out.stdout)}
    CACHE.write_text(json.dumps(result, indent=0) + "\n")
    return result


def test_the_cached_report_is_the_one_of_these_sources(report, tmp_path):
    """The key changes with a kernel's or the report's source: a stale report is never asserted on."""
    import shutil

    assert report["key"] == report_key()
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    shutil.copytree(ROOT / "bench", tmp_path / "bench", ignore=lambda d, names: [n for n in names if n != "ptx_report.py"])
    assert report_key(tmp_path) == report["key"]
    for path in (tmp_path / "kernels" / "adaln.py", tmp_path / "bench" / "ptx_report.py"):
        source = path.read_bytes()
        path.write_bytes(source + b"\n")
        assert report_key(tmp_path) != report["key"], path
        path.write_bytes(source)


def test_every_launch_and_config_is_compiled(report):
    from lfm_fast.kernels.attention import configs_for

    rows = report["rows"]
    for dtype in ("bf16", "fp16"):
        for D in (64, 72, 128):
            got = [r for r in rows if r["op"] == "attention" and r["dtype"] == dtype and r["dim"] == D]
            for kernel in ATTENTION_DOTS:
                assert len([r for r in got if r["kernel"] == kernel]) == len(configs_for(kernel, D)) > 0
            assert any(r["kernel"] == "_attn_bwd_delta_kernel" for r in got)
        adaln = {r["kernel"] for r in rows if r["op"] == "adaln" and r["dtype"] == dtype}
        assert adaln == {"_modulate_fwd_kernel", "_modulate_bwd_kernel", "_gated_fwd_kernel", "_gated_bwd_kernel",
                         "_gated_modulate_bwd_kernel"}


def test_attention_uses_wgmma_with_16_byte_tile_loads(report):
    for r in report["rows"]:
        if r["kernel"] in ATTENTION_DOTS:
            where = f"{r['kernel']} {r['dtype']} D={r['dim']} {r['config']}"
            assert r["wgmma"] > 0 and r["mma_sync"] == 0, where
            assert set(r["tile_load_bytes"]) == {"16"}, f"{where}: {r['tile_load_bytes']}"
            assert "2" not in r["ld_global_bytes"] and "2" not in r["cp_async_bytes"], where


def test_no_kernel_spills_and_all_tiles_load_16_bytes(report):
    for r in report["rows"]:
        where = f"{r['op']} {r['kernel']} {r['dtype']} D={r['dim']} {r['config']}"
        assert r["spill_bytes"] == 0, f"{where}: {r['spill_bytes']} bytes spilled"
        assert set(r["tile_load_bytes"]) <= {"16"}, f"{where}: {r['tile_load_bytes']}"


def _adaln_rows(report):
    return [r for r in report["rows"] if r["op"] == "adaln"]


def test_adaln_tile_offsets_are_64_bit(report):
    """Every 2-D tile of pointers into the (B·T, D) activations is built from int64 offsets: at a
    CFG-doubled DiT-XL batch (~1,800 × 1,024 tokens × 1,152) B·T·D passes 2³¹ and 32-bit offsets wrap.
    Tiles are written `PTR + offs` with one int64 `offs`, so no 32-bit part is added on (which would
    show here as an i32 `tt.addptr`, even where it is harmless)."""
    rows = _adaln_rows(report)
    assert rows
    for r in rows:
        where = f"{r['kernel']} {r['dtype']} D={r['dim']} {r['config']}"
        assert r["tile_offset_bits"] and set(r["tile_offset_bits"]) == {"64"}, f"{where}: {r['tile_offset_bits']}"


def test_adaln_num_warps_keep_registers_moderate(report):
    """The launches pass adaln._num_warps (Triton's default 4 warps left _gated_modulate_bwd_kernel at
    224 registers a thread at hidden 1152); with it every adaLN kernel stays at ≤ 128 registers, so
    two 8-warp CTAs fit an SM's 64K registers, and nothing spills."""
    from lfm_fast.kernels.adaln import _num_warps

    rows = _adaln_rows(report)
    assert rows
    for r in rows:
        c = r["config"]
        where = f"{r['kernel']} {r['dtype']} D={r['dim']} {c}"
        assert c["num_warps"] == _num_warps(c["BLOCK_R"], c["BLOCK_D"]), where
        if r["dim"] == 1152:
            assert c["num_warps"] == 8, where
        assert r["registers"] <= 128 and r["spill_bytes"] == 0, \
            f"{where}: {r['registers']} registers, {r['spill_bytes']} B spilled"
