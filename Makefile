# `make demo`, `make smoke` and `make test` work from a fresh clone: they build .venv and install what they need from
# the package registries (no model or data download: tiny models and their data are built locally).
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: venv demo smoke test clean-demo bench-venv

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	python3 -m venv $(VENV)
	# torch and torchvision must come as a matching pair: transformers 5 builds the Qwen2-VL, Qwen2.5-VL, OneVision
	# and InternVL processors only with torchvision, and the torchvision wheel beside torch 2.13's CPU build is a CUDA
	# build whose ops do not load. 2.14.1 + 0.29.1 lie on local disk here and run on the CPU (README, "Install").
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[test]"
	touch $@

# The science demo: BPO vs DPO from one SFT base on bpo.world, 3 seeds (README, "The science demo").
demo: venv
	$(PY) -m launch.science --out demo

# Every stage of the chain once, on a random tiny model and the sample data.
smoke: venv
	bash launch/smoke.sh

test: venv
	$(PY) -m pytest -q tests

clean-demo:
	rm -rf demo smoke

# Benchmarks that run a peer beside bpo (benchmarks/step_bench.py: TRL) use their own environment, so the test
# environment never carries the peer's packages.
bench-venv: .venv-bench/.installed

.venv-bench/.installed: setup.py
	python3 -m venv .venv-bench
	.venv-bench/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-bench/bin/python -m pip install -q -e ".[bench]" trl
	touch $@
