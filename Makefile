# Two commands do all the set-up: `make run` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# What running needs (make run), and that plus the test extras (make test).
RUN_STAMP := $(VENV)/.installed-run
STAMP  := $(VENV)/.installed

.PHONY: run test bench clean help packages

help:
	@echo "make run    start the daemon on config/demo.toml (http://127.0.0.1:48080)"
	@echo "make test   run the whole test suite"
	@echo "make bench  run the benchmarks in bench/"

$(RUN_STAMP): pyproject.toml clients/python/pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "lts-server needs Python 3.11 or newer; set PYTHON=python3.11")'
	@$(PYTHON) -m venv $(VENV) || { echo "cannot create a virtualenv: on Debian/Ubuntu run 'apt-get install python3-venv'"; exit 1; }
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e clients/python -e .
	@touch $(RUN_STAMP)

$(STAMP): $(RUN_STAMP)
	$(BIN)/python -m pip install --quiet -e clients/python -e ".[test]"
	@touch $(STAMP)

# The demo's state goes to var/demo (config/demo.toml), which .gitignore ignores: git status stays clean.
run: $(RUN_STAMP)
	@echo "the commands (lts-server, ltsctl, lts-license) are in $(BIN)/: export PATH=\"$$PWD/$(BIN):\$$PATH\""
	$(BIN)/lts-server --config config/demo.toml

test: packages $(STAMP)
	$(BIN)/python -m pytest

# Debian packages the tests use (python3-venv, chromium, postgresql), installed when missing.
packages:
	@bash .ci/packages

# The handshake and cluster benchmarks start their own PostgreSQL (the package) and need wrk (.ci/packages installs both).
bench: packages $(STAMP)
	$(BIN)/python bench/import_files.py
	$(BIN)/python bench/handshake/run.py --stores sqlite,postgresql --workers 1,2 --nodes 2
	$(BIN)/python bench/cluster.py
	$(BIN)/python bench/stats_query.py
	$(BIN)/python bench/alert_check.py
	$(BIN)/python bench/churn.py

clean:
	rm -rf $(VENV) var build *.egg-info
