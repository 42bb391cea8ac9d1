# Two commands on a fresh machine: `make train` and `make test` (each sets up .venv first).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The torch to install when the venv has none. The default is the CPU build our machines keep on
# disk; GPU users pass a CUDA build, or create the venv over their own torch (see README).
TORCH ?= torch==2.13.0
CONFIG ?= configs/gssm/debug.yaml
STAMP := $(VENV)/.installed

.PHONY: install train test bench lint format clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel "pybind11>=2.10"
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q --no-build-isolation -e ".[dev]"
	touch $(STAMP)

train: install
	$(PY) -m nanollama.train $(CONFIG) $(ARGS)

test: install
	$(PY) -m pytest -q $(ARGS)

bench: install
	$(PY) -m pytest bench --benchmark-only $(ARGS)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build *.egg-info nanollama/*.so .pytest_cache .benchmarks
