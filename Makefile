PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

# torch is pinned in one place (requirements/torch.txt) and installed first, so that pip never
# resolves an unpinned, multi-GB CUDA build while installing the project's own dependencies.
$(STAMP): pyproject.toml setup.py requirements/torch.txt
	python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -c requirements/torch.txt -e ".[dev,export]"
	# pytorch-fid, for the FID parity test only: without its torchvision dependency, since no torchvision
	# wheel in reach loads with torch 2.13+cpu and a broken torchvision would break diffusers' imports
	$(PY) -m pip install -q --no-deps pytorch-fid==0.3.0
	touch $(STAMP)

demo: install
	.venv/bin/lfm-fast demo --out runs/demo

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# CPU suite (≈ 12 minutes): pytest-benchmark JSON and the FSDP scaling JSON under bench/results/,
# then bench/REPORT.md (tables, ratios, PNG plots) from them
bench: install
	@run=bench/results/$$(date +%Y%m%d-%H%M)-$$(hostname); \
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=$$run.json && \
	$(PY) bench/fsdp_scaling.py --out $$run-fsdp.json && \
	$(PY) bench/report.py $$run.json --fsdp $$run-fsdp.json

clean:
	rm -rf .venv runs .pytest_cache .benchmarks *.egg-info
