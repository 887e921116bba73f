# queuejob: the README's two commands are `make demo` and `make test`.
# Every target creates or reuses .venv and installs what it needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BROKER := $(PY) scripts/broker.py run --
PYTEST_ARGS ?=

.PHONY: all demo test lint bench venv clean test-k8s

all: test

$(STAMP): pyproject.toml
	@echo "[setup] creating $(VENV) and installing queuejob with its dev tools"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

test: lint
	$(BROKER) $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BROKER) $(VENV)/bin/queuejob demo

bench: $(STAMP)
	$(BROKER) $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
