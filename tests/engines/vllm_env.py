"""Where the vLLM CPU server's environment is (`make vllm-venv` builds it), and what a test does without it."""

import os

import pytest

from jobs import REPO

VLLM_PYTHON = os.environ.get("BPO_VLLM_PYTHON", os.path.join(REPO, ".venv-vllm", "bin", "python"))


def need_vllm():
    if not os.path.exists(VLLM_PYTHON):
        message = f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-venv` (make test builds it)"
        if os.environ.get("CI"):
            pytest.fail(message)  # CI builds it; missing there means the build step broke
        pytest.skip(message)
