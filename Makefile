# Everything a new machine needs: `make demo` and `make test` create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash

.PHONY: demo test test-fast env clean gpu-check

# `make demo DEMO_FLAGS="--seed 1"` passes flags to python -m moco.demo (--help lists them)
DEMO_FLAGS ?=
demo: $(VENV)/.installed
	$(PY) -m moco.demo $(DEMO_FLAGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# the edit-test loop: every test but the slow ones (script launches, several processes), under 2 minutes
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

# On a CUDA machine whose python3 already has torch, torchvision and timm (e.g. a lent GPU machine, no
# network): the CUDA-only tests and the benchmark (synthetic and ImageNet-sized JPEGs), logs in GPU_OUT.
GPU_PYTHON ?= python3
GPU_OUT ?= output/gpu
gpu-check:
	mkdir -p $(GPU_OUT)
	set -o pipefail; $(GPU_PYTHON) -m pytest -q -rs tests/test_gpu.py 2>&1 | tee $(GPU_OUT)/test_gpu.log
	set -o pipefail; $(GPU_PYTHON) -m moco.bench --fullsize-jpegs output/fullsize --out $(GPU_OUT)/bench.json \
	  2>&1 | tee $(GPU_OUT)/bench.log

clean:
	rm -rf $(VENV) output
