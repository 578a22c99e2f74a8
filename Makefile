# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each sets itself up: a .venv with torch (2.13.0 when none is installed there yet; on CPU-only
# machines pip finds the CPU wheel first when one is on disk, as here), then this package with
# every extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
ARGS ?=

.PHONY: setup test demo bench bench-quick plan gpu-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: setup.py $(BIN)/python
	@# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $@

setup: $(VENV)/.installed

test: setup
	$(BIN)/python -m pytest tests $(ARGS)

demo: setup
	$(BIN)/python examples/demo.py $(ARGS)

bench: setup
	$(BIN)/python -m lss_plugin.bench --out runs/bench $(ARGS)

bench-quick: setup
	$(BIN)/python -m lss_plugin.bench --quick --out runs/bench-quick $(ARGS)

plan: setup
	$(BIN)/python -m lss_plugin.plan $(ARGS)

# On a CUDA machine: GPU exactness tests and a kernel timing table (a few minutes); elsewhere exits 0.
gpu-check: setup
	$(BIN)/python -m lss_plugin.bench.gpu_check $(ARGS)

clean:
	rm -rf $(VENV) runs .pytest_cache *.egg-info
