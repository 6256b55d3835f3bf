"""A real vLLM server (the CPU build, in .venv-vllm: `make vllm-venv`) serving a tiny LLaVA on a loopback port.

The model is bpo.tiny's LLaVA with hidden size 128 (vLLM's CPU attention takes head sizes 32..512, the default tiny
model has 8) and the published weight names (bpo.engines.layout). Both engines read this one directory, so the
comparison is of engines, not of checkpoints. Registers the `server` marker: `pytest -m "not server"` leaves out the
tests that start it (about a minute to start on 2 cores).
"""

import subprocess
import sys
from dataclasses import dataclass

import pytest

from bpo.engines import cpu_server
from jobs import free_port

from .vllm_env import VLLM_PYTHON, need_vllm


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a vLLM CPU server on localhost (.venv-vllm, `make vllm-venv`); "
                                       "deselect with -m 'not server'")


@dataclass
class Served:
    url: str  # API base, http://127.0.0.1:PORT/v1
    model: str  # the model directory, which is also the served name
    log: str
    proc: subprocess.Popen


@pytest.fixture(scope="session")
def tiny128_dir(tmp_path_factory):
    """The tiny LLaVA as bpo.tiny saves it (hidden size 128): vLLM cannot read its vision-tower names."""
    from bpo.tiny import write_tiny_llava

    return write_tiny_llava(str(tmp_path_factory.mktemp("tiny128") / "model"), hidden_size=128)


@pytest.fixture(scope="session")
def served_model_dir(tiny128_dir, tmp_path_factory):
    from bpo.engines.layout import write_served_copy

    return write_served_copy(tiny128_dir, str(tmp_path_factory.mktemp("served") / "model"))


@pytest.fixture(scope="module")  # one module uses it: stopped before the Slurm-stage test starts its own servers
def vllm_server(served_model_dir, tmp_path_factory):
    need_vllm()
    port = free_port()
    log = str(tmp_path_factory.mktemp("vllm") / "server.log")
    proc = cpu_server.start(VLLM_PYTHON, served_model_dir, port, log)
    try:
        try:
            waited = cpu_server.wait_healthy(proc, port, log)
        except cpu_server.ServerStartError as e:
            pytest.fail(str(e))
        print(f"vLLM server healthy after {waited:.0f}s on port {port}", file=sys.stderr)
        yield Served(f"http://127.0.0.1:{port}/v1", served_model_dir, log, proc)
    finally:
        cpu_server.stop(proc)
