# The two commands of the README. Each creates .venv when missing, installs torch first (a CPU build by
# default; override with e.g. `make test TORCH=torch==2.14.1`), then the package with its extras at their
# newest releases. `make test-floor` runs the suite at the oldest releases pyproject.toml declares
# (docs/testing.md#version-floors).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?= -n 2 -m "not slow"
DEMO_OUT ?= demo_out
# The floor run: its own venv, on the oldest Python that pyproject.toml's requires-python admits.
FLOOR_PYTHON ?= python3.11
FLOOR_VENV ?= .venv-floor
# tests/test_floor_record.py checks the record a floor run writes, so the floor run itself leaves it out.
FLOOR_PYTEST_ARGS ?= -n 2 -m "not slow" --ignore=tests/test_floor_record.py
FLOOR_TESTS ?= tests
FLOOR_RECORD ?= tests/results/floor_run.json

.PHONY: demo test test-all test-floor versions setup clean

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

versions: setup
	@$(BIN)/python tests/versions.py installed

test: versions
	$(BIN)/python -m pytest -q $(PYTEST_ARGS) tests

test-all: versions
	$(BIN)/python -m pytest -q -n 2 tests

# Every floor of pyproject.toml (dependencies and the dev extra) pinned with ==, derived from pyproject.toml
# by tests/versions.py, then the package and its extras resolved under those pins: an inconsistent set of
# floors fails here. The suite's counts and the installed versions are written to $(FLOOR_RECORD), which
# tests/test_floor_record.py compares with pyproject.toml.
test-floor:
	test -x $(FLOOR_VENV)/bin/python || $(FLOOR_PYTHON) -m venv $(FLOOR_VENV)
	$(PYTHON) tests/versions.py floors dev > $(FLOOR_VENV)/floors.txt
	$(FLOOR_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(FLOOR_VENV)/bin/python -m pip install --quiet -c $(FLOOR_VENV)/floors.txt -e ".[dev]"
	$(FLOOR_VENV)/bin/python tests/versions.py installed
	rm -f $(FLOOR_VENV)/junit.xml
	nice $(FLOOR_VENV)/bin/python -m pytest -q -p no:cacheprovider $(FLOOR_PYTEST_ARGS) \
	  --junitxml=$(FLOOR_VENV)/junit.xml $(FLOOR_TESTS); rc=$$?; \
	  PYTEST_ARGS='$(FLOOR_PYTEST_ARGS) $(FLOOR_TESTS)' $(FLOOR_VENV)/bin/python tests/versions.py record \
	  $(FLOOR_VENV)/junit.xml $(FLOOR_RECORD) dev && exit $$rc

clean:
	rm -rf $(VENV) $(FLOOR_VENV) $(DEMO_OUT) .pytest_cache
