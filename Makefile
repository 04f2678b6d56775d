# Two set-up commands on a fresh machine (CPU): `make quickstart` and `make test`.
# Each creates .venv on first use with the CPU build of torch pinned, then runs.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install quickstart test lint bench

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VENV)/bin/rayhybrid quickstart

test: install
	$(VENV)/bin/python -m pytest -q --durations=25 $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff format --check rayhybrid jobs tune tests benchmarks
	$(VENV)/bin/ruff check rayhybrid jobs tune tests benchmarks
