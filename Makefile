# Two commands a newcomer needs (see README.md):
#   make demo   set up .venv and run the main job (on a CPU-only machine: the built-in demo)
#   make test   set up .venv and run the test suite (what CI runs)
# TORCH picks the PyTorch build: the default is the CPU build our dev machines and CI use.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
# Everything run here stays offline and keeps its caches inside the checkout.
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HOME := $(CURDIR)/.cache/huggingface
export XDG_CACHE_HOME := $(CURDIR)/.cache
export TORCH_EXTENSIONS_DIR := $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test lint

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -c requirements/constraints.txt -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/python -m phi3v_recipes

# The suite runs one test module per core (pytest-xdist); tests/conftest.py shares the cores and the trained runs.
test: setup
	$(BIN)/ruff check src tests conf
	$(BIN)/python -m pytest -n auto --dist loadfile

lint: setup
	$(BIN)/ruff check src tests conf
