"""A real vLLM server (the CPU build, in .venv-vllm: `make vllm-venv`) serving a tiny LLaVA on a loopback port.

The model is bpo.tiny's LLaVA with hidden size 128 (vLLM's CPU attention takes head sizes 32..512, the default tiny
model has 8) and the published weight names (bpo.engines.layout). Both engines read this one directory, so the
comparison is of engines, not of checkpoints. Registers the `server` marker: `pytest -m "not server"` leaves out the
tests that start it (about a minute to start on 2 cores).
"""

import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass

import pytest

from jobs import free_port

from .vllm_env import VLLM_PYTHON, need_vllm

START_LIMIT_S = 900  # generous: a loaded 2-core machine can take minutes to start the engine; never a test deadline


def pytest_configure(config):
    config.addinivalue_line("markers", "server: starts a vLLM CPU server on localhost (.venv-vllm, `make vllm-venv`); "
                                       "deselect with -m 'not server'")


@dataclass
class Served:
    url: str  # API base, http://127.0.0.1:PORT/v1
    model: str  # the model directory, which is also the served name
    log: str
    proc: subprocess.Popen


def _healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _stop(proc):
    """SIGTERM to the server's process group (it forks an engine-core process), then SIGKILL if it lingers."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture(scope="session")
def tiny128_dir(tmp_path_factory):
    """The tiny LLaVA as bpo.tiny saves it (hidden size 128): vLLM cannot read its vision-tower names."""
    from bpo.tiny import write_tiny_llava

    return write_tiny_llava(str(tmp_path_factory.mktemp("tiny128") / "model"), hidden_size=128)


@pytest.fixture(scope="session")
def served_model_dir(tiny128_dir, tmp_path_factory):
    from bpo.engines.layout import write_served_copy

    return write_served_copy(tiny128_dir, str(tmp_path_factory.mktemp("served") / "model"))


@pytest.fixture(scope="session")
def vllm_server(served_model_dir, tmp_path_factory):
    need_vllm()
    port = free_port()
    log = str(tmp_path_factory.mktemp("vllm") / "server.log")
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the server's own venv, not this checkout's packages
    # `vllm serve` is this module's CLI; vllm-cpu's console script looks up the distribution "vllm" and fails.
    cmd = [VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server", "--model", served_model_dir,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "512",
           "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path_factory.getbasetemp()),
                                start_new_session=True)
    try:
        t0 = time.time()
        while not _healthy(port):
            if proc.poll() is not None or time.time() - t0 > START_LIMIT_S:
                tail = open(log).read()[-4000:]
                pytest.fail(f"vLLM server did not come up (exit {proc.poll()}); log {log}:\n{tail}")
            time.sleep(2)
        print(f"vLLM server healthy after {time.time() - t0:.0f}s on port {port}", file=sys.stderr)
        yield Served(f"http://127.0.0.1:{port}/v1", served_model_dir, log, proc)
    finally:
        _stop(proc)
