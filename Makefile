# glalearn — two commands: `make lab` (read the book) and `make test` (check everything).
#
# The virtual environment lives in .venv and is reused. On a CPU-only machine the
# CPU build of PyTorch is installed first (TORCH=torch==2.13.0) so that pip does not
# pull a multi-GB CUDA build; on a GPU machine run e.g. `make lab TORCH=torch`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.glalearn-installed
PORT   ?= 8888
LAB_ARGS ?=
PYTEST_ARGS ?=

.PHONY: lab test test-unit test-slow test-notebooks test-browser book exercises bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

# JupyterLab in chapters/, opening chapter 0 (root, e.g. in a container, needs --allow-root).
lab: $(STAMP)
	cd chapters && ../$(PY) -m jupyter lab --port=$(PORT) $$([ "$$(id -u)" = 0 ] && echo --allow-root) \
		$(LAB_ARGS) $$(ls 00_*.ipynb 2>/dev/null | head -n 1)

NOTEBOOKS := $(wildcard chapters/*.ipynb solutions/*.ipynb)
NBVAL := --nbval --nbval-sanitize-with tests/nbval_sanitize.cfg -p no:cacheprovider

# The whole suite in one pytest run: library, kernels under Triton's interpreter, exercises, grader,
# and every chapter and solution notebook through nbval (outputs compared unless a cell opts out).
test: $(STAMP)
	TRITON_INTERPRET=1 MPLBACKEND=Agg $(PY) -m pytest -q $(NBVAL) tests $(NOTEBOOKS) $(PYTEST_ARGS)

# Library, kernel and exercise tests only, without the notebooks (nor the browser test).
# The unit tests: the library, the kernels in the interpreter, the checks (no notebooks, no browser, no
# test marked slow: those execute whole notebooks or launch several processes). `make test` runs all.
test-unit: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests --ignore=tests/browser -m "not slow" $(PYTEST_ARGS)

# The slow tests left out of test-unit: the grader executing every notebook, torchrun with 2 ranks,
# the scaling driver, `make lab` serving JupyterLab, the experiments' command line.
test-slow: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests --ignore=tests/browser -m slow $(PYTEST_ARGS)

# Chapter 1 and exercise 1 in JupyterLab, driven in Debian's Chromium by Playwright (installs chromium
# with apt-get when missing; never downloads a browser). Screenshots: test-artifacts/browser/.
# Also part of `make test`.
test-browser: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests/browser $(PYTEST_ARGS)

test-notebooks: $(STAMP)
	TRITON_INTERPRET=1 MPLBACKEND=Agg $(PY) -m pytest -q $(NBVAL) $(NOTEBOOKS) $(PYTEST_ARGS)

# Re-execute every chapter and solution notebook top to bottom, in place (seeded).
book: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m glalearn.book

exercises: $(STAMP)
	$(PY) -m glalearn.exercises build

bench: $(STAMP)
	$(PY) -m glalearn.bench forms

clean-venv:
	rm -rf $(VENV)
