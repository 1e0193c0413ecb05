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
	touch $(STAMP)

demo: install
	.venv/bin/lfm-fast demo --out runs/demo

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

# CPU suite (≈ 6 minutes), its JSON under bench/results/, then bench/REPORT.md from it
bench: install
	@run=bench/results/$$(date +%Y%m%d-%H%M)-$$(hostname).json; \
	$(PY) -m pytest -q bench --benchmark-only --benchmark-json=$$run && $(PY) bench/report.py $$run

clean:
	rm -rf .venv runs .pytest_cache .benchmarks *.egg-info
