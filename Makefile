# micro_diffusion: every target sets up what it needs (make install is idempotent and quick when done).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
export MPLCONFIGDIR ?= $(CURDIR)/.venv/.mplconfig
export HF_HUB_OFFLINE ?= 1

.PHONY: install test lint demo

install: $(STAMP)

# The stamp depends on the lock and the project file: a changed lock reinstalls, an unchanged one is a no-op.
$(STAMP): requirements.lock pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS) tests

lint: install
	$(PY) -m ruff check micro_diffusion data_prep tests benchmarks

demo:
	@echo "make demo: the end-to-end CPU demo is not built yet (see the open demo issue); nothing was run." >&2
	@exit 2
