# Developer entry points. Needs only Python >= 3.11 and make: the first target run creates
# .venv and installs the project with its dev extras; later runs reinstall only when
# pyproject.toml changed since the last install.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install; pyproject.toml newer than it means reinstall.
STAMP := $(VENV)/.tempomq-installed
PYTEST_ARGS ?=
# Test files run on this many workers (pytest-xdist), each file whole on one worker.
PYTEST_WORKERS ?= 2
RUN_ARGS ?=

.PHONY: install run test lint bench compose-token compose-test chaos

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
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not compose" $(PYTEST_ARGS)

# The compose dev stack in Docker, on images built here from Debian's packages
# (compose/docker-compose.local.yml): needs a running Docker engine and Compose v2, as root.
compose-test: $(STAMP)
	$(BIN)/pytest -q -m compose tests/compose $(PYTEST_ARGS)

# kill -9 trials of a real server under load (tests/chaos); prints the counts of what was lost,
# duplicated, early, delivered after its ack, attempt resets and DLQ duplicates; exit 1 on any.
# CHAOS_TRIALS sets how many, CHAOS_SEED the first trial's seed (to repeat a series).
CHAOS_TRIALS ?= 100

chaos: $(STAMP)
	CHAOS_TRIALS=$(CHAOS_TRIALS) $(BIN)/python -m tests.chaos

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Each bench/*.py script prints its own figures and a JSON line, kept in docs/bench-results/;
# files starting with "_" are helpers. The delay bench also saves its lateness histogram, and
# bench/plots.py draws docs/img/*.png from the results.
RESULTS := docs/bench-results

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@mkdir -p $(RESULTS)
	@set -e; for script in bench/*.py; do \
		name=$$(basename "$$script" .py); \
		case "$$name" in _*|plots|delay_release) continue ;; esac; \
		echo "== $$script"; \
		$(BIN)/python "$$script" | tee $(RESULTS)/$$name.json; \
	done
	$(BIN)/python bench/delay_release.py --save $(RESULTS)/delay_release.json
	$(BIN)/python bench/plots.py $(RESULTS)/*.json

# The compose stack's admin token, a Docker secret: random, made once, kept out of git. Mode
# 644 because compose bind-mounts the file for the container's own user; the directory is 700.
COMPOSE_TOKEN := compose/secrets/admin-token

compose-token: $(COMPOSE_TOKEN)

$(COMPOSE_TOKEN):
	@mkdir -p -m 700 $(dir $@)
	@$(PYTHON) -c "import secrets; print('tmq_' + secrets.token_urlsafe(32))" > $@
	@chmod 644 $@
	@echo "made $@: send it as Authorization: Bearer <token>, or export TEMPOMQ_TOKEN"
