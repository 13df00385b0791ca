# The two commands of the README. Both set up the project first (idempotent).
.PHONY: setup demo test bench

setup:
	@bash scripts/setup.sh

demo: setup
	python -m pipeline.fit demo --run-dir runs/demo --fresh true

test: setup
	ruff check .
	python -m pytest -q -ra --durations=25 tests

bench: setup
	python benchmarks/quant_overhead.py
