# Every target sets up .venv itself, so a fresh clone needs nothing installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint clean bench-protocol bench-engine bench-simulator bench-search bench-peer

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.runtime: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@ $(VENV)/.runtime

# The main job: tune the quickstart experiment (its synthetic checkpoint is made on first use; about 10 minutes).
# Running it again continues the same study.
run: $(VENV)/.runtime
	$(BIN)/autoresearch tune experiments/quickstart.toml

# Chromium is for the test that opens the MLflow UI in a browser; where apt cannot install it, that test is skipped.
test: $(VENV)/.test
	command -v chromium >/dev/null || apt-get install -y -q chromium >/dev/null || echo "chromium unavailable: the browser test will be skipped"
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# A benchmark, not a test: writes docs/benchmarks/protocol.md (about 20 minutes here; needs root for the limit).
bench-protocol: $(VENV)/.runtime
	command -v fio >/dev/null || apt-get install -y fio || echo "fio unavailable: the report will say so"
	$(BIN)/python -m engine.reports.protocol_report --data data --out docs/benchmarks/protocol.md

# A benchmark, not a test: writes docs/benchmarks/engine.md and .json (about 30 minutes here; needs root).
bench-engine: $(VENV)/.runtime
	$(BIN)/python -m engine.reports.engine_report --data data --out docs/benchmarks/engine.md

# A benchmark, not a test: writes docs/benchmarks/simulator.md and .json (about 25 minutes here; needs root).
bench-simulator: $(VENV)/.runtime
	$(BIN)/python -m engine.reports.simulator_report --data data --out docs/benchmarks/simulator.md

# A benchmark, not a test: writes docs/benchmarks/search.md and .json (samplers on the trace simulator, then a short
# real tune for the overhead per trial; fixtures are made once under data/).
bench-search: $(VENV)/.runtime
	$(BIN)/python -m search.bench_search --data data --out docs/benchmarks/search.md

# A benchmark, not a test: writes docs/benchmarks/peer.md and .json, the engine against llama.cpp's llama-bench on the
# same weights (about 40 minutes here, after a one-time llama.cpp build and conversion under data/peer of about 25;
# needs root for the limits). For development: python -m engine.reports.peer_report --quick (2 rounds, one budget).
bench-peer: $(VENV)/.runtime
	$(BIN)/python -m engine.reports.peer_report --data data --out docs/benchmarks/peer.md

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) data .pytest_cache .ruff_cache .hypothesis
