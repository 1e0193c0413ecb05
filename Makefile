PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test bench mutate clean

install: $(STAMP)

# torch is pinned in one place (requirements/torch.txt) and installed first, so that pip never
# resolves an unpinned, multi-GB CUDA build while installing the project's own dependencies.
$(STAMP): pyproject.toml setup.py requirements/torch.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -c requirements/torch.txt -e ".[dev,export,lmdb]"
	# pytorch-fid, for the FID parity test only: without its torchvision dependency, since no torchvision
	# wheel in reach loads with torch 2.13+cpu and a broken torchvision would break diffusers' imports
	$(PY) -m pip install -q --no-deps pytorch-fid==0.3.0
	# the TensorRT 10 and 11 Python bindings, downloaded, not installed (1 MB each; their libnvinfer is not on
	# PyPI): tests/test_tensorrt.py checks every TensorRT name the runner uses against their pybind11 modules
	$(PY) -m pip download -q --no-deps -d .venv/tensorrt-bindings tensorrt-cu12-bindings==10.13.0.35
	$(PY) -m pip download -q --no-deps -d .venv/tensorrt-bindings tensorrt-cu12-bindings==11.4.0.106
	touch $(STAMP)

demo: install
	.venv/bin/lfm-fast demo --out runs/demo --overwrite

# pytest workers a file each at a time (its module fixtures built once), one torch thread each: most tests are small
# tensors, subprocess starts and Python, which single-threaded workers run faster than threads do (two 2-thread
# processes on 2 cores oversubscribe them: a training step measured 8× slower). Three workers on 2 cores: the third
# runs while the others wait on a subprocess, a lock or the last file (the cores were busy 90 % of a 3-worker run)
test: install
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n 3 --dist loadfile --no-loadscope-reorder --durations=10 tests

# CPU suite (≈ 10 minutes): each bench file in a fresh process (in one long-lived process the demo's
# eager sampling measured 4.6× slower after the other files), merged into bench/results/<date>-<host>.json
# with the FSDP scaling rows and the derived ratios, then the reduced NFE sweep on the demo checkpoint (≤ 3 minutes;
# the demo is trained first where runs/demo has none), then bench/REPORT.md (tables, PNG plots) from it all
bench: install
	@run=bench/results/$$(date +%Y%m%d-%H%M)-$$(hostname); parts=$$(mktemp -d); \
	for f in bench/test_*.py; do \
	  $(PY) -m pytest -q $$f --benchmark-only --benchmark-json=$$parts/$$(basename $$f .py).json || exit 1; \
	done; \
	$(PY) bench/fsdp_scaling.py --out $$run-fsdp.json && \
	{ test -f runs/demo/dit/config.json || .venv/bin/lfm-fast demo --out runs/demo --overwrite; } && \
	$(PY) bench/nfe_sweep.py --quick && \
	$(PY) bench/report.py $$parts/*.json --fsdp $$run-fsdp.json --save $$run.json && rm -rf $$parts

# mutation testing (not part of `make test`; an hour or more for every scope on 2 cores): mutmut 3 on the scopes of
# bench/mutate.py, each in mutants-work/SCOPE with its own tests; scores and survivors to bench/results/cpu/mutation.json.
# Some scopes: make mutate SCOPE=ema,lr_schedule
mutate: install
	$(PY) -m pip install -q mutmut==3.8.1
	$(PY) bench/mutate.py $(if $(SCOPE),--scope $(SCOPE))

clean:
	rm -rf .venv runs .pytest_cache .benchmarks *.egg-info mutants-work
