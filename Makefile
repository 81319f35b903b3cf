# Two commands on a fresh machine: `make demo` (set up + run the whole pipeline on built-in data), `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export HF_HUB_OFFLINE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 180
DEMO_ARGS ?=
PYTEST_ARGS ?=

.PHONY: setup demo test test-servers lint schemas bench-ingest serve clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[all,dev]'
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(VENV)/bin/inspection demo $(DEMO_ARGS)

# the tests start Mosquitto, Chromium and PostgreSQL themselves: installed here (apt-get) when missing
test-servers:
	bash deploy/install_test_servers.sh

# pytest-randomly shuffles the order (seed printed in the header; replay: PYTEST_ARGS="-p randomly --randomly-seed=N")
test: setup test-servers
	$(VENV)/bin/ruff check inspection flows tests bench deploy
	$(VENV)/bin/inspection schemas check
	$(PY) -m pytest -q --timeout=900 $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check inspection flows tests bench deploy
	$(VENV)/bin/ruff format --check inspection flows tests bench deploy

schemas: setup
	$(VENV)/bin/inspection schemas export

serve: setup
	bash deploy/serve.sh

clean:
	rm -rf $(VENV) out runs demo_out bench_out .pytest_cache
