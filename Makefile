# Two commands on a fresh machine: `make quickstart` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
RUN_DIR ?= runs/quickstart
CONFIG ?= configs/quickstart.yaml
PYTEST_ARGS ?=

.PHONY: quickstart test install clean-venv

# torch is pinned to the CPU wheel first so pip never resolves the CUDA build.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

quickstart: $(VENV)/.installed
	$(VENV)/bin/iterppo fit --config $(CONFIG) --run_dir $(RUN_DIR)
	$(VENV)/bin/iterppo evaluate --config $(CONFIG) --policy $(RUN_DIR)/final_policy --episodes 500 --seed 12345

test: $(VENV)/.installed
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
