# Quick start: `make demo` runs the main job on the tiny default; `make test` runs the test suite.
# Both create a local virtualenv (.venv) on first use, pinned to the tested versions.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo
PYTEST_ARGS ?= -n 2  # two workers (pytest-xdist): the suite is compile-bound and single-threaded
export JAX_PLATFORMS ?= cpu
export TF_CPP_MIN_LOG_LEVEL ?= 3

.PHONY: demo test lint venv clean

$(VENV)/.installed: setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

demo: $(VENV)/.installed
	$(PY) -m qwen_image_rl.demo --workdir=$(WORKDIR)

# The linter and formatter (ruff.toml) run first: a lint error fails the test command.
lint: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
