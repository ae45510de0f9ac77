# Two commands: `make test` and `make demo`. Both set up .venv first if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ponder-installed
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: install test demo lint bench clean protos

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

# The main job as it stands: the plugin catalogue; the demo model trained on the embedded corpus
# (reused if runs/demo already holds it; `make demo FRESH=1` retrains) and evaluated per threshold;
# then exported to ONNX with early exit (models/demo/1) and run with ONNX Runtime at a low and a full threshold.
demo: install
	$(BIN)/ponder plugins list
	@if [ -n "$(FRESH)" ]; then rm -rf runs/demo models/demo; fi
	@if [ -f runs/demo/latest ]; then echo "reusing runs/demo (make demo FRESH=1 retrains)"; \
	else $(BIN)/ponder train --preset demo --out runs/demo; fi
	$(BIN)/ponder eval runs/demo --batch-size 1 --threshold 0.5 0.8 0.9 0.95 0.99 1.0
	@if [ -f models/demo/1/model.onnx ]; then echo "reusing models/demo/1"; \
	else $(BIN)/ponder export runs/demo --repository models --name demo --version 1; fi
	$(BIN)/ponder run models/demo/1/model.onnx --text "The return statement" --threshold 0.5 --tokens 24
	$(BIN)/ponder run models/demo/1/model.onnx --text "The return statement" --threshold 1.0 --tokens 24

# The gRPC stubs in serve/ from protos/ (checked in; tests/test_serve_protocol.py fails when they are stale).
protos: install
	$(BIN)/python protos/generate.py

bench: install
	$(BIN)/python benchmarks/bench_train_eval.py
	$(BIN)/python benchmarks/bench_norms.py
	$(BIN)/python benchmarks/bench_export.py
	$(BIN)/python benchmarks/bench_serve.py
	$(BIN)/python benchmarks/bench_dag.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .ruff_cache
