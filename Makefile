# Two commands for a fresh machine: `make demo` and `make test`. Both install first.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch 2.13.0 CPU build is what a machine without a GPU gets; a machine with CUDA keeps its own torch.
CPU_TORCH := torch==2.13.0

.PHONY: install demo test lint typecheck unit clean gpu-check

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
		echo "torch already present: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet torch; \
	else \
		$(PY) -m pip install --quiet $(CPU_TORCH); \
	fi
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $@

demo: install
	$(VENV)/bin/offload-run

LINT_PATHS := offload cache_policies offload_bench tests $(wildcard bench/*.py) $(wildcard tools/*.py)

lint: install
	$(VENV)/bin/ruff check $(LINT_PATHS)
	$(VENV)/bin/ruff format --check $(LINT_PATHS)

typecheck: install
	$(VENV)/bin/mypy offload cache_policies offload_bench

# One worker per core, each (and the servers and bench runs it starts) on one torch thread: two workers of two
# threads each on two cores measured 1.5 times slower. The tests that run under wall-clock caps (the GPU
# check's smoke run) run alone after, on every thread.
unit: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n logical -m "not serial"
	$(PY) -m pytest -q -m serial

test: lint typecheck unit

# Every GPU claim measured in one call (under 7 minutes on one GPU). Installs nothing: a GPU image has what it
# needs, and the checkout runs from the repository root. Results: OUT/gpu-check.json and OUT/gpu-check.md.
gpu-check:
	@test -n "$(OUT)" || { echo "usage: make gpu-check OUT=DIR"; exit 2; }
	$(PYTHON) bench/gpu_check.py --out $(OUT)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
