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

# The whole suite in three runs, each test in one. First the unit tests and the tests of
# real parts marked parallel_safe, on one worker more than the cores (pytest-xdist; a
# fifth of their time is spent waiting on a subprocess or a sleep, 165 s on two workers,
# 132 s on three, on two cores). Then two runs side by side:
# - the other tests of real parts, one at a time, as they take the host's namespaces, loop
#   devices and timing (their timeouts and shaped links assume the host answers at once);
#   they wait on shaped links most of the time, using about a third of two cores;
# - the VM tests and those marked heavy (an image build), as SCHED_IDLE (chrt --idle) so
#   that they take only the CPU the first run leaves, two modules at a time, each module's
#   tests on one worker: one VM under TCG keeps one core busy, and none of them times
#   anything tighter than minutes. The long modules go first (their ``minutes`` marks, see
#   tests/conftest.py): one started last would leave a worker alone at the end. Their
#   output is shown when both runs are over (the file it is kept in is named at their start).
# One after the other, the two took 588 s and 561 s on two cores; side by side 778-780 s
# and 746-770 s (two runs on fresh clones, the whole suite 16 min against 22). With the VM
# tests at nice 19 rather than SCHED_IDLE, the tests of real parts took 917-928 s beside
# them, with their temporary files on disk or in RAM alike: not the disk, and more than
# their share of the CPU.
SHARED_TESTS := -m "(not integration and not vm) or parallel_safe" tests
REAL_TESTS := -m "integration and not vm and not heavy and not parallel_safe"
TWO_AT_A_TIME := -m "(vm or heavy) and not vm_e2e and not vm_harness"
SHARED_WORKERS := $(shell echo $$(( $$(nproc) + 1 )))

test: lint typecheck
	$(PY) -m pytest -q -n $(SHARED_WORKERS) --durations=10 $(SHARED_TESTS)
	@log=$$(mktemp /tmp/corral-vm-tests.XXXXXX.log); \
	echo "VM and heavy tests started as SCHED_IDLE, beside the next run; their output: $$log"; \
	chrt --idle 0 $(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=10 \
		$(TWO_AT_A_TIME) > $$log 2>&1 & vms=$$!; \
	$(PY) -m pytest -q --durations=20 $(REAL_TESTS); real=$$?; \
	echo "waiting for the VM and heavy tests ($$log)"; \
	wait $$vms; vm=$$?; \
	cat $$log; \
	echo "tests of real parts: exit $$real; VM and heavy tests: exit $$vm"; \
	test $$real = 0 && test $$vm = 0

unit: setup
	$(PY) -m pytest -q -n auto -m "not integration and not vm" tests/unit tests/security

integration: setup
	$(PY) -m pytest -q -m integration

vm: setup
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder -m "vm and not vm_e2e and not vm_harness"

vm-e2e: setup
	$(PY) -m pytest -q -m vm_e2e

vm-harness: setup
	$(PY) -m pytest -q -m vm_harness

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
