# Two commands for a newcomer:  `make run` (napari with the Segment Anything widget)
# and `make test` (the whole test suite, as CI runs it). Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[testing]'
	touch $@

run: $(VENV)/.installed
	$(VENV)/bin/napari -w napari-sam

test: $(VENV)/.installed
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_predictor.py
