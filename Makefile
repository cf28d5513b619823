# The two commands of the README. Each creates .venv when missing, installs torch first (a CPU build by
# default; override with e.g. `make test TORCH=torch==2.14.1`), then the package with its extras.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2 -m "not slow"
DEMO_OUT ?= demo_out

.PHONY: demo test test-all setup clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/metaplastic demo --out $(DEMO_OUT)

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-all: setup
	$(BIN)/python -m pytest -q -n 2 tests

clean:
	rm -rf $(VENV) $(DEMO_OUT) .pytest_cache
