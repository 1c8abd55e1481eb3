# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-all lint bench fashion-mnist clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

# Debian's real Fashion-MNIST images; without apt the code falls back to the Hub copy.
fashion-mnist:
	@[ -d $(FASHION_MNIST) ] || { $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; } \
	  || echo "dataset-fashion-mnist not installed: the Hub copy of Fashion-MNIST will be used"

demo: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m mochi_hub.demo

# The suite CI runs: unit + integration, and the end-to-end tests marked ci (tests/conftest.py says the tiers).
test: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest -q -m "not e2e or ci" --durations=15

test-all: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest -q --durations=15

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Figures for BENCHMARKS.md (about an hour on 2 quiet cores; bench/train.py also wants `pip install -e '.[bench]'`).
# bench/gpu.py is for a GPU machine (`PYTHONPATH=. python bench/gpu.py`); here it runs its CPU smoke.
bench: $(BIN)/.installed
	$(BIN)/python bench/head.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/probe.py
	$(BIN)/python bench/learning.py
	$(BIN)/python bench/detection.py --quick
	PYTHONPATH=. $(BIN)/python bench/gpu.py --smoke

clean:
	rm -rf $(VENV) build dist *.egg-info runs
