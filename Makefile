# Developer entry points. Needs only Python >= 3.11 and make: the first target run creates
# .venv and installs the project with its dev extras; later runs reinstall only when
# pyproject.toml changed since the last install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install; pyproject.toml newer than it means reinstall.
STAMP := $(VENV)/.tempomq-installed
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: install run test lint bench

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

# Defaults: 127.0.0.1:8080, data in ./data; flags or TEMPOMQ_* variables change them.
run: $(STAMP)
	$(BIN)/tempomq serve $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Each bench/*.py script prints its own figures; files starting with "_" are helpers.
bench: $(STAMP)
	@set -e; for script in bench/*.py; do \
		[ -e "$$script" ] || { echo "no benchmarks in bench/"; break; }; \
		case "$$(basename "$$script")" in _*) continue ;; esac; \
		echo "== $$script"; \
		$(BIN)/python "$$script"; \
	done
