# The two commands of the README: `make bench` (the main job) and `make test`.
# Both set the machine up first (scripts/setup.sh is idempotent).
PYTHON ?= python3

.PHONY: setup bench test bench-pytest lint

setup:
	PYTHON=$(PYTHON) bash scripts/setup.sh

bench: setup
	$(PYTHON) -m dynkernels bench

test: setup
	$(PYTHON) -m pytest -q

bench-pytest: setup
	$(PYTHON) -m pytest benchmarks --benchmark-only

lint:
	ruff check . && ruff format --check .
