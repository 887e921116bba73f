# queuejob: the README's two commands are `make demo` and `make test`.
# Every target creates or reuses .venv and installs what it needs.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
BROKER := $(PY) scripts/broker.py run --
PYTEST_ARGS ?=

.PHONY: all demo test lint bench venv clean test-k8s test-rabbitmq4 FORCE

all: test

# The repository's flows/ and blocks/ are installed as queuejob.flows and queuejob.blocks. The
# editable install is setuptools' strict mode: a tree of links under build/ that mypy and
# import-linter read like any installed package. It links the files there were at install time,
# so the install is redone when the list of package files changes (FILES), not only pyproject.
FILES  := $(VENV)/.package-files
PACKAGE_FILES := $(sort $(shell find flows blocks -name '*.py' -o -name py.typed))

$(FILES): FORCE
	@mkdir -p $(VENV)
	@echo '$(PACKAGE_FILES)' | cmp -s - $@ || echo '$(PACKAGE_FILES)' > $@

$(STAMP): pyproject.toml $(FILES)
	@echo "[setup] creating $(VENV) and installing queuejob with its dev tools"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' \
		--config-settings editable_mode=strict
	@touch $(STAMP)

FORCE:

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	@# mypy reads the package through the install's links: name the repository's files instead.
	@out=$$($(VENV)/bin/mypy 2>&1); rc=$$?; printf '%s\n' "$$out" | sed -E \
		-e 's#build/__editable__[^/]*/queuejob/__init__\.py#flows/_queuejob/__init__.py#' \
		-e 's#build/__editable__[^/]*/queuejob/(flows|blocks)/#\1/#'; exit $$rc
	$(VENV)/bin/lint-imports

test: lint
	@# In CI the real-control-plane tier runs too: build its binaries first (once; cached outside
	@# the repository), so the long first build shows in the log before the tests start.
	@if [ "$${CI:-}" = true ]; then bash scripts/k8s-control-plane.sh build || echo "[k8s] build failed: tests/realkube will report it"; fi
	$(BROKER) $(VENV)/bin/pytest $(PYTEST_ARGS)
	@# In CI the broker tier runs against RabbitMQ 4 too (its chroot cached outside the repository).
	@if [ "$${CI:-}" = true ]; then $(MAKE) --no-print-directory test-rabbitmq4; fi

# The broker tier (tests/broker) against RabbitMQ 4.0: Debian trixie's rabbitmq-server in a chroot
# made once with debootstrap into /var/cache/queuejob/rabbitmq-4 (QUEUEJOB_RABBITMQ4_CACHE moves
# it), started privately for the run whatever other broker is about.
test-rabbitmq4: $(STAMP)
	bash scripts/rabbitmq4.sh build
	QUEUEJOB_TEST_BROKER_URL= $(PY) scripts/broker.py run --rabbitmq4 -- \
		$(VENV)/bin/pytest tests/broker -p no:cacheprovider $(PYTEST_ARGS)

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
	rm -rf $(VENV) build .cache .pytest_cache .mypy_cache .ruff_cache
