# Everything a new machine needs: `make demo` and `make test` create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SHELL := /bin/bash

.PHONY: demo study test test-fast lint env clean gpu-check gpu-check-dry device-versions

# `make demo DEMO_FLAGS="--seed 1"` passes flags to python -m moco.tools.demo (--help lists them)
DEMO_FLAGS ?=
demo: $(VENV)/.installed
	$(PY) -m moco.tools.demo $(DEMO_FLAGS)

# MoCo v3's stability study at CPU scale (README "Monitoring"): 12 short ViT runs, about 32 minutes on 2 cores
STUDY_FLAGS ?=
study: $(VENV)/.installed
	$(PY) -m moco.tools.study $(STUDY_FLAGS)

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

# ruff with the rule set of .ruff.toml (pyflakes, pycodestyle, import order, bugbear); CI runs it first
lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# the edit-test loop: every test but the slow ones (script launches, several processes), under 2 minutes
test-fast: $(VENV)/.installed
	$(PY) -m pytest -q -m "not slow" tests

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	@echo "Installing requirements.txt into $(VENV): about 5.7 GB (PyPI's torch brings its CUDA libraries, also on a CPU machine), a few minutes"
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --progress-bar off -r requirements.txt | \
	  { grep --line-buffered -E '^ *(Collecting|Downloading|Installing collected|Successfully installed)' || true; }; \
	  exit $${PIPESTATUS[0]}
	touch $@
	@echo "Done. Run the commands of README.md after: source $(VENV)/bin/activate"


# The GPU check (README "Speed"; python tests/gpu_check.py --help), on a CUDA machine whose python3 has torch,
# torchvision and timm: the CUDA tests, the benchmark, a short CIFAR-10 run, each time-boxed inside --budget-min
# (default 9); results in $OUT, or output/gpu_check. GPU_CHECK_FLAGS="--cifar-tar PATH": the CIFAR-10 JPEG tarball
# (default .gpu_data/cifar10-jpeg.tar.xz). `make gpu-check-dry` runs the same parts on this CPU, tiny.
GPU_PYTHON ?= python3
GPU_CHECK_FLAGS ?=
gpu-check:
	$(GPU_PYTHON) tests/gpu_check.py $(GPU_CHECK_FLAGS)

gpu-check-dry: $(VENV)/.installed
	$(PY) tests/gpu_check.py --dry-run $(GPU_CHECK_FLAGS)

# The GPU machine's versions (torch 2.11, torchvision 0.26, no TorchCodec; the rest as requirements.txt) in
# .venv-device, made once (a download of several GB: not part of CI), then the fast test tier and the GPU
# check's dry run in it. Run it after a change to the GPU check, the data pipelines or the training step.
DEVICE_VENV ?= .venv-device
DEVICE_PINS ?= torch==2.11.0 torchvision==0.26.0
device-versions: $(DEVICE_VENV)/.installed
	$(DEVICE_VENV)/bin/python -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
	$(DEVICE_VENV)/bin/python -m pytest -q -m "not slow" tests
	$(DEVICE_VENV)/bin/python tests/gpu_check.py --dry-run $(GPU_CHECK_FLAGS)

$(DEVICE_VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(DEVICE_VENV)
	grep -v -E '^(torch|torchvision|torchcodec)==' requirements.txt > $(DEVICE_VENV)/requirements.txt
	$(DEVICE_VENV)/bin/pip install --quiet $(DEVICE_PINS) -r $(DEVICE_VENV)/requirements.txt
	touch $@

clean:
	rm -rf $(VENV) output
