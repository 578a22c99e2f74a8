# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each sets itself up: a .venv with torch (2.13.0 when none is installed there yet; on CPU-only
# machines pip finds the CPU wheel first when one is on disk, as here), then this package with
# every extra.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
ARGS ?=

# megatron-core >= 0.17 needs Python >= 3.12: `make test-megatron-latest` runs the Megatron tests
# against the newest supported release in a second venv, next to .venv (0.16.1 on Python < 3.12).
VENV312 ?= .venv312
MEGATRON_LATEST ?= 0.19.2
# Every tests/test_megatron*.py, and the training script under torchrun (1 rank vs LSS on 2). The
# rest of test_main_job.py (demo, resume) drives the same script through the same megatron-core
# calls and would add minutes: MEGATRON_TESTS="... tests/test_main_job.py" runs it all.
MEGATRON_TESTS ?= $(sort $(wildcard tests/test_megatron*.py)) \
	tests/test_main_job.py::test_training_script_on_two_ranks_gives_the_one_rank_losses
# First interpreter >= 3.12 that runs: PYTHON312 if given, python3.12, pyenv's 3.12, ~/.pyenv's.
FIND_PYTHON312 = for p in $(PYTHON312) python3.12 "$$(pyenv prefix 3.12 2>/dev/null)/bin/python" \
	$(HOME)/.pyenv/versions/3.1[2-9]*/bin/python; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && { command -v "$$p"; break; }; done

.PHONY: setup test demo bench bench-quick plan gpu-check clean test-megatron-latest megatron-latest-run

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

test-megatron-latest:
	@py=$$($(FIND_PYTHON312)); \
	if [ -z "$$py" ]; then \
		echo "test-megatron-latest: SKIPPED, no Python >= 3.12 on this machine (megatron-core $(MEGATRON_LATEST) needs it; pyenv install 3.12, or PYTHON312=/path/to/python3.12)"; \
	else \
		$(MAKE) --no-print-directory megatron-latest-run PYTHON312="$$py"; \
	fi

# The sentinel names the release, so changing MEGATRON_LATEST reinstalls; torch stays if present.
$(VENV312)/.installed-megatron-core-$(MEGATRON_LATEST): setup.py
	test -x $(VENV312)/bin/python || $(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -c "import torch" 2>/dev/null || $(VENV312)/bin/python -m pip install --quiet "torch==$(TORCH_VERSION)"
	$(VENV312)/bin/python -m pip install --quiet -e ".[megatron,demo,dev]" "megatron-core==$(MEGATRON_LATEST)"
	rm -f $(VENV312)/.installed-megatron-core-*
	touch $@

# Tests named by file and node id: pytest fails on a missing one, and a run that selects nothing
# exits 5, which fails this target too.
megatron-latest-run: $(VENV312)/.installed-megatron-core-$(MEGATRON_LATEST)
	$(VENV312)/bin/python -W ignore -m lss_plugin.megatron.compat
	$(VENV312)/bin/python -m pytest $(MEGATRON_TESTS) $(ARGS)

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
	rm -rf $(VENV) $(VENV312) runs .pytest_cache *.egg-info
