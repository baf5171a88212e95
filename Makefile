# Everything a new machine needs: `make demo` and `make test` create the virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test env clean

demo: $(VENV)/.installed
	$(PY) -m moco.demo

test: $(VENV)/.installed
	$(PY) -m pytest -q tests

env: $(VENV)/.installed

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	touch $@

clean:
	rm -rf $(VENV) output
