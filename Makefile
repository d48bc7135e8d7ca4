# The two commands a new user runs: `make demo` and `make test`.
# Both create .venv, install into it and run; nothing else is needed.

VENV   ?= .venv
PYTHON ?= $(shell for p in python3.13 python3.12 python3.11 python3; do \
            command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && { echo $$p; break; }; \
          done)
BIN     = $(VENV)/bin
PYTEST_ARGS ?=
# The suite runs in this many pytest-xdist processes (a test waits on etcd, PostgreSQL and the bot between
# bursts of CPU, so more processes than CPUs keep both busy); 0 runs it in this process. Tests are handed out one at a time,
# those sharing a module-scoped fixture together (tests/conftest.py). On 2 CPUs the whole suite took
# 695 s with 2, 549 s with 3 and 445 s with 4 (December 2026). On 7 December it took 350 s with 4, the CPUs idle
# 20% of the time (tests waiting on etcd's and the bot's clocks), and 329 s with 5, idle 11%: 5 it is. The suite
# keeps both CPUs busy, so its time follows its CPU-seconds (608 at 877f0ff, 323 s).
# make test-fast keeps 2 (FAST_WORKERS).
PYTEST_WORKERS ?= 5
FAST_WORKERS ?= 2
# Python writes its bytecode, and pytest its rewritten test modules, so the next process reads them instead of
# compiling again (a collection compiled every test module: 9 s per pytest process, with the variable set).
unexport PYTHONDONTWRITEBYTECODE

.PHONY: demo test test-fast lint bench install clean node etcd shell robustness

$(BIN)/python:
	@test -n "$(PYTHON)" || { echo "etcd-chatops needs Python >= 3.11 (set PYTHON=/path/to/python3.11)"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstall only when the project definition changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/etcd-chatops demo

# Your shell with .venv/bin first on PATH: `etcd-chatops` as the README types it (exit to leave).
shell: install
	@echo "etcd-chatops is on PATH in this shell; exit to leave it"
	@PATH="$(CURDIR)/$(BIN):$$PATH" VIRTUAL_ENV="$(CURDIR)/$(VENV)" $${SHELL:-/bin/sh}

# ruff, mypy (and its list of non-strict modules, which only shrinks), the import contracts, as configured in pyproject.toml; gofmt and go vet for the node program.
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python scripts/typing-ratchet.py
	$(BIN)/lint-imports --no-cache
	@cd deploy/node && unformatted="$$(gofmt -l .)" && \
	  { test -z "$$unformatted" || { echo "gofmt -w needed: $$unformatted"; exit 1; }; } && go vet ./...

# etcd-chatops-node (deploy/node, Go), built into build/node/ when its sources changed.
node: install
	$(BIN)/python -m bot.testing.node


# etcd, etcdctl and etcdutl of the releases pinned in scripts/etcd-versions, built from etcd's Go
# modules into ~/.cache/etcd-chatops (nothing to do once built; without Go: one line, and under
# CI=true a failure).
etcd:
	sh scripts/build-etcd.sh

test: lint node etcd
	sh scripts/install-etcd34.sh
	sh scripts/install-postgres.sh
	sh scripts/install-prometheus.sh
	sh scripts/install-sshd.sh
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS)

# The nemesis (tests/robustness/README.md): random faults during real operations, invariants checked after
# each seed. Without arguments the few seeds the suite runs too; SEEDS=200 the first 200 (the soak); SEED=17
# replays one.
robustness: install node etcd
	sh scripts/install-postgres.sh
	ROBUSTNESS_SEEDS="$(SEEDS)" ROBUSTNESS_SEED="$(SEED)" $(BIN)/python -m pytest tests/robustness $(PYTEST_ARGS)

# The pure tests only (no etcd, no bot, no stand-in, no long fuzzing): a quick check while editing. In as
# many processes as `make test`: a third of their time is interpreters the tests start (the CLI's exit statuses,
# fresh imports), which two cores run side by side.
test-fast: install
	$(BIN)/python -m pytest -n $(FAST_WORKERS) --dist loadgroup -m "not e2e and not slow" --ignore=tests/robustness $(PYTEST_ARGS)

bench: install
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
