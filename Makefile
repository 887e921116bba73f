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
	$(VENV)/bin/lint-imports

test: lint
	@# In CI the real-control-plane tier runs too: build its binaries first (once; cached outside
	@# the repository), so the long first build shows in the log before the tests start.
	@if [ "$${CI:-}" = true ]; then bash scripts/k8s-control-plane.sh build || echo "[k8s] build failed: tests/realkube will report it"; fi
	$(BROKER) $(VENV)/bin/pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BROKER) $(VENV)/bin/queuejob demo

# The real-control-plane tier (tests/realkube): Kubernetes 1.20's own apiserver, Job controller
# and garbage collector, built once from Debian's source package into a cache outside the
# repository (QUEUEJOB_K8S_CACHE), with a kubelet stand-in that runs pods as local processes.
test-k8s: $(STAMP)
	bash scripts/k8s-control-plane.sh build
	QUEUEJOB_REAL_K8S=1 $(BROKER) $(VENV)/bin/pytest tests/realkube $(PYTEST_ARGS)

bench: $(STAMP)
	$(BROKER) $(PY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
