# Two commands for a newcomer:  `make run` (napari with the Segment Anything widget)
# and `make test` (`ruff check`, then the whole test suite, as CI runs it). Both create .venv on first use.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: run test bench

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e '.[testing]'
	@# A .venv made before the switch to PyQt6 still holds PyQt5, which qtpy would pick first.
	$(PY) -m pip uninstall -y -q PyQt5 PyQt5-Qt5 PyQt5-sip 2>/dev/null || true
	touch $@

# torchvision (hence triton, when installed) is imported before napari opens its window: loading
# triton after Mesa's OpenGL driver crashes the process (see src/napari_sam/_napari/__init__.py).
run: $(VENV)/.installed
	$(PY) -c 'import torchvision, napari.__main__; napari.__main__.main()' -w napari-sam

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/bench_predictor.py
