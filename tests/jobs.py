"""Launching bpo's jobs as real subprocesses, the way users do: `deepspeed --num_gpus N script --config ...`."""

import json
import os
import subprocess
import sys

import yaml

from ports import free_port

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The team's shared material beside the checkout (real chat templates, real benchmark files), read where it lies and
# never copied into the project; CI lays a copy of it beside its clone. BPO_SHARED points elsewhere (a worktree).
SHARED = os.environ.get("BPO_SHARED") or os.path.normpath(os.path.join(REPO, "..", "shared"))


def write_config(path, sections):
    with open(path, "w") as f:
        yaml.safe_dump(sections, f)
    return str(path)


def run_job(script, config, overrides=(), nproc=2, env=None, check=True, timeout=600, clean_shm=True):
    """Run bpo/<script> on `nproc` CPU ranks under the deepspeed launcher; returns the CompletedProcess, with the
    rendezvous port as `master_port`. clean_shm=False leaves the job's /dev/shm buffers as it left them."""
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=REPO)
    full_env.update(env or {})
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    port = free_port()
    cmd = [launcher, "--num_gpus", str(nproc), "--master_port", str(port),
           os.path.join(REPO, "bpo", script), "--config", config, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    proc.master_port = port
    if clean_shm:
        remove_shm_buffers(port, nproc)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


def remove_shm_buffers(port, nproc, addr="127.0.0.1"):
    """A job killed before every rank mapped every buffer (bpo.runtime.dist.init_distributed) leaves its DeepSpeed shm
    buffers behind."""
    from bpo.runtime.dist import shm_buffer_path

    for rank in range(nproc):
        path = shm_buffer_path(rank, addr, port)
        if os.path.exists(path):
            os.unlink(path)


def run_single(script, config, overrides=(), env=None, check=True, timeout=600):
    """Run bpo/<script> as one plain process (`python bpo/<script> ...`), without a launcher: half the start-up."""
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                    PYTHONPATH=REPO)
    full_env.update(env or {})
    cmd = [sys.executable, "-u", os.path.join(REPO, "bpo", script), "--config", config, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc


# The metrics two training runs that should agree are compared on, step by step.
COMPARED = ["loss", "rewards/chosen", "rewards/rejected", "rewards/blind", "accuracies/rejected", "logps/chosen",
            "logps/blind", "grad_norm", "lr"]


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def add_blind(src, dst, text="ASSISTANT: It is shown in the picture, and I will describe it in detail for you."):
    """A copy of a JSONL file with a fixed blind response per record, for tests that must not depend on generation."""
    with open(src) as f, open(dst, "w") as g:
        for line in f:
            if line.strip():
                row = json.loads(line)
                row["blind"] = text
                g.write(json.dumps(row) + "\n")
    return str(dst)
