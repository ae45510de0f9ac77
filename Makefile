# Two commands: `make test` and `make demo`. Both set up .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ponder-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo lint bench clean

install: $(STAMP)

# torch first, pinned to the CPU wheel on this machine's disk (constraints.txt); then ponder and its dev extras.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2

# The main job as it stands: the plugin catalogue, then the demo model trained on the embedded
# corpus (reused if runs/demo already holds it; `make demo FRESH=1` retrains) and evaluated per threshold.
demo: install
	$(BIN)/ponder plugins list
	@if [ -n "$(FRESH)" ]; then rm -rf runs/demo; fi
	@if [ -f runs/demo/latest ]; then echo "reusing runs/demo (make demo FRESH=1 retrains)"; \
	else $(BIN)/ponder train --preset demo --out runs/demo; fi
	$(BIN)/ponder eval runs/demo --batch-size 1 --threshold 0.5 0.8 0.9 0.95 0.99 1.0

bench: install
	$(BIN)/python benchmarks/bench_train_eval.py
	$(BIN)/python benchmarks/bench_norms.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_dag.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
