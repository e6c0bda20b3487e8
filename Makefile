# The two set-up commands of the README: `make demo` and `make test`.
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= /tmp/corral-demo

.PHONY: setup demo test lint typecheck unit integration vm vm-e2e vm-harness clean

setup:
	@scripts/setup.sh

demo: setup
	@scripts/demo.sh $(DEMO_DIR)

lint: setup
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench

typecheck: setup
	$(VENV)/bin/mypy

test: lint typecheck
	$(PY) -m pytest -q --durations=30 -m "not vm_e2e and not vm_harness"

unit: setup
	$(PY) -m pytest -q -m "not integration and not vm" tests/unit tests/security

integration: setup
	$(PY) -m pytest -q -m integration

vm: setup
	$(PY) -m pytest -q -m "vm and not vm_e2e and not vm_harness"

vm-e2e: setup
	$(PY) -m pytest -q -m vm_e2e

vm-harness: setup
	$(PY) -m pytest -q -m vm_harness

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
