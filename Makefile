# Developer entry points. Needs only Python >= 3.11 and make: the first target run creates
# .venv. `make run` installs the project with what the server needs and nothing else; `make test`
# (and lint, bench, chaos) with its dev extras too. Later runs reinstall only when pyproject.toml
# changed since that kind of install; either order works (the dev install holds the server's).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Touched after a successful install of each kind; pyproject.toml newer than it means reinstall.
SERVER_STAMP := $(VENV)/.tempomq-server
STAMP := $(VENV)/.tempomq-dev
# pip's own lines that show where an install stands (one per package; a progress bar on a
# terminal only), without its warnings about the local wheel mirrors.
PIP_PROGRESS := grep --line-buffered -E '^ *(Collecting|Downloading|Installing|Successfully|ERROR)'
PYTEST_ARGS ?=
# Test files run on this many workers (pytest-xdist), each file whole on one worker.
PYTEST_WORKERS ?= 2
RUN_ARGS ?=

.PHONY: install run test lint bench bench-peers compose-token compose-test chaos

# The interpreter .venv is made with, recorded in it: another PYTHON (or an upgraded one)
# rebuilds .venv instead of mixing two Pythons' packages.
PYTHON_ID := $(shell $(PYTHON) -c 'import sys; print(sys.executable, *sys.version_info[:3])' 2>/dev/null)
VENV_ID := $(VENV)/.python-id
ifneq ($(PYTHON_ID),)
ifneq ($(wildcard $(VENV_ID)),)
ifneq ($(shell cat $(VENV_ID)),$(PYTHON_ID))
$(info make: $(VENV) was made with $(shell cat $(VENV_ID)); rebuilding it with $(PYTHON_ID))
$(shell rm -rf $(VENV))
endif
endif
endif

install: $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || { \
		echo "make: tempomq needs Python >= 3.11, and '$(PYTHON)' is $$($(PYTHON) --version 2>&1 || echo 'not found')."; \
		echo "make: name another with PYTHON, e.g. make test PYTHON=python3.12"; \
		exit 1; } >&2
	$(PYTHON) -m venv $(VENV)
	@echo '$(PYTHON_ID)' > $(VENV_ID)

$(SERVER_STAMP): pyproject.toml | $(BIN)/python
	@echo "make: installing tempomq and what its server needs into $(VENV) (no test tools)"
	$(BIN)/python -m pip install -e . 2>&1 | $(PIP_PROGRESS) || true
	@$(BIN)/python -c 'import tempomq.app' || { echo "make: the install failed; run: $(BIN)/python -m pip install -e ." >&2; exit 1; }
	touch $@

$(STAMP): pyproject.toml | $(BIN)/python
	@echo "make: installing tempomq and its test tools into $(VENV) (a minute or two the first time)"
	$(BIN)/python -m pip install -e '.[dev]' 2>&1 | $(PIP_PROGRESS) || true
	@$(BIN)/python -c 'import tempomq.app, schemathesis' || { echo "make: the install failed; run: $(BIN)/python -m pip install -e '.[dev]'" >&2; exit 1; }
	touch $@ $(SERVER_STAMP)

# Defaults: 127.0.0.1:8080, data in ./data; flags or TEMPOMQ_* variables change them.
run: $(SERVER_STAMP)
	$(BIN)/tempomq serve $(RUN_ARGS)

test: $(STAMP)
	$(BIN)/pytest -q -n $(PYTEST_WORKERS) --dist loadfile -m "not compose" $(PYTEST_ARGS)

# The compose dev stack in Docker, on images built here from Debian's packages
# (compose/docker-compose.local.yml): needs a running Docker engine and Compose v2, as root.
compose-test: $(STAMP)
	$(BIN)/pytest -q -m compose tests/compose $(PYTEST_ARGS)

# kill -9 trials of a real server under load (tests/chaos); prints the counts of what was lost,
# duplicated, early, delivered after its ack, attempt resets and DLQ duplicates; exit 1 on any.
# CHAOS_TRIALS sets how many, CHAOS_SEED the first trial's seed (to repeat a series),
# CHAOS_FLUSH=async the flush mode (default sync).
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

# tempomq beside arq, RQ and Celery on a private Redis, 3 runs, one table with medians and spread
# (about 10 minutes; the peers are installed into bench/.peers-venv on the first run).
bench-peers: $(STAMP)
	@mkdir -p $(RESULTS)
	$(BIN)/python bench/peers.py | tee $(RESULTS)/peers.txt

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	@mkdir -p $(RESULTS)
	@set -e; for script in bench/*.py; do \
		name=$$(basename "$$script" .py); \
		case "$$name" in _*|plots|delay_release|peers) continue ;; esac; \
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
