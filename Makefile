# Set-up is two commands: `make run` (train the default model) and `make test`.
# TORCH picks the torch build: the default is the CPU/macOS wheel; on a CUDA machine use e.g.
#   make install TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install install-gpu run test test-gpu lint bench clean

install: $(STAMP)

# torch goes in first, on its own: a bare `torch` pulled in by another package would fetch a
# multi-GB CUDA build onto a CPU machine.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

# Official Mamba-2 kernels: needs a CUDA machine with nvcc; builds from source (minutes).
install-gpu: install
	MAMBA_FORCE_BUILD=TRUE CAUSAL_CONV1D_FORCE_BUILD=TRUE $(BIN)/pip install --no-build-isolation -e ".[gpu]"

run: install
	$(BIN)/python -m hybridchat.train

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check hybridchat tests

test-gpu: install
	$(BIN)/python -m pytest -q -m gpu

bench: install
	$(BIN)/python -m hybridchat.bench train

clean:
	rm -rf $(VENV) outputs/runs outputs/sweeps outputs/checkpoints outputs/cache
