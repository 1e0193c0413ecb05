"""The suite's own rule on skips (tests/conftest.py): without CUDA, exactly the `gpu` tests skip."""

from types import SimpleNamespace

from tests.conftest import skip_problems


def report(nodeid, skipped, gpu=False, reason="needs CUDA"):
    return SimpleNamespace(nodeid=nodeid, skipped=skipped, when="setup" if skipped else "call",
                           keywords={"gpu": 1} if gpu else {}, longrepr=("f.py", 1, f"Skipped: {reason}") if skipped else None)


def test_only_gpu_tests_skip_and_every_gpu_test_skips_without_cuda():
    gpu_skips = [report(f"tests/kernels/test_gpu.py::t{i}", True, gpu=True) for i in range(3)]
    assert skip_problems(gpu_skips + [report("tests/test_a.py::ok", False)], cuda=False) == []
    broken = report("tests/test_convert.py", True, reason="could not import 'diffusers'")
    broken.keywords = None  # a module skipped at collection: a CollectReport
    del broken.keywords
    assert skip_problems(gpu_skips + [broken], cuda=False) == [
        "tests/test_convert.py skipped (Skipped: could not import 'diffusers'): only CUDA and TensorRT tests may skip"]
    ran = report("tests/test_export.py::trt", False, gpu=True)
    assert skip_problems([ran], cuda=False) == ["tests/test_export.py::trt is marked gpu but ran without CUDA"]
    assert skip_problems([ran], cuda=True) == []
    assert skip_problems([report("t::trt", True, gpu=True, reason="could not import 'tensorrt'")], cuda=True) == []
    assert len(skip_problems(gpu_skips, cuda=True)) == 3  # on a GPU machine a gpu test skips only for TensorRT


def test_every_bench_script_imports():
    """The measurement scripts and benchmarks under bench/ are not run by the suite: a name they import that was
    renamed or removed (bench/inpaint_reinjection.py's `solver_step`) fails here, not when a measurement is rerun."""
    import runpy
    from pathlib import Path

    scripts = sorted((Path(__file__).resolve().parents[1] / "bench").glob("*.py"))
    assert len(scripts) >= 18
    for path in scripts:
        runpy.run_path(str(path), run_name="imported_by_the_suite")  # the top level: imports and definitions
