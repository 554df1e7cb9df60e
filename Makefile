# Set-up, tests and the quickstart, all in a local virtual environment (.venv).
#
#   make quickstart   set up, then train transcoders on the embedded default and summarise
#   make test         set up, then run the test suite
#   make docs         set up, then build the documentation site (docs/_build/html)
#
# `make setup` installs torch first: the CPU build pinned below, unless .venv already has a torch
# (GPU users: create .venv and install the torch build for their CUDA first, then `make setup`).

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sct-installed
TORCH ?= torch==2.13.0

.PHONY: setup test quickstart lint tiny-c2s docs

setup: $(STAMP)

$(BIN)/python:
	$(PY) -m venv $(VENV)

# Re-install only when pyproject.toml changes; the package itself is editable.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "$(TORCH)"
	$(BIN)/python -m pip install -e ".[test,dev,spatial,docs]"
	touch $@

test: setup
	$(BIN)/python -m pytest -q

quickstart: setup
	$(BIN)/python scripts/quickstart.py --out outputs/quickstart

lint: setup
	$(BIN)/ruff check src tests scripts benchmarks
	$(BIN)/ruff format --check src tests scripts benchmarks

# The documentation site (docs/_build/html/index.html); warnings are errors.
docs: setup
	$(BIN)/python -m sphinx -W --keep-going -b html docs docs/_build/html

# Retrain the embedded model (deterministic; minutes on 2 CPU cores). Commit the result.
tiny-c2s: setup
	$(BIN)/python scripts/train_tiny_c2s.py --out src/sctranscoder/datasets/tiny_c2s
