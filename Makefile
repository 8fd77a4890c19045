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
PYTEST_ARGS ?=

.PHONY: lab test test-unit test-notebooks test-browser book exercises bench clean-venv

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

lab: $(STAMP)
	cd chapters && ../$(PY) -m jupyter lab --port=$(PORT) $$(ls 00_*.ipynb 2>/dev/null | head -n 1)

# The whole suite: library, kernels under Triton's interpreter, exercises, grader, notebooks (nbval).
test: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

# Re-execute every chapter and solution notebook top to bottom, in place (seeded).
book: $(STAMP)
	TRITON_INTERPRET=1 $(PY) -m glalearn.book

exercises: $(STAMP)
	$(PY) -m glalearn.exercises build

bench: $(STAMP)
	$(PY) -m glalearn.bench forms

clean-venv:
	rm -rf $(VENV)
