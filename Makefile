# Two commands for a newcomer: `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FASHION_MNIST := /usr/share/datasets/fashion-mnist
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo test test-all bench fashion-mnist clean

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

# The suite CI runs: every fast test plus a representative subset of the slow end-to-end ones.
test: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest -q -m "not slow or ci"

test-all: $(BIN)/.installed fashion-mnist
	$(BIN)/python -m pytest -q

# Figures for BENCHMARKS.md (about 30 minutes on 2 quiet cores; bench/train.py and bench/dynamics.py also want
# `pip install -e '.[bench]'`).
bench: $(BIN)/.installed
	$(BIN)/python bench/head.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/probe.py
	$(BIN)/python bench/dynamics.py

clean:
	rm -rf $(VENV) build dist *.egg-info runs
