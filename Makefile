# `make demo` and `make test` work from a fresh clone: they build .venv and install what they need from the
# package registries (no model or data download: the demo builds a tiny model and its data locally).
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo test clean-demo

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	# The CPU build of torch lies on local disk here; a GPU machine keeps its own torch (setup.py asks for >=2.4).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $@

demo: venv
	bash launch/demo.sh

test: venv
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo
