# Two commands: `make test` and `make demo`. Both set up .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ponder-installed
DEMO_STAMP := $(VENV)/.ponder-demo-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo lint bench clean protos

install: $(STAMP)

# torch first, pinned to the CPU wheel on this machine's disk (constraints.txt); then ponder and its dev extras.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	touch $(STAMP)

# The demo needs only the serving extra, installed without byte-compiling everything up front (compiling all of
# torch costs ~30 s of the demo's 5 minutes). Python compiles what it imports, when it first imports it, so a later
# `make test` needs no compile step of its own (one once tripped on a Python 3.12-only file inside torch).
$(DEMO_STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --no-compile torch==2.13.0
	$(PIP) --no-compile -e '.[serve]'
	touch $(DEMO_STAMP)

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -n 2

# The main job end to end (ponder demo): train the demo model on the embedded corpus (a finished run in runs/demo is
# reused; `make demo FRESH=1` retrains), export it with early exit to models/demo, serve it on 127.0.0.1, measure
# every threshold over gRPC, print the table, write runs/demo/demo.png, stop the server.
demo: $(DEMO_STAMP)
	$(BIN)/ponder demo$(if $(FRESH), --fresh)

# The gRPC stubs in serve/ from protos/ (checked in; tests/test_serve_protocol.py fails when they are stale).
protos: install
	$(BIN)/python protos/generate.py

# The adaptive-depth tables need the demo model: `ponder demo` trains and exports it unless runs/demo has it.
bench: install
	$(BIN)/ponder demo --no-progress --requests 20
	$(BIN)/ponder bench models/demo --no-progress --out benchmarks/results/depth_inprocess
	$(BIN)/ponder bench models/demo --via grpc --no-progress --out benchmarks/results/depth_grpc
	$(BIN)/python benchmarks/bench_train_eval.py
	$(BIN)/python benchmarks/bench_norms.py
	$(BIN)/python benchmarks/norm_quality.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_dag.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
