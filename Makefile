# Set-up and the two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean-runs

install: $(STAMP)

# Idempotent: re-runs only when pyproject.toml changes. On a machine without an NVIDIA GPU the
# CPU build of torch is pinned (an unpinned torch pulls a multi-GB CUDA build); a torch that is
# already in the venv (a GPU user's own) is kept.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install torch; \
	  else $(BIN)/pip install torch==2.13.0; fi; \
	fi
	$(BIN)/pip install -e '.[dev]'
	touch $(STAMP)

demo: install
	$(BIN)/cai run configs/quickstart.yaml

# Lint first (seconds), then the tests: a tree that does not pass ruff does not pass `make test`.
test: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/critique_throughput.py

clean-runs:
	rm -rf runs
