# Set-up and the two commands the README opens with: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev

.PHONY: install demo test bench clean-runs

install: $(STAMP)

# The torch the README's timings were taken with: 2.13.0, its CPU build.
TORCH := torch==2.13.0
TORCH_CPU_INDEX := https://download.pytorch.org/whl/cpu

# Idempotent: re-runs only when pyproject.toml changes, and a torch that is already in the venv (a
# GPU user's own, or one installed before) is kept, never reinstalled. With an NVIDIA GPU
# (nvidia-smi on PATH) torch is pip's default build. Without one, torch's CPU build comes from
# PyTorch's own index first (PyPI's torch==2.13.0 for Linux x86-64 is the multi-GB CUDA build);
# `--timeout 5 --retries 0` make an unreachable index fail in seconds, and then the plain
# `pip install torch==2.13.0` (PyPI, or the wheels pip's own configuration points at) is the fallback.
# --no-compile: Python compiles a module's bytecode when it is first imported (and keeps it), so only
# the modules `cai` imports get compiled, not all of torch's and transformers' thousands at install.
PIP_INSTALL := $(BIN)/pip install --no-compile
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! $(BIN)/python -c "import torch" 2>/dev/null; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(PIP_INSTALL) torch; \
	  else $(PIP_INSTALL) --timeout 5 --retries 0 --index-url $(TORCH_CPU_INDEX) '$(TORCH)' \
	    || { echo "PyTorch's CPU index failed: installing $(TORCH) from the default index"; \
	         $(PIP_INSTALL) '$(TORCH)'; }; fi; \
	fi
	$(PIP_INSTALL) -e .
	touch $(STAMP)

# What the tests need on top (pytest, ruff, playwright, hypothesis, wandb, tensorboard): `make demo`
# does not wait for them.
$(DEV_STAMP): $(STAMP)
	$(PIP_INSTALL) -e '.[dev]'
	touch $(DEV_STAMP)

demo: install
	$(BIN)/cai run configs/quickstart.yaml

# Lint first (seconds), then the tests: a tree that does not pass ruff does not pass `make test`.
test: $(DEV_STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest

bench: install
	$(BIN)/python bench/critique_throughput.py

clean-runs:
	rm -rf runs
